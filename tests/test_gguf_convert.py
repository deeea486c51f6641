"""HF -> GGUF on tiny models of every architecture, checked against transformers by llama.cpp."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from quantkit.api import convert
from quantkit.artifact import sha256_file

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "llama3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_float_gguf_matches_transformers(arch, tiny_model, tmp_path, verify_texts):
    result = convert(tiny_model(arch), ["gguf:f32", "gguf:f16", "gguf:q8_0"], tmp_path, verify_texts=verify_texts, verify_tokens=1024)
    by_recipe = {a.recipe: a for a in result.artifacts}
    for recipe in ("gguf:f32", "gguf:f16"):
        v = by_recipe[recipe].manifest["details"]["verification"]
        assert v["tokens_scored"] >= 1000
        assert v["kld_mean"] < 1e-3, (recipe, v)
        assert v["tokenization"]["en"]["match"] and v["tokenization"]["zh"]["match"]
    # f32 is bit-exact with the float32 reference up to kernel rounding: much tighter than f16
    assert by_recipe["gguf:f32"].manifest["details"]["verification"]["kld_mean"] < 1e-5
    q8 = by_recipe["gguf:q8_0"].manifest["details"]["verification"]
    assert 0 < q8["kld_mean"] < 0.05


def test_tensor_types_and_metadata(tiny_model, tmp_path):
    art = convert(tiny_model("qwen3"), ["gguf:f16"], tmp_path, verify=False).artifacts[0]
    reader = gguf.GGUFReader(art.main_file)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    assert reader.fields["qwen3.attention.key_length"].contents() == 32
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert "im_start" in reader.fields["tokenizer.chat_template"].contents()
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == sha256_file(art.main_file)
    assert manifest["recipe"] == {"format": "gguf", "scheme": "f16", "options": {}}


def test_same_input_same_bytes(tiny_model, tmp_path):
    a = convert(tiny_model("llama"), ["gguf:f16", "gguf:q4_0"], tmp_path / "a", verify=False).artifacts
    b = convert(tiny_model("llama"), ["gguf:f16", "gguf:q4_0"], tmp_path / "b", verify=False).artifacts
    for x, y in zip(a, b, strict=True):
        assert sha256_file(x.main_file) == sha256_file(y.main_file)
        assert (x.path / "manifest.json").read_bytes() == (y.path / "manifest.json").read_bytes()


def test_sharded_checkpoint_converts_identically(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("qwen2")
    sharded = tmp_path / "sharded" / src.name  # same folder name: general.name is the same
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # as they are: transformers 5
        if (src / name).is_file():  # re-saves a tokenizer with the defaults of its class filled in
            shutil.copyfile(src / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    one = convert(src, ["gguf:f16"], tmp_path / "one", verify=False).artifacts[0]
    many = convert(sharded, ["gguf:f16"], tmp_path / "many", verify=False).artifacts[0]
    assert sha256_file(one.main_file) == sha256_file(many.main_file)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_is_read_exactly(dtype, tiny_model, tmp_path):
    """The streaming reader decodes F16/BF16 safetensors itself (plain reads, no torch): every
    value must equal torch's own widening to float32."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model("llama")
    half = tmp_path / dtype / src.name
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype))
    model.save_pretrained(half)
    AutoTokenizer.from_pretrained(src).save_pretrained(half)
    art = convert(half, ["gguf:f32"], tmp_path / "out", verify=False).artifacts[0]
    tensors = {t.name: t for t in gguf.GGUFReader(art.main_file).tensors}
    state = model.state_dict()
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"), ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")):
        expected = state[hf_name].to(torch.float32).numpy()
        got = np.asarray(tensors[gguf_name].data).reshape(expected.shape)
        assert np.array_equal(got, expected), gguf_name


def test_gguf_source_is_requantized(tiny_model, tmp_path):
    f16 = convert(tiny_model("llama"), ["gguf:f16"], tmp_path / "a", verify=False).artifacts[0]
    q = convert(f16.main_file, ["gguf:q4_0", "gguf:q8_0"], tmp_path / "b").artifacts
    types = {a.recipe: gguf.GGUFReader(a.main_file).fields["general.file_type"].contents() for a in q}
    assert types == {"gguf:q4_0": int(gguf.LlamaFileType.MOSTLY_Q4_0), "gguf:q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    assert q[0].manifest["source"]["kind"] == "gguf"
    assert q[0].file_bytes < f16.file_bytes


def test_every_listed_quant_type_loads(tiny_model, tmp_path):
    """Each recipe in the table gives a file llama.cpp reports with the matching file type and
    runs (the i-quants quantized with an importance matrix computed on the way)."""
    import llama_cpp

    from quantkit.formats.gguf.quantize import QUANT_SCHEMES

    recipes = [f"gguf:{s}" for s in QUANT_SCHEMES]
    arts = convert(tiny_model("qwen2"), recipes, tmp_path, verify=False).artifacts
    assert [a.recipe for a in arts] == recipes
    for art in arts:
        reader = gguf.GGUFReader(art.main_file)
        assert reader.fields["general.file_type"].contents() == int(QUANT_SCHEMES[art.manifest["recipe"]["scheme"]])
        llm = llama_cpp.Llama(str(art.main_file), n_ctx=64, verbose=False, logits_all=True)
        assert llm.n_vocab() == reader.fields["tokenizer.ggml.tokens"].data.__len__()
        tokens = llm.tokenize(b"The cat sat on the mat")
        llm.eval(tokens)  # it computes: finite logits for every position (i-quants with the imatrix too)
        assert np.isfinite(llm.scores[: len(tokens)]).all()
        llm.close()


def test_full_disk_is_one_line_error(tiny_model, tmp_path, monkeypatch, capsys):
    import errno

    import quantkit.formats.gguf as gguf_format
    from quantkit.cli import main

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(gguf_format, "quantize_gguf", no_space)
    code = main(["-q", "convert", str(tiny_model("llama")), "--to", "gguf:q4_0", "-o", str(tmp_path / "out"), "--no-verify"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "No space left on device" in err and err.count("\n") == 1
    assert not any((tmp_path / "out").iterdir())


def test_rope_settings_read_from_either_config_layout():
    """transformers 4 wrote rope_theta / rope_scaling / rope_local_base_freq at the top level;
    transformers 5 writes rope_parameters, flat or keyed by layer type (Gemma 3)."""
    from quantkit.source import rope_parameters

    v4_llama3 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    v5_llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}
    assert rope_parameters(v4_llama3) == rope_parameters(v5_llama3) == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    v4_gemma3 = {"rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rope_scaling": None}
    v5_gemma3 = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    for layer, theta in (("full_attention", 1e6), ("sliding_attention", 10000.0)):
        assert rope_parameters(v4_gemma3, layer) == rope_parameters(v5_gemma3, layer) == {"rope_type": "default", "rope_theta": theta}
    assert rope_parameters({}) == {"rope_type": "default", "rope_theta": 10000.0}
    assert rope_parameters({"rope_scaling": {"type": "linear", "factor": 2.0}})["rope_type"] == "linear"  # old key name


def test_builder_gets_flat_rope_settings_from_a_transformers_5_gemma3_config():
    from transformers import Gemma3TextConfig

    from quantkit.formats.onnx.builder import adapt_config

    config = Gemma3TextConfig(rope_theta=1e6, rope_local_base_freq=10000.0)
    assert "full_attention" in config.rope_parameters  # the per-layer-type layout the builder cannot read
    assert adapt_config(config)
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 10000.0
    assert config.rope_parameters["rope_type"] == "default" and config.rope_parameters["rope_theta"] == 1e6
