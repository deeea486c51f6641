"""GPTQ: the algorithm against round-to-nearest, the v1 checkpoint read back by an independent
unpacker, the dequantizing runtime, recipes and configs, on tiny models."""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from quantkit.calibration import (
    CALIB_CODE_MODULES,
    calibration_texts,
    calibration_windows,
)
from quantkit.errors import InputError, RecipeError, UnsupportedArchitectureError
from quantkit.formats import ConvertOptions, get_format
from quantkit.formats.gptq import quantize_source, write_quantized
from quantkit.formats.gptq.algorithm import (
    HessianAccumulator,
    QuantGrid,
    gptq_quantize,
    rtn_quantize,
)
from quantkit.profile.corpus import _CODE_MODULES, default_texts
from quantkit.profile.quality import kl_divergence
from quantkit.recipe import parse_recipe
from quantkit.runtimes import get_runtime
from quantkit.runtimes.stream import LayerStream
from quantkit.source import Source, resolve_source

SMALL_CALIB = {"calib_samples": 8, "calib_seqlen": 64}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the tiny matrices are far faster on one thread than on contended cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- an independent reader of the v1 layout, written from the format description ---------------
def _unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """int32 [n*bits/32, m], each column a little-endian bit stream of n ``bits``-bit values."""
    columns = np.ascontiguousarray(words.astype("<i4").T)  # [m, words]
    stream = np.unpackbits(columns.view(np.uint8), axis=1, bitorder="little")  # bit j of word w at w*32+j
    values = stream[:, : n * bits].reshape(columns.shape[0], n, bits).astype(np.int64)
    return (values << np.arange(bits)).sum(axis=2).T  # [n, m]


def read_linear(tensors: dict[str, np.ndarray], prefix: str, bits: int) -> dict[str, np.ndarray]:
    g_idx = tensors[f"{prefix}.g_idx"].astype(np.int64)
    scales = tensors[f"{prefix}.scales"]
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    assert qweight.dtype == qzeros.dtype == np.int32 and scales.dtype == np.float16 and tensors[f"{prefix}.g_idx"].dtype == np.int32
    n_in, n_out = g_idx.shape[0], qweight.shape[1]
    assert qweight.shape == (n_in * bits // 32, n_out) and qzeros.shape == (scales.shape[0], n_out * bits // 32)
    codes = _unpack(qweight, bits, n_in).T  # [out, in]
    zeros = _unpack(qzeros.T, bits, n_out).T + 1  # stored minus one (v1)
    weight = (codes - zeros[g_idx].T) * scales.astype(np.float64)[g_idx].T
    return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": g_idx, "weight": weight}


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def float_model_like_checkpoint(source_folder: Path, folder: Path, bits: int):
    """The source model with every quantized weight replaced by what the independent reader
    decodes, and every other tensor rounded through float16 as the checkpoint stores it."""
    from transformers import AutoModelForCausalLM

    tensors = read_checkpoint(folder)
    model = AutoModelForCausalLM.from_pretrained(source_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            prefix = name.rpartition(".")[0]
            if f"{prefix}.qweight" in tensors and name.endswith(".weight"):
                param.copy_(torch.from_numpy(read_linear(tensors, prefix, bits)["weight"]))
            else:
                param.copy_(param.half().float())
    return model


def _logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].numpy()


def _text_tokens(tokenizer, n: int = 96) -> list[int]:
    return tokenizer(default_texts()["en"], add_special_tokens=False)["input_ids"][:n]


def _convert(source_folder: Path, schemes: list[str], out: Path, **options) -> list:
    recipes = [parse_recipe(f"gptq:{s}", {**SMALL_CALIB, **options}) for s in schemes]
    return get_format("gptq").convert(resolve_source(source_folder), recipes, out, ConvertOptions(verify=None))


# -- the algorithm -------------------------------------------------------------------------------
def _correlated_layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 24, generator=gen) @ torch.randn(24, 128, generator=gen) + 0.1 * torch.randn(4096, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen)
    acc = HessianAccumulator(128)
    for chunk in x.split(1000):
        acc.add(chunk)
    return w, x, acc.hessian


