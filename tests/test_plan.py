"""The planner on a tiny model: pruning by estimates, ordering, early stop, resumability."""

from __future__ import annotations

import json
from pathlib import Path

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
    # an artifact made under another meaning of its recipe (an older default) is not resumed
    manifest_path = Path(rec["artifact"]) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["recipe"]["options"]["calib_samples"] = -1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(pytest.fail.Exception, match="converted again"):
        api.plan(tiny_model("llama"), "raspberry-pi-5-8gb", out, max_kld=0.05, ctx=128)


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


QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "vocab_size": 151936, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False}
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "tie_word_embeddings": False}


def test_estimate_only_plans_a_mixture_of_experts_from_its_config(tmp_path):
    """config.json alone: every candidate estimated, GGUF ones fitted (experts in RAM on a GPU
    board), the decode estimate from the bytes a token reads, nothing converted."""
    folders = {}
    for name, config in (("moe", QWEN3_30B_A3B), ("dense", LLAMA_8B)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text(json.dumps(config))
    plans = {(m, p): api.plan(folders[m], p, tmp_path / f"plan-{m}-{p}", estimate_only=True)
             for m in folders for p in ("rtx-4060-8gb", "laptop-x86-16gb")}
    rows = {key: {c["recipe"]: c for c in plan["candidates"]} for key, plan in plans.items()}
    gpu = rows["moe", "rtx-4060-8gb"]["gguf:q4_k_m"]
    assert gpu["status"] == "estimated" and gpu["fit"]["n_cpu_moe"] > 0 and gpu["fit"]["n_gpu_layers"] == 49
    assert rows["moe", "rtx-4060-8gb"]["gptq:w4g128"]["status"].startswith("pruned") and "mixtures of experts" in \
        rows["moe", "rtx-4060-8gb"]["gptq:w4g128"]["status"]
    # 30.5B parameters in q4_k_m do not fit a 16 GB laptop; a gguf:auto mix sized for it does
    laptop = rows["moe", "laptop-x86-16gb"]
    assert laptop["gguf:q4_k_m"]["status"].startswith("pruned")
    auto = next(c for r, c in laptop.items() if r.startswith("gguf:auto-"))
    assert auto["status"] == "estimated" and "error" not in auto["fit"]
    # the bytes a token reads: the 30B mixture (3B active) decodes faster than the dense 8B on the same CPU
    dense = rows["dense", "laptop-x86-16gb"]["gguf:q4_k_m"]
    assert laptop["gguf:q4_k_m"]["estimated_decode_tokens_per_s"] > 1.5 * dense["estimated_decode_tokens_per_s"]
    assert not any((tmp_path / f"plan-{m}-{p}" / "artifacts").exists() for m, p in plans)
    # the CLI: one table, exit 0
    assert main(["plan", str(folders["moe"]), "--profile", "rtx-4060-8gb", "--estimate-only", "-o", str(tmp_path / "cli")]) == 0


def test_kv_cache_of_latent_attention_is_its_latent():
    """DeepSeek's multi-head latent attention caches the kv latent and its RoPE part per layer,
    not heads x head_dim: the planner and the fit read it from one place."""
    from quantkit.runtimes.hf import kv_dims

    v3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
          "num_hidden_layers": 61, "vocab_size": 129280, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "head_dim": 64}
    assert kv_dims(v3) == (1, 576, 512)
    assert kv_dims(LLAMA_8B) == (8, 128, 128)
