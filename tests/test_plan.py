"""The planner on a tiny model: pruning by estimates, ordering, early stop, resumability."""

from __future__ import annotations

import json

import pytest

import quantkit.api as api
from quantkit.cli import main


def test_plan_recommends_and_resumes(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "plan"
    result = api.plan(tiny_model("llama"), "raspberry-pi-5-8gb", out, max_kld=0.05, ctx=128)
    rec = result["recommendation"]
    assert rec is not None and rec["kld_mean"] <= 0.05 and rec["compatible"] and rec["fits"]
    statuses = {c["recipe"]: c["status"] for c in result["candidates"]}
    profiled = [c for c in result["candidates"] if "kld_mean" in c]
    # everything profiled before the recommendation failed the quality bound, and was estimated faster
    for c in profiled:
        if c is not rec:
            assert c["kld_mean"] > 0.05 and c["estimated_decode_tokens_per_s"] >= rec["estimated_decode_tokens_per_s"]
    assert any(s.startswith("skipped: estimated slower") for s in statuses.values())
    assert set(result["pareto_front"]) <= {c["recipe"] for c in profiled}
    assert json.loads((out / "plan.json").read_text())["recommendation"]["recipe"] == rec["recipe"]
    assert 'id="plot-pareto"' in (out / "plan.html").read_text()
    # a second run recomputes nothing
    calls = []
    monkeypatch.setattr(api, "convert", lambda *a, **k: calls.append(a) or pytest.fail("converted again"))
    again = api.plan(tiny_model("llama"), "raspberry-pi-5-8gb", out, max_kld=0.05, ctx=128)
    assert again["recommendation"]["recipe"] == rec["recipe"] and not calls
    assert all(c.get("resumed") for c in again["candidates"] if "kld_mean" in c)


def test_plan_prunes_before_converting(tiny_model, tmp_path, capsys):
    tiny = tmp_path / "tiny-board.yaml"
    tiny.write_text(
        "name: tiny-board\nkind: soc\nmemory: {total_bytes: 300000, bandwidth_bytes_per_s: 1.0e9, reserved_bytes: 1000}\n"
        "compute: {fp32: 1.0e9}\nruntimes:\n  - {name: llama.cpp, backend: cpu, formats: [gguf], quant_types: [q4_0]}\n"
    )
    code = main(["plan", str(tiny_model("llama")), "--profile", str(tiny), "--ctx", "128", "-o", str(tmp_path / "p"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1 and result["recommendation"] is None  # nothing qualifies: exit 1
    statuses = {c["recipe"]: c["status"] for c in result["candidates"]}
    assert statuses["gguf:f16"].startswith("pruned: does not fit")
    assert "no runtime on tiny-board runs onnx" in statuses["onnx:int8"]
    assert "quant type" in statuses["gguf:q8_0"]
    assert not (tmp_path / "p" / "artifacts").exists() or all(
        "q4_0" in p.name for p in (tmp_path / "p" / "artifacts").iterdir())
