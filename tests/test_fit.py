"""Fitting a GGUF to a target: GPU layers (llama.cpp's order: the output layer first), KV cache
type and the largest context, from the GGUF header's tensor bytes."""

from __future__ import annotations

import pytest

from quantkit.api import convert
from quantkit.errors import InputError
from quantkit.hardware import load_profile
from quantkit.hardware.fit import MARGIN_MIN, GGUFLayout, _split, fit_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    return convert(tiny_model("llama"), ["gguf:q8_0"], out, verify=False).artifacts[0].main_file


def _board(path, *, kind="gpu", device: int, host: int | None = None, backend="cuda"):
    host_memory = f"host_memory: {{total_bytes: {host}, bandwidth_bytes_per_s: 5.0e10, reserved_bytes: 0}}\n" if host else ""
    path.write_text(
        f"name: board\nkind: {kind}\nmemory: {{total_bytes: {device}, bandwidth_bytes_per_s: 1.0e11, reserved_bytes: 0}}\n"
        f"{host_memory}compute: {{fp32: 1.0e12}}\nruntimes:\n"
        f"  - {{name: llama.cpp, backend: {backend}, formats: [gguf], quant_types: null}}\n")
    return load_profile(str(path))


def test_layers_go_to_the_device_output_layer_first(tiny_gguf, tmp_path):
    layout = GGUFLayout.of(tiny_gguf)
    assert layout.n_layers == 2 and layout.output_bytes > 0 and all(b > 0 for b in layout.layer_bytes)
    ctx = 1024
    device = {n: _split(layout, n, ctx, "f16")[0] for n in range(4)}
    assert device[0] == 0
    # -ngl 1 is the output layer alone, then the last block, then the first
    assert device[1] - layout.compute_bytes(ctx, True) == layout.output_bytes
    assert device[2] - device[1] == layout.layer_bytes[1] + layout.kv_bytes([1], ctx, "f16")
    assert device[3] - device[2] == layout.layer_bytes[0] + layout.kv_bytes([0], ctx, "f16")
    # a device that holds the output layer and one block (with the margin) but not two, with an
    # f16 or a q8_0 cache
    ctx = 128
    two, three = _split(layout, 2, ctx, "f16")[0], min(_split(layout, 3, ctx, kv)[0] for kv in ("f16", "q8_0"))
    assert two < three
    room = MARGIN_MIN + (two + three) // 2
    fit = fit_gguf(tiny_gguf, _board(tmp_path / "b.yaml", device=room, host=8 * 2**30), ctx=ctx)
    assert fit["n_gpu_layers"] == 2 and not fit["all_layers_on_gpu"] and fit["output_on_gpu"]
    assert fit["device_bytes"] + MARGIN_MIN <= room and fit["ctx"] == ctx and fit["host_memory_checked"]
    # where only a q8_0 cache lets the last block on, the q8_0 cache is chosen (with flash attention)
    n = layout.n_ctx_train
    f16, q8 = _split(layout, 3, n, "f16")[0], _split(layout, 3, n, "q8_0")[0]
    fit = fit_gguf(tiny_gguf, _board(tmp_path / "q.yaml", device=MARGIN_MIN + (f16 + q8) // 2, host=8 * 2**30), ctx=n)
    assert fit["n_gpu_layers"] == 3 and fit["kv_type"] == "q8_0" and fit["flash_attention"]
    # with room for everything, all layers go and the context grows to the training context
    fit = fit_gguf(tiny_gguf, _board(tmp_path / "c.yaml", device=8 * 2**30, host=8 * 2**30))
    assert fit["n_gpu_layers"] == 3 and fit["all_layers_on_gpu"] and fit["ctx"] == layout.n_ctx_train
    # a CPU backend offloads nothing and fits everything in one pool
    fit = fit_gguf(tiny_gguf, _board(tmp_path / "d.yaml", kind="cpu", device=8 * 2**30, backend="cpu"))
    assert fit["n_gpu_layers"] == 0 and fit["device_bytes"] is None and fit["host_usable_bytes"] == 8 * 2**30


def test_largest_context_and_kv_type(tiny_gguf, tmp_path):
    layout = GGUFLayout.of(tiny_gguf)
    # a one-pool target that holds the model at 256 tokens of context but not at its training 512
    small, full = (sum(_split(layout, 0, n, "q8_0")) for n in (256, layout.n_ctx_train))
    board = _board(tmp_path / "e.yaml", kind="cpu", device=MARGIN_MIN + (small + full) // 2, backend="cpu")
    fit = fit_gguf(tiny_gguf, board)
    assert fit["ctx"] == 256 and fit["n_gpu_layers"] == 0
    with pytest.raises(InputError, match="512-token context"):  # asked for: no shorter one instead
        fit_gguf(tiny_gguf, board, ctx=512)
    roomy = _board(tmp_path / "r.yaml", kind="cpu", device=8 * 2**30, backend="cpu")
    assert fit_gguf(tiny_gguf, roomy)["ctx"] == layout.n_ctx_train and fit_gguf(tiny_gguf, roomy, ctx=256)["ctx"] == 256


def test_what_cannot_fit_is_one_line_naming_the_shortfall(tiny_gguf, tmp_path):
    board = _board(tmp_path / "f.yaml", kind="cpu", device=MARGIN_MIN + 1000, backend="cpu")
    with pytest.raises(InputError, match=r"does not fit board even with no layer offloaded.*GB missing"):
        fit_gguf(tiny_gguf, board)


def test_profile_reports_the_fit_of_a_gguf(tiny_gguf, tmp_path, capsys):
    from quantkit.cli import main

    _board(tmp_path / "board.yaml", device=8 * 2**30, host=8 * 2**30)
    assert main(["-q", "profile", str(tiny_gguf.parent), "--profile", str(tmp_path / "board.yaml"), "--no-latency",
                 "--chunks", "1", "--ctx", "128", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "fit: -ngl 3 (all layers offloaded), KV f16" in out
    import json

    fit = json.loads((tmp_path / "r.json").read_text())["targets"][0]["fit"]
    assert fit["n_gpu_layers"] == 3 and fit["estimated"] and fit["profile"] == "board"


def test_mixture_of_experts_keeps_the_first_blocks_experts_in_ram(tiny_model, tmp_path):
    """A mixture of experts that does not fit the GPU whole: every layer offloaded, the routed
    experts of the fewest first blocks on the CPU (--n-cpu-moe), and the speed from the bytes a
    token reads (its routed experts' share)."""
    from quantkit.hardware.estimate import artifact_facts, estimate_target
    from quantkit.profile.memory import kv_cache_bytes_per_token
    from quantkit.runtimes.llamacpp import LlamaCppRuntime

    path = convert(tiny_model("qwen3_moe"), ["gguf:f16"], tmp_path, verify=False).artifacts[0].main_file
    layout = GGUFLayout.of(path)
    assert layout.expert_active == 0.5 and all(0 < e < b for e, b in zip(layout.expert_bytes, layout.layer_bytes, strict=True))
    ctx, top = 256, layout.n_layers + 1
    whole = _split(layout, top, ctx, "q8_0")[0]
    one_in_ram = _split(layout, top, ctx, "q8_0", cpu_moe=1)[0]
    assert whole - one_in_ram == layout.expert_bytes[0]
    board = _board(tmp_path / "m.yaml", device=MARGIN_MIN + (whole + one_in_ram) // 2, host=8 * 2**30)
    desc = LlamaCppRuntime.describe(path)
    assert desc["expert_count"] == 4 and desc["bytes_read_per_token"] < desc["tensor_bytes"] - desc["expert_bytes"] // 2 + 1
    estimate = estimate_target(artifact_facts("gguf", "f16", desc, kv_cache_bytes_per_token(desc)), board, ctx, None)
    fit = fit_gguf(path, board, ctx=ctx, estimate=estimate)
    assert fit["n_gpu_layers"] == top and fit["n_cpu_moe"] == 1 and fit["kv_type"] == "q8_0"
    assert "of the bytes a token reads" in fit["speed_note"] and fit["decode_tokens_per_s"] < estimate["decode_tokens_per_s"]
    # for runtimes that cannot keep experts in RAM (Ollama, llama-cpp-python's server): whole layers
    layers = fit_gguf(path, board, ctx=ctx, estimate=estimate, cpu_moe=False)
    assert layers["n_cpu_moe"] == 0 and layers["n_gpu_layers"] < top
