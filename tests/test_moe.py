"""Mixtures of experts and the other open families (issue 19): tiny random checkpoints of every
architecture quantkit's GGUF writer knows beyond the dense five, converted, loaded in llama.cpp
and checked against transformers; the layer-streaming engine's logits against transformers'."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
from tiny_models import MOE_ARCHS, shared_text

from quantkit.api import convert
from quantkit.errors import UnsupportedArchitectureError
from quantkit.formats.gguf.arch import arch_for_config
from quantkit.source import experts_of

NEW_ARCHS = [*MOE_ARCHS, "phi3", "glm4"]


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_gguf_matches_transformers_and_generates(arch, tiny_model, tmp_path, verify_texts):
    from quantkit.runtimes.llamacpp import LlamaCppRuntime

    result = convert(tiny_model(arch), ["gguf:f16", "gguf:q4_k_m"], tmp_path, verify_texts=verify_texts, verify_tokens=1024)
    f16, q4 = (a.manifest["details"]["verification"] for a in result.artifacts)
    assert f16["tokens_scored"] >= 1000 and f16["kld_mean"] < 1e-3, f16
    assert q4["kld_mean"] > f16["kld_mean"] and np.isfinite(q4["kld_mean"]), q4  # reported, and a real quantization
    path = result.artifacts[0].main_file
    reader = gguf.GGUFReader(path)
    name = reader.fields["general.architecture"].contents()
    tensors = {t.name: t for t in reader.tensors}
    if arch in MOE_ARCHS:
        assert reader.fields[f"{name}.expert_count"].contents() == 4
        assert reader.fields[f"{name}.expert_used_count"].contents() == 2
        last = max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
        ff = experts_of(json.loads((tiny_model(arch) / "config.json").read_text())).ff
        gate, down = tensors[f"blk.{last}.ffn_gate_exps.weight"], tensors[f"blk.{last}.ffn_down_exps.weight"]
        assert gate.tensor_type.name == "F16" and list(gate.shape) == [64, ff, 4] and list(down.shape) == [ff, 64, 4]
        assert tensors[f"blk.{last}.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router is never rounded
    # decoding one token at a time through the KV cache (MLA's absorbed path for DeepSeek) gives
    # the logits of scoring the whole window at once, and greedy generation runs
    runtime = LlamaCppRuntime(path, n_ctx=128)
    try:
        tokens = runtime.tokenize(verify_texts["en"][:300])[:40]
        batch = np.array(runtime.logits(tokens)[-1])
        runtime._llm.reset()
        for token in tokens:
            runtime._llm.eval([token])
        step = np.array(runtime._llm.scores[len(tokens) - 1])
        assert np.abs(step - batch).max() < 1e-2 * max(1.0, np.abs(batch).max()), np.abs(step - batch).max()
        assert runtime.generate_timed(tokens, 8)["decode_s"] > 0
    finally:
        runtime.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_streaming_engine_matches_transformers(arch, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.runtimes.stream import LayerStream
    from quantkit.source import resolve_source

    folder = tiny_model(arch)
    windows = [list(range(5, 45)), list(range(100, 120))]
    got = list(LayerStream(resolve_source(folder)).logits(windows))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for window, logits in zip(windows, got, strict=True):
            expected = model(torch.tensor([window])).logits[0].numpy()
            assert np.abs(logits - expected).max() < 1e-4


def test_expert_stacks_follow_the_checkpoint(tiny_model, tmp_path):
    """ffn_{gate,up,down}_exps hold expert e's matrices at index e, in the checkpoint's layout."""
    from safetensors.numpy import load_file

    folder = tiny_model("mixtral")
    art = convert(folder, ["gguf:f32"], tmp_path, verify=False).artifacts[0]
    tensors = {t.name: t for t in gguf.GGUFReader(art.main_file).tensors}
    weights = load_file(folder / "model.safetensors")
    for leaf, part in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        stack = np.asarray(tensors[f"blk.1.ffn_{part}_exps.weight"].data)
        for e in range(4):
            np.testing.assert_array_equal(stack[e], weights[f"model.layers.1.block_sparse_moe.experts.{e}.{leaf}.weight"])


def test_moe_configs_llama_cpp_cannot_route_alike_are_refused(tiny_copy, tmp_path):
    config = json.loads((tiny_copy("qwen3_moe") / "config.json").read_text())
    cases = [
        ({"norm_topk_prob": False}, "always renormalises"),  # Qwen3-MoE in llama.cpp always normalises
        ({"scoring_func": "sqrtsoftplus"}, "gating function"),
        ({"decoder_sparse_step": 2}, "dense blocks between"),
        ({"num_experts_per_tok": 9}, "routes 9 of 4"),
    ]
    for change, words in cases:
        with pytest.raises(UnsupportedArchitectureError, match=words):
            arch_for_config({**config, **change})
    assert experts_of(config).count == 4 and experts_of({"model_type": "llama"}) is None
    v3 = json.loads((tiny_copy("deepseek_v3") / "config.json").read_text())
    with pytest.raises(UnsupportedArchitectureError, match="not a grouping"):
        arch_for_config({**v3, "n_group": 3, "topk_group": 1})  # 4 experts do not split in 3 groups
    # through the CLI: one line, exit 2, nothing written
    folder = tiny_copy("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "scoring_func": "sigmoid"}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "-q", "convert", str(folder), "--to", "gguf:f16", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "plain softmax" in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_importance_matrix_counts_each_experts_own_tokens(tiny_model, tmp_path, verify_texts):
    """Stacked experts get one row of sums and one count per expert, over the tokens routed to it
    (llama-imatrix's layout); the file reads back the same, and quantizing with it beats without."""
    from quantkit.formats.gguf.imatrix import ImportanceMatrix

    result = convert(tiny_model("qwen3_moe"), ["gguf:q3_k_m+noimatrix", "gguf:q3_k_m"], tmp_path, verify_texts=verify_texts,
                     verify_tokens=1024)
    plain, weighted = (a.manifest["details"]["verification"]["kld_mean"] for a in result.artifacts)
    assert weighted < plain
    path = next(tmp_path.rglob("imatrix.gguf"))
    matrix = ImportanceMatrix.read(path)
    tokens = matrix.counts["blk.0.attn_q.weight"]
    for part, width in (("gate", 64), ("up", 64), ("down", 32)):
        name = f"blk.1.ffn_{part}_exps.weight"
        assert matrix.sums[name].shape == (4, width) and int(matrix.counts[name].sum()) == 2 * tokens  # 2 of 4 experts a token
    again = tmp_path / "again.gguf"
    matrix.write(again)
    assert ImportanceMatrix.read(again).digest() == matrix.digest()
    reader = gguf.GGUFReader(path)
    counts = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight.counts")
    assert list(counts.shape) == [1, 4]  # llama.cpp's {1, n_expert}


# -- GPTQ: each routed expert from its own tokens --------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_gptq_of_a_mixture_of_experts_reads_back_independently(arch, tiny_model, tmp_path):
    """Per-expert packed Linears (the layout GPTQModel and vLLM load), every expert quantized from
    the tokens routed to it (counts in the manifest), the router float; the GPTQ runtime's logits
    equal the float model with the independently decoded weights."""
    import torch
    from test_gptq import SMALL_CALIB, read_checkpoint, read_linear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.formats import ConvertOptions, get_format
    from quantkit.recipe import parse_recipe
    from quantkit.runtimes import get_runtime
    from quantkit.source import resolve_source

    folder = tiny_model(arch)
    recipe = parse_recipe("gptq:w4g128", SMALL_CALIB)  # one group per row on these narrow tiny layers
    art = get_format("gptq").convert(resolve_source(folder), [recipe], tmp_path, ConvertOptions(verify=None))[0]
    layers = art.manifest["details"]["layers"]
    moe = [layer for layer in layers if "experts" in layer]
    calibration_tokens = SMALL_CALIB["calib_samples"] * SMALL_CALIB["calib_seqlen"]
    for layer in moe:  # 2 of 4 experts a token; every expert saw enough tokens for GPTQ
        assert sum(layer["experts"]["gate_up"]["tokens"]) == 2 * calibration_tokens
        assert layer["experts"]["gate_up"]["rtn_fallback"] == [] == layer["experts"]["down"]["rtn_fallback"]
        assert layer["experts"]["down"]["tokens"] == layer["experts"]["gate_up"]["tokens"]
    assert len(moe) == (1 if arch == "deepseek_v3" else 2)  # DeepSeek's first block is dense
    tensors = read_checkpoint(art.path)
    last = len(layers) - 1
    assert f"model.layers.{last}.mlp.experts.3.down_proj.qweight" in tensors and f"model.layers.{last}.mlp.gate.weight" in tensors
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in tensors)
    if arch == "deepseek_v3":
        assert f"model.layers.{last}.mlp.gate.e_score_correction_bias" in tensors
    # the float model with what the independent reader decodes
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            prefix, _, leaf = name.rpartition(".")
            if leaf in ("gate_up_proj", "down_proj") and prefix.endswith("mlp.experts"):
                for e in range(param.shape[0]):
                    parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
                    param[e] = torch.cat([torch.from_numpy(read_linear(tensors, f"{prefix}.{e}.{p}", 4)["weight"]) for p in parts])
            elif f"{prefix}.qweight" in tensors:
                param.copy_(torch.from_numpy(read_linear(tensors, prefix, 4)["weight"]))
            else:
                param.copy_(param.half().float())
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(buffer.half().float())
    tokens = AutoTokenizer.from_pretrained(folder)(shared_text("tinyshakespeare-en.txt", 2000))["input_ids"][:96]
    runtime = get_runtime("gptq")(art.main_file, n_ctx=128, threads=1)
    try:
        got = runtime.logits(tokens)
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].numpy()
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
        assert sum(type(m).__name__ == "PackedExperts" for m in runtime.model.modules()) == len(moe)
    finally:
        runtime.close()


