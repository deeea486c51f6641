"""bitsandbytes recipes: a weightless artifact that transformers quantizes at load, profiled."""

from __future__ import annotations

import json

import pytest
from tiny_models import SHARED_DATA

from quantkit.api import convert, profile
from quantkit.errors import InputError, RecipeError
from quantkit.runtimes import get_runtime


@pytest.fixture(scope="module")
def bnb_artifacts(tiny_model, tmp_path_factory, verify_texts):
    out = tmp_path_factory.mktemp("bnb")
    arts = convert(tiny_model("llama"), ["bnb:int8", "bnb:nf4"], out, verify_texts=verify_texts).artifacts
    return {a.recipe: a for a in arts}


def test_artifact_names_source_and_config(bnb_artifacts, tiny_model):
    art = bnb_artifacts["bnb:nf4"]
    assert art.manifest["main_file"] == "bnb_config.json" and [f["path"] for f in art.manifest["files"]] == ["bnb_config.json"]
    config = json.loads(art.main_file.read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["source"]["fingerprint"] == art.manifest["source"]["fingerprint"]
    verification = art.manifest["details"]["verification"]
    assert all(v["match"] for v in verification["tokenization"].values())


def test_int8_is_closer_than_nf4(bnb_artifacts):
    v8 = bnb_artifacts["bnb:int8"].manifest["details"]["verification"]
    v4 = bnb_artifacts["bnb:nf4"].manifest["details"]["verification"]
    assert 0 < v8["kld_mean"] < v4["kld_mean"]
    eval_data = [str(SHARED_DATA / "tinyshakespeare-en.txt"), "code"]
    q8, q4 = (profile(bnb_artifacts[r].path, eval_data=eval_data, ctx=64, chunks=2, latency=False)["quality"]
              for r in ("bnb:int8", "bnb:nf4"))
    assert q8["kld_mean"] < q4["kld_mean"] and q8["top1_agreement"] >= q4["top1_agreement"]


def test_describe_sizes_quantized_weights(bnb_artifacts, tiny_model):
    runtime = get_runtime("bnb")
    d8, d4 = (runtime.describe(bnb_artifacts[r].main_file) for r in ("bnb:int8", "bnb:nf4"))
    assert d4["tensor_bytes"] < d8["tensor_bytes"]
    # float32 source: loading keeps the mapped pages of the Linears it quantizes, while the float32
    # embedding is used as it is (its pages are the tensor, counted once in tensor_bytes)
    source_bytes = sum(f.stat().st_size for f in tiny_model("llama").glob("*.safetensors"))
    embedding = runtime.describe_weights(bnb_artifacts["bnb:int8"].main_file)["embedding_bytes"]
    assert embedding > 0 and 0 < d8["load_transient_bytes"] <= source_bytes - embedding
    assert d8["runtime_overhead_bytes"] > 0  # the HF tokenizer's tables
    assert d8["kv_bytes_per_element"] == 4


def test_bad_inputs(bnb_artifacts, tiny_model, tmp_path):
    with pytest.raises(RecipeError, match="known: int8, nf4"):
        convert(tiny_model("llama"), ["bnb:int3"], tmp_path)
    gguf_art = convert(tiny_model("llama"), ["gguf:f16"], tmp_path, verify=False).artifacts[0]
    with pytest.raises(InputError, match="bitsandbytes quantizes an HF checkpoint"):
        convert(gguf_art.main_file, ["bnb:int8"], tmp_path)
    with pytest.raises(RecipeError, match="--damp"):
        convert(tiny_model("llama"), ["bnb:int8"], tmp_path, recipe_options={"damp": 0.1})
