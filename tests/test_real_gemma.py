"""The real Gemma 3 270M (embedded default model): tokenizer, F16 logits, quantized outputs."""

from __future__ import annotations

import gguf
import pytest
from tiny_models import shared_text

from quantkit.api import convert
from quantkit.embedded import default_gguf_path, default_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def texts():
    return {"en": shared_text("tinyshakespeare-en.txt", 60_000), "zh": shared_text("hongloumeng-zh.txt", 30_000)}


def test_rebuilt_tokenizer_matches_llamacpp(gemma_dir, texts):
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(gemma_dir)
    llm = llama_cpp.Llama(str(default_gguf_path()), vocab_only=True, verbose=False)
    for text in texts.values():
        ours = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours
    assert hf("Hello world")["input_ids"] == [2, 9259, 1902]  # <bos> Hello ▁world


@pytest.fixture(scope="module")
def converted(gemma_dir, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma-out")
    result = convert(None, ["gguf:f16", "gguf:q8_0", "gguf:q4_k_m", "gguf:q2_k"], out, verify_texts=texts, verify_tokens=2048)
    return {a.recipe: a for a in result.artifacts}


def test_f16_matches_transformers_on_2048_tokens(converted):
    v = converted["gguf:f16"].manifest["details"]["verification"]
    assert v["tokens_scored"] >= 2048
    assert v["kld_mean"] < 1e-3
    assert v["tokenization"]["en"]["match"] and v["tokenization"]["zh"]["match"]
    assert v["tokenization"]["en"]["tokens"] > 10_000


def test_quantized_outputs_are_smaller_and_close(converted):
    f16, q8, q4 = (converted[r] for r in ("gguf:f16", "gguf:q8_0", "gguf:q4_k_m"))
    assert q4.file_bytes < q8.file_bytes < f16.file_bytes
    for art in (q8, q4):
        v = art.manifest["details"]["verification"]
        assert 0 < v["kld_mean"] < 0.1 and v["top1_agreement"] > 0.85
        assert v["kld_limit"] is None  # quantized outputs report KLD, they are not held to F16's limit
    ftype = gguf.GGUFReader(q4.main_file).fields["general.file_type"].contents()
    assert ftype == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_packaged_gguf_requantizes(tmp_path):
    art = convert(default_gguf_path(), ["gguf:q4_0"], tmp_path).artifacts[0]
    assert art.manifest["source"]["kind"] == "gguf"
    assert "not compared" in art.manifest["details"]["verification"]["logits"]
    assert gguf.GGUFReader(art.main_file).fields["general.architecture"].contents() == "gemma3"


def test_profile_orders_q8_q4km_q2k(converted, tmp_path):
    """A measured ordering on real text, per the profiler (not asserted from the type names)."""
    import json

    from tiny_models import SHARED_DATA

    from quantkit.api import profile

    data = [str(SHARED_DATA / "tinyshakespeare-en.txt"), str(SHARED_DATA / "hongloumeng-zh.txt"), "code"]
    reports = {r: profile(converted[r].path, eval_data=data, chunks=1, profiles=["host"])
               for r in ("gguf:q8_0", "gguf:q4_k_m", "gguf:q2_k")}
    q = {r: rep["quality"] for r, rep in reports.items()}
    assert q["gguf:q8_0"]["kld_mean"] < q["gguf:q4_k_m"]["kld_mean"] < q["gguf:q2_k"]["kld_mean"]
    assert q["gguf:q8_0"]["top1_agreement"] > q["gguf:q4_k_m"]["top1_agreement"] > q["gguf:q2_k"]["top1_agreement"]
    assert q["gguf:q8_0"]["tokens"] == 3 * 255
    for rep in reports.values():  # the memory model (weights read once + vocab + KV + compute)
        assert abs(rep["memory"]["predicted_error_pct"]) < 15, rep["memory"]
        assert 0 < rep["host"]["decode_roofline_fraction"] < 1.5
    # the host estimate calibrated on another artifact's run is compared with a measurement in
    # benchmarks/host_estimate.py (speed depends on the machine's load); here, what cannot
    # change with load: q8_0's measured efficiencies carry over to q4_k_m's host estimate (other
    # profiles are calibrated on their published measurements instead)
    (tmp_path / "q8.json").write_text(json.dumps(reports["gguf:q8_0"]))
    host = profile(converted["gguf:q4_k_m"].path, quality=False, latency=False, profiles=["host"],
                   calibrate_from=tmp_path / "q8.json")
    efficiency = host["targets"][0]["efficiency"]
    assert efficiency["decode"] == pytest.approx(reports["gguf:q8_0"]["host"]["efficiency"]["decode"])
    assert "q8.json" in efficiency["calibrated_on"]


def test_onnx_int8_and_int4_profile_next_to_gguf(tmp_path):
    """Gemma 3 270M through onnxruntime-genai's builder: verified against transformers,
    and int8 loses less than int4, measured by the profiler (latency through onnxruntime_genai)."""
    from quantkit.api import profile

    result = convert(None, ["onnx:int8", "onnx:int4"], tmp_path, verify_tokens=512)
    reports = {a.recipe: profile(a.path, eval_data=["en", "zh"], chunks=1) for a in result.artifacts}
    int8, int4 = reports["onnx:int8"], reports["onnx:int4"]
    assert 0 < int8["quality"]["kld_mean"] < int4["quality"]["kld_mean"]
    assert int8["quality"]["top1_agreement"] > int4["quality"]["top1_agreement"]
    for report in reports.values():
        assert report["latency"]["decode_tokens_per_s"]["median"] > 0
        assert report["host"]["decode_roofline_fraction"] > 0
        # the formula counts the HF tokenizer's tables (~300 MB for Gemma's 262k vocabulary)
        assert abs(report["memory"]["predicted_error_pct"]) < 15, report["memory"]


def test_ascend_compatibility_of_gemma_artifacts(converted, tmp_path):
    """ascend-310p: K-quants and MatMulNBits are out, Q4_0 and static fp16 ONNX are in; the
    other targets say whether Gemma fits and how fast it should run."""
    from quantkit.api import profile

    arts = dict(converted)
    arts.update({a.recipe: a for a in convert(None, ["gguf:q4_0", "onnx:int4"], tmp_path, verify=False).artifacts})
    static = convert(None, ["onnx:fp16"], tmp_path / "static", verify=False, recipe_options={"static_shapes": True, "static_seqlen": 256})
    arts["onnx:fp16-static"] = static.artifacts[0]
    targets = ["ascend-310p", "rtx-4060-8gb", "raspberry-pi-5-8gb"]
    out = {r: {t["name"]: t for t in profile(arts[r].path, quality=False, latency=False, ctx=256, profiles=targets)["targets"]}
           for r in ("gguf:q4_k_m", "gguf:q4_0", "onnx:int4", "onnx:fp16-static")}
    ascend = {r: t["ascend-310p"] for r, t in out.items()}
    assert not ascend["gguf:q4_k_m"]["compatible"] and "quant type" in ascend["gguf:q4_k_m"]["reasons"][0]
    assert ascend["gguf:q4_0"]["compatible"]
    assert not ascend["onnx:int4"]["compatible"]
    assert any("MatMulNBits" in r for r in ascend["onnx:int4"]["reasons"])
    assert any(r.startswith("dynamic shapes") for r in ascend["onnx:int4"]["reasons"])
    assert ascend["onnx:fp16-static"]["compatible"], ascend["onnx:fp16-static"]["reasons"]
    assert "--soc_version=Ascend310P3" in ascend["onnx:fp16-static"]["compile_command"]
    for r, per_target in out.items():
        for name, t in per_target.items():
            assert t["fits"] and t["max_ctx"] >= 256 and t["estimated"], (r, name)
            assert t["decode_tokens_per_s"] > 0
    # more bandwidth, faster decoding: the RTX 4060 estimate beats the Raspberry Pi's
    q4 = out["gguf:q4_0"]
    assert q4["rtx-4060-8gb"]["decode_tokens_per_s"] > 5 * q4["raspberry-pi-5-8gb"]["decode_tokens_per_s"]


def test_convert_profile_gate(tmp_path, capsys):
    """quantkit convert --gate on Gemma 3 270M: a policy that passes (exit 0), then the same
    report against a policy that fails (exit 1, naming the failing rule), with the HTML report."""
    import json

    from quantkit.cli import main

    passing, failing = tmp_path / "pass.yaml", tmp_path / "fail.yaml"
    passing.write_text("rules:\n  kld_mean: {max: 0.05}\n  top1_agreement: {min: 0.9}\n  file_bytes: {max: 300000000}\n"
                       "  rtx-4060-8gb.decode_tokens_per_s: {min: 1}\nfits: [rtx-4060-8gb, raspberry-pi-5-8gb, ascend-310p]\n")
    failing.write_text("rules:\n  kld_mean: {max: 0.05}\n  zh.top1_agreement: {min: 0.99}\ncompatible: [ascend-310p]\n")
    out = tmp_path / "out"
    html = tmp_path / "gate.html"
    code = main(["-q", "convert", "--to", "gguf:q4_k_m", "-o", str(out), "--gate", str(passing), "--html", str(html), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["gate"]["passed"], result["gate"]
    assert 'id="plot-pareto"' in html.read_text()
    report = out / "gemma-3-270m-q4_k_m.profile.json"
    assert json.loads(report.read_text())["targets"][0]["name"] == "rtx-4060-8gb"
    # the same report, a stricter policy: zh top-1 and Ascend compatibility (K-quants) fail
    assert main(["gate", str(report), "--policy", str(failing), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["failed"] == ["zh.top1_agreement", "compatible:ascend-310p"]


def test_plan_for_raspberry_pi(tmp_path):
    """quantkit plan on Gemma 3 270M for a Raspberry Pi 5: a recommendation and its report."""
    import json

    from quantkit.api import plan

    result = plan(None, "raspberry-pi-5-8gb", tmp_path, max_kld=0.05, ctx=512)
    rec = result["recommendation"]
    assert rec is not None, [(c["recipe"], c["status"]) for c in result["candidates"]]
    report = json.loads(open(rec["report"]).read())
    assert report["quality"]["kld_mean"] == rec["kld_mean"] <= 0.05
    pi = report["targets"][0]
    assert pi["name"] == "raspberry-pi-5-8gb" and pi["fits"] and pi["compatible"]
    print("plan:", [(c["recipe"], c["status"], c.get("kld_mean")) for c in result["candidates"]])


def test_gemma_bundle_for_rtx_4060_is_served(converted, tmp_path, capsys):
    """`quantkit ship ... --profile rtx-4060-8gb -o bundle` on Gemma 3 270M q4_k_m: the bundle
    carries the importance matrix it was quantized with and a fit of every layer on the GPU; its
    own llama_cpp.server line serves the model and completes a prompt exactly as llama.cpp does
    in process. (The embedded Gemma is the base model: it has no chat template to translate; the
    chat formatting is checked on the tiny model in test_ship.)"""
    import json

    from served import served_bundle

    from quantkit.cli import main

    art = converted["gguf:q4_k_m"]
    bundle = tmp_path / "bundle"
    assert main(["-q", "ship", str(art.path), "--profile", "rtx-4060-8gb", "-o", str(bundle), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fit"]["n_gpu_layers"] == 19 and (bundle / "model" / "imatrix.gguf").is_file()
    assert "PARAMETER num_gpu 19" in (bundle / "Modelfile").read_text()
    # llama-cpp-python's server would hold 32k x 262k float32 logits for logprobs: off in its line
    assert "--logits_all false" in (bundle / "run.sh").read_text()
    prompt = "The capital of France is"
    with served_bundle(bundle) as post:
        # the server's requests default to a repeat penalty of 1.1: greedy and unpenalized on both sides
        served = post("/v1/completions", {"prompt": prompt, "temperature": 0, "repeat_penalty": 1.0, "max_tokens": 8})["choices"][0]["text"]
    from llama_cpp import Llama

    # in process with the settings of the bundle's line (context and GPU layers; the rest both defaults)
    llm = Llama(str(art.main_file), n_ctx=summary["fit_layers_only"]["ctx"], n_gpu_layers=19, verbose=False)
    try:
        local = llm(prompt, temperature=0, repeat_penalty=1.0, max_tokens=8)["choices"][0]["text"]
    finally:
        llm.close()
    assert served == local and served.strip()