def test_hessian_is_two_over_n_xtx():
    w, x, h = _correlated_layer()
    assert torch.allclose(h, 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("grid", [QuantGrid(4, 32), QuantGrid(3, -1), QuantGrid(4, 128, sym=False), QuantGrid(2, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_layer_output_better_than_rtn(grid, act_order):
    w, x, h = _correlated_layer()
    rtn = rtn_quantize(w, grid)
    gptq = gptq_quantize(w, h, grid, act_order=act_order)
    err_rtn = ((w - rtn.dequantized) @ x.T).norm()
    err_gptq = ((w - gptq.dequantized) @ x.T).norm()
    assert err_gptq < 0.5 * err_rtn
    # GPTQ's running loss (Σ of the OBS errors) is the same error measured with the damped
    # Hessian H + λI: ½ tr(ΔW (H + λI) ΔWᵀ) = ‖ΔW Xᵀ‖² / n + λ/2 ‖ΔW‖²
    damp = 0.01 * torch.diag(h).mean()
    expected = err_gptq**2 / x.shape[0] + damp / 2 * (w - gptq.dequantized).pow(2).sum()
    assert gptq.loss == pytest.approx(float(expected), rel=1e-3)
    # both on one grid: codes in range, dequantized = (codes - zero) * scale of the column's group
    assert int(gptq.codes.max()) <= grid.maxq and gptq.zeros.min() >= 1
    deq = (gptq.codes.float() - gptq.zeros[gptq.g_idx.long()].T) * gptq.scales[gptq.g_idx.long()].T
    assert torch.equal(deq, gptq.dequantized)


def test_act_order_groups_follow_the_hessian_and_static_groups_stay_in_place():
    w, x, h = _correlated_layer()
    grid = QuantGrid(4, 32)
    ordered = gptq_quantize(w, h, grid, act_order=True)
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    assert torch.equal(ordered.g_idx[order].long(), torch.arange(128) // 32)
    static = gptq_quantize(w, h, grid, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(128) // 32)
    assert torch.equal(static.scales, rtn_quantize(w, grid).scales)  # grids from the original weights


@pytest.mark.parametrize("sym", [True, False])
def test_grid_covers_rows_without_negative_weights(sym):
    # v1 stores zero - 1, so an asymmetric zero of 0 would wrap; a symmetric grid must not clip
    w = torch.rand(8, 64, generator=torch.Generator().manual_seed(1)) + 0.5
    q = rtn_quantize(w, QuantGrid(4, 32, sym=sym))
    assert int(q.zeros.min()) >= 1
    step = q.scales[q.g_idx.long()].T
    assert torch.all((q.dequantized - w).abs() <= step / 2 * 1.01)  # fp16 scales: a hair over half a step


def test_singular_hessian_gets_more_dampening():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    q = gptq_quantize(w, torch.ones(64, 64), QuantGrid(4, 32), damp=1e-9)  # rank one
    assert q.damp > 1e-9 and torch.isfinite(q.dequantized).all()


def test_dead_inputs_are_zeroed():
    w, x, _ = _correlated_layer()
    x[:, 5] = 0
    h = 2 / x.shape[0] * x.T @ x
    q = gptq_quantize(w, h, QuantGrid(4, 32))
    assert torch.all(q.dequantized[:, 5] == 0)


# -- the checkpoint, read back independently -------------------------------------------------------
@pytest.mark.parametrize(
    "arch,scheme,options",
    [
        ("llama", "w4g32", {}),
        ("llama", "w4g32", {"act_order": True}),
        ("qwen2", "w4g64", {"sym": False}),
        ("qwen2", "w4g32", {"sym": False, "act_order": True, "static_groups": True}),
        ("gemma3", "w8g-1", {}),
        ("llama", "w3g32", {"act_order": True}),
        ("qwen3", "w3g64", {"sym": False}),
        ("llama", "w2g32", {}),
        ("llama", "w4g32-rtn", {"sym": False}),
    ],
)
def test_independent_reader_matches_algorithm(tiny_model, tmp_path, arch, scheme, options):
    source = resolve_source(tiny_model(arch))
    recipe = parse_recipe(f"gptq:{scheme}", {**SMALL_CALIB, **options})
    bits, group_size = (int(v) for v in re.match(r"w(\d)g(-?\d+)", scheme).groups())
    codes, runs_on = {}, []

    def collect(step, block_codes):
        codes.update(block_codes)
        for name, q in block_codes.items():  # the engine runs the next blocks' inputs through these
            short = name.split(f".{step.index}.", 1)[1]
            runs_on.append(torch.equal(step.block.get_submodule(short).weight, q.dequantized))

    quantize_source(source, recipe, LayerStream(source), collect)
    write_quantized(tmp_path, source, recipe)
    tensors = read_checkpoint(tmp_path)
    assert len(codes) == 7 * 2 and all(runs_on)
    for name, q in codes.items():
        got = read_linear(tensors, name, bits)
        assert f"{name}.weight" not in tensors
        assert np.array_equal(got["codes"], q.codes.numpy()) and np.array_equal(got["zeros"], q.zeros.numpy())
        assert np.array_equal(got["scales"], q.scales.numpy().astype(np.float16))
        assert np.array_equal(got["g_idx"], q.g_idx.numpy())
        assert np.array_equal(got["weight"].astype(np.float32), q.dequantized.numpy())
        if options.get("sym", True):
            assert np.all(got["zeros"] == 1 << (bits - 1))
        n_in = got["g_idx"].shape[0]
        if group_size == -1:
            assert got["scales"].shape[0] == 1 and np.all(got["g_idx"] == 0)
        elif not options.get("act_order") or options.get("static_groups"):
            assert np.array_equal(got["g_idx"], np.arange(n_in) // group_size)
        else:
            assert not np.all(np.diff(got["g_idx"]) >= 0)  # permuted
            assert np.all(np.bincount(got["g_idx"]) == group_size)
    with source.open_tensors() as reader:
        assert np.array_equal(tensors["model.norm.weight"], reader.get("model.norm.weight").astype(np.float16))
    tied = arch == "gemma3"
    assert ("lm_head.weight" in tensors) != tied and tensors["model.embed_tokens.weight"].dtype == np.float16


# -- the artifact and the runtime -------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_artifacts(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq")
    arts = _convert(tiny_model("llama"), ["w4g32", "w8g-1", "w4g32-rtn"], out, act_order=True)
    return {a.manifest["recipe"]["scheme"]: a for a in arts}


def test_runtime_logits_equal_float_model_with_dequantized_weights(llama_artifacts, tiny_model):
    from transformers import AutoModelForCausalLM

    art = llama_artifacts["w4g32"]
    runtime = get_runtime("gptq")(art.main_file, n_ctx=128, threads=1)
    tokens = _text_tokens(runtime.tokenizer)
    got = runtime.logits(tokens)
    expected = _logits(float_model_like_checkpoint(tiny_model("llama"), art.path, 4), tokens)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    original = _logits(AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32), tokens)
    assert np.abs(got - original).max() > 0.05
    timed = runtime.generate_timed(tokens[:8], 4)
    assert timed["prefill_s"] > 0 and timed["decode_s"] > 0
    described = runtime.describe(art.main_file)
    assert described["n_layers"] == 2 and described["n_embd"] == 64
    # the runtime holds the checkpoint's packed tensors, embedding and head as stored, the rest in
    # float32 (the embedding's weight is the float32 rows of the last call's ids only)
    embed = runtime.model.model.embed_tokens
    assert embed.table16.dtype == torch.float16 and embed.weight.shape[0] == 1  # the last call decoded one token
    held = sum(t.numel() * t.element_size() for t in [*runtime.model.parameters(), *runtime.model.buffers()]) - embed.weight.nbytes
    rotary = sum(b.numel() * b.element_size() for n, b in runtime.model.named_buffers() if "rotary" in n)
    assert described["tensor_bytes"] == held - rotary
    linears = [m for m in runtime.model.modules() if type(m).__name__ == "PackedLinear"]
    assert len(linears) == 7 * 2 and not any(isinstance(m, torch.nn.Linear) and "layers" in n
                                             for n, m in runtime.model.named_modules())
    runtime.close()


def test_eight_bits_is_close_and_rtn_four_bits_is_not(llama_artifacts, tiny_model):
    from quantkit.runtimes.torch import TorchReference

    reference = TorchReference(resolve_source(tiny_model("llama")), threads=1)
    tokens = _text_tokens(reference.tokenizer, 128)
    (ref,) = reference.logits([tokens])
    kld = {}
    for scheme in ("w8g-1", "w4g32", "w4g32-rtn"):
        runtime = get_runtime("gptq")(llama_artifacts[scheme].main_file, n_ctx=256, threads=1)
        kld[scheme] = float(kl_divergence(ref, runtime.logits(tokens)).mean())
        runtime.close()
    assert kld["w8g-1"] < 0.01
    assert kld["w4g32-rtn"] > 10 * kld["w8g-1"]
    assert kld["w4g32"] < kld["w4g32-rtn"]


def test_configs_and_manifest(llama_artifacts):
    from transformers import AutoConfig

    art = llama_artifacts["w4g32"]
    config = json.loads((art.path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True, "damp_percent": 0.01,
        "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
    }
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["LlamaForCausalLM"]
    quantize = json.loads((art.path / "quantize_config.json").read_text())
    assert quantize["model_file_base_name"] == "model" and quantize["desc_act"] is True and quantize["bits"] == 4
    assert AutoConfig.from_pretrained(art.path).quantization_config["quant_method"] == "gptq"
    files = [f["path"] for f in art.manifest["files"]]
    assert {"model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(files)
    assert art.manifest["main_file"] == "config.json" and art.main_file.name == "config.json"
    details = art.manifest["details"]
    assert details["calibration"]["tokens"] == 8 * 64 and details["calibration"]["samples"] == 8
    assert [layer["layer"] for layer in details["layers"]] == [0, 1] and all(layer["gptq_loss_mean"] > 0 for layer in details["layers"])
    assert art.manifest["recipe"]["options"] == {
        "act_order": True, "calib": None, "calib_samples": 8, "calib_seqlen": 64, "damp": 0.01, "seed": 0,
        "static_groups": False, "sym": True,
    }
    rtn = llama_artifacts["w4g32-rtn"]
    assert rtn.manifest["recipe"]["options"] == {"sym": True}
    assert json.loads((rtn.path / "config.json").read_text())["quantization_config"]["desc_act"] is False


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


def test_conversion_is_deterministic(tiny_model, tmp_path, llama_artifacts):
    again = _convert(tiny_model("llama"), ["w4g32"], tmp_path, act_order=True)[0]
    first = llama_artifacts["w4g32"]
    assert _hashes(again.path) == _hashes(first.path)
    # the manifest too (no timings in it): same input and recipe, same bytes
    assert (again.path / "manifest.json").read_bytes() == (first.path / "manifest.json").read_bytes()
    other_seed = _convert(tiny_model("llama"), ["w4g32"], tmp_path / "seed1", act_order=True, seed=1)[0]
    assert _hashes(other_seed.path)["model.safetensors"] != _hashes(first.path)["model.safetensors"]


def test_sharded_checkpoint_loads(tiny_model, tmp_path, monkeypatch):
    import quantkit.formats.gptq as gptq

    single = _convert(tiny_model("qwen2"), ["w4g32-rtn"], tmp_path / "one")[0]
    monkeypatch.setattr(gptq, "MAX_SHARD_BYTES", 60_000)
    sharded = _convert(tiny_model("qwen2"), ["w4g32-rtn"], tmp_path / "many")[0]
    names = sorted(p.name for p in sharded.path.glob("model*.safetensors"))
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert read_checkpoint(sharded.path).keys() == read_checkpoint(single.path).keys()
    runtimes = [get_runtime("gptq")(a.main_file, n_ctx=64, threads=1) for a in (single, sharded)]
    tokens = _text_tokens(runtimes[0].tokenizer, 32)
    assert np.array_equal(runtimes[0].logits(tokens), runtimes[1].logits(tokens))


# -- calibration ------------------------------------------------------------------------------------
def test_calibration_is_seeded_mixed_and_apart_from_evaluation(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("llama"))
    texts = calibration_texts()
    windows, counts = calibration_windows(tokenizer, texts, n_samples=20, seqlen=48, seed=3)
    again, _ = calibration_windows(tokenizer, texts, n_samples=20, seqlen=48, seed=3)
    other, _ = calibration_windows(tokenizer, texts, n_samples=20, seqlen=48, seed=4)
    assert windows == again and windows != other
    assert counts == {"code": 7, "en": 9, "zh": 4}
    assert all(len(w) == 48 and w[0] == tokenizer.bos_token_id for w in windows)
    assert len(texts["zh"]) >= 1500
    # nothing the profiler evaluates on is calibrated on
    assert not set(CALIB_CODE_MODULES) & set(_CODE_MODULES)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all((stdlib / name).is_file() for name in CALIB_CODE_MODULES)
    joined = "\n".join(texts.values())
    for eval_text in default_texts().values():
        chunks = [eval_text[i : i + 30] for i in range(0, len(eval_text) - 30, 30)]
        assert not any(chunk in joined for chunk in chunks)


def test_calibration_file_option(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "calib.txt"
    path.write_text("short text. " * 3, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    windows, counts = calibration_windows(tokenizer, calibration_texts(path), n_samples=3, seqlen=64, seed=0)
    assert counts == {"file": 3} and all(len(w) == 64 for w in windows)  # a short text repeats
    with pytest.raises(InputError, match="cannot read calibration text"):
        calibration_texts(tmp_path / "missing.txt")


# -- recipes and inputs -------------------------------------------------------------------------------
def test_recipe_parsing():
    fmt = get_format("gptq")
    recipe = parse_recipe("gptq:w4g128", {"damp": 0.05, "act_order": True, "calib_samples": None})
    assert dict(recipe.options) == {
        "act_order": True, "calib": None, "calib_samples": 128, "calib_seqlen": 512, "damp": 0.05, "seed": 0,
        "static_groups": False, "sym": True,
    }
    assert parse_recipe("gptq:W8G-1").scheme == "w8g-1"
    assert dict(parse_recipe("gptq:w3g64-rtn", {"sym": False, "damp": 0.1}).options) == {"sym": False}
    for bad in ("w5g128", "w4g100", "q4_k_m", "w4", "w4g128-awq"):
        with pytest.raises(RecipeError, match=r"w\{bits\}g\{group\}"):
            parse_recipe(f"gptq:{bad}")
    with pytest.raises(RecipeError, match="unknown GPTQ option 'bogus'"):
        fmt.parse_recipe("w4g128", {"bogus": 1})
    for options, message in [
        ({"damp": 2}, "damp=2"),
        ({"damp": True}, "damp=True"),
        ({"sym": "yes"}, "true or false"),
        ({"calib_samples": 0}, "integer >= 1"),
        ({"calib": "/no/such/calibration.txt"}, "no such file"),
    ]:
        with pytest.raises(RecipeError, match=message):
            fmt.parse_recipe("w4g128", options)
    assert "damp" in fmt.option_names() and "calib" in fmt.option_names()


def test_unusable_sources(tiny_copy, tmp_path):
    fmt = get_format("gptq")
    recipe = parse_recipe("gptq:w4g128-rtn")
    gguf = Source("gguf", tmp_path / "m.gguf", str(tmp_path / "m.gguf"), "m", weight_format="gguf")
    with pytest.raises(InputError, match="HF checkpoint folder, not a gguf file"):
        fmt.convert(gguf, [recipe], tmp_path, ConvertOptions(verify=None))
    folder = tiny_copy("llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'phi3'"):
        fmt.convert(resolve_source(folder), [recipe], tmp_path, ConvertOptions(verify=None))
    assert not list(tmp_path.glob("*gptq*"))


def test_streaming_shard_writer_writes_what_safetensors_writes(tmp_path):
    """The writer spools one tensor at a time; its files must be byte for byte what
    ``safetensors.torch.save_file`` writes for the same tensors (mixed dtypes, shards)."""
    from safetensors.torch import save_file

    from quantkit.formats.gptq.writer import SafetensorsShardWriter

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.qweight": torch.randint(-2**31, 2**31 - 1, (8, 6), dtype=torch.int32, generator=gen),
        "a.scales": torch.randn(3, 5, generator=gen).half(),
        "c.bias": torch.randn(7, generator=gen),
        "a.g_idx": torch.arange(9, dtype=torch.int32),
        "d.flags": torch.tensor([True, False]),
        "e.bf": torch.randn(4, 4, generator=gen).bfloat16(),
        "f.ids": torch.arange(3, dtype=torch.int64),
        "g.empty": torch.zeros(0, 4, dtype=torch.float16),
    }
    writer = SafetensorsShardWriter(tmp_path / "one", max_shard_bytes=10**9)
    (tmp_path / "one").mkdir()
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert writer.close() == ["model.safetensors"]
    save_file(tensors, str(tmp_path / "expected.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()
    # shards: each file is what save_file writes for its own tensors; no spool file stays behind
    (tmp_path / "many").mkdir()
    writer = SafetensorsShardWriter(tmp_path / "many", max_shard_bytes=200)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    weight_map = json.loads((tmp_path / "many" / files[-1]).read_text())["weight_map"]
    for file in files[:-1]:
        names = [n for n, f in weight_map.items() if f == file]
        save_file({n: tensors[n] for n in names}, str(tmp_path / "shard.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "many" / file).read_bytes() == (tmp_path / "shard.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted(files)
    with pytest.raises(Exception, match="after close"):
        writer.add("late", torch.zeros(1))