def test_experts_with_too_few_tokens_are_rounded_to_nearest(tiny_model, tmp_path, monkeypatch):
    from test_gptq import SMALL_CALIB

    import quantkit.formats.gptq.sequential as sequential
    from quantkit.formats import ConvertOptions, get_format
    from quantkit.recipe import parse_recipe
    from quantkit.source import resolve_source

    monkeypatch.setattr(sequential, "MIN_EXPERT_TOKENS", 10**9)
    art = get_format("gptq").convert(resolve_source(tiny_model("qwen3_moe")), [parse_recipe("gptq:w4g32", SMALL_CALIB)], tmp_path,
                                     ConvertOptions(verify=None))[0]
    for layer in art.manifest["details"]["layers"]:
        assert layer["experts"]["gate_up"]["rtn_fallback"] == [0, 1, 2, 3] == layer["experts"]["down"]["rtn_fallback"]


@pytest.mark.parametrize("recipe,words", [("onnx:int4", "ONNX does not support mixtures of experts"),
                                          ("bnb:nf4", "bitsandbytes does not quantize the stacked experts")])
def test_formats_without_mixture_of_experts_support_say_so_in_one_line(recipe, words, tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "-q", "convert", str(tiny_model("qwen3_moe")), "--to", recipe,
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and words in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_multi_token_prediction_layer_is_left_out(tiny_copy, tmp_path):
    """DeepSeek-V3 and GLM-4.5 checkpoints carry a block past num_hidden_layers (MTP) that the
    forward pass never runs: the GGUF leaves it out instead of failing on its names."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = tiny_copy("deepseek_v3")
    weights = load_file(folder / "model.safetensors")
    last = max(int(n.split(".")[2]) for n in weights if n.startswith("model.layers."))
    extra = {n.replace(f"model.layers.{last}.", f"model.layers.{last + 1}."): v for n, v in weights.items()
             if n.startswith(f"model.layers.{last}.")}
    extra[f"model.layers.{last + 1}.eh_proj.weight"] = np.zeros((64, 128), dtype=np.float32)
    save_file({**weights, **extra}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    art = convert(folder, ["gguf:f16"], tmp_path, verify_tokens=256).artifacts[0]
    names = {t.name for t in gguf.GGUFReader(art.main_file).tensors}
    assert not any(n.startswith(f"blk.{last + 1}.") for n in names)
    assert art.manifest["details"]["verification"]["kld_mean"] < 1e-3
