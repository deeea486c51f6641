"""The profiler on tiny models: quality keys per domain, reference cache, latency subprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import SHARED_DATA

from quantkit.api import convert, profile
from quantkit.profile.quality import kl_divergence, kld_from_topk
from quantkit.profile.reference import TOP_K, log_softmax, reference_scores

EVAL = [str(SHARED_DATA / "tinyshakespeare-en.txt"), str(SHARED_DATA / "hongloumeng-zh.txt"), "code"]


@pytest.fixture(scope="module")
def artifacts(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    arts = convert(tiny_model("qwen2"), ["gguf:f32", "gguf:q8_0", "gguf:q4_0"], out, verify=False).artifacts
    return {a.recipe: a for a in arts}


def test_topk_kld_is_a_tight_lower_bound():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 700)) * 3
    art = ref + rng.normal(size=ref.shape) * 0.3
    exact = kl_divergence(ref, art)
    lp = log_softmax(ref)
    ids = np.argsort(-lp, axis=-1)[:, :TOP_K]
    approx = kld_from_topk(ids, np.take_along_axis(lp, ids, -1), log_softmax(art))
    assert np.all(approx <= exact + 1e-9)
    assert approx.mean() > 0.9 * exact.mean()


def test_reference_scores_are_cached_on_disk(tmp_path):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(40, 300)).astype(np.float32)
    windows = {"en": [list(range(20)), list(range(20, 40))], "zh": [list(range(10))]}
    passes = []

    def logits(batch):
        passes.append(len(batch))
        return (table[w] for w in batch)

    first = reference_scores(logits, windows, fingerprint="abc", cache_dir=tmp_path)
    assert passes == [3]  # every set computed in one pass
    more = {"zh": windows["zh"], "code": [list(range(5, 25))]}
    second = reference_scores(logits, more, fingerprint="abc", cache_dir=tmp_path)
    assert passes == [3, 1]  # only the set not cached yet
    assert np.array_equal(first["zh"].topk_ids, second["zh"].topk_ids)
    assert len(first["en"]) == 2 * 9 and len(first["zh"]) == 4


def test_quality_orders_precisions_per_domain(artifacts, tmp_path):
    reports = {
        r: profile(a.path, eval_data=EVAL, ctx=64, chunks=3, latency=False)
        for r, a in artifacts.items()
    }
    f32, q8, q4 = (reports[r]["quality"] for r in ("gguf:f32", "gguf:q8_0", "gguf:q4_0"))
    assert set(f32["domains"]) == {"tinyshakespeare-en", "hongloumeng-zh", "code"}
    assert f32["tokens"] == sum(d["tokens"] for d in f32["domains"].values()) > 0
    assert f32["kld_mean"] < 1e-4 and f32["top1_agreement"] > 0.99
    assert abs(f32["ppl_delta_pct"]) < 0.5
    assert f32["kld_mean"] < q8["kld_mean"] < q4["kld_mean"]
    assert q4["kld_p99"] <= q4["kld_max"]


def test_latency_and_memory_are_measured(artifacts, tmp_path):
    from quantkit.cli import main

    out = tmp_path / "report.json"
    code = main(["-q", "profile", str(artifacts["gguf:q8_0"].path), "--eval-data", "code", "--ctx", "64",
                 "--chunks", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    lat, mem, host = report["latency"], report["memory"], report["host"]
    assert lat["decode_tokens_per_s"]["min"] <= lat["decode_tokens_per_s"]["median"] <= lat["decode_tokens_per_s"]["max"]
    assert lat["decode_tokens_per_s"]["median"] > 0 and lat["ttft_s"]["median"] > 0
    assert mem["peak_rss_bytes"] > mem["file_bytes"]
    assert mem["predicted_peak_bytes"] > 0 and mem["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert host["memory_bandwidth_bytes_per_s"] > 1e8 and 0 < host["decode_roofline_fraction"]


def test_gguf_sourced_artifact_needs_a_reference(artifacts, tmp_path):
    from quantkit.errors import InputError

    requant = convert(artifacts["gguf:f32"].main_file, ["gguf:q4_0"], tmp_path, verify=False).artifacts[0]
    with pytest.raises(InputError, match="--reference"):
        profile(requant.path, eval_data=["code"], latency=False)


def test_report_validates_against_the_shipped_schema(artifacts):
    import copy

    from quantkit.errors import QuantkitError
    from quantkit.report.schema import load_schema, validate_report

    report = profile(artifacts["gguf:q8_0"].path, eval_data=["code"], ctx=64, chunks=1)  # validated inside
    assert load_schema()["properties"]["schema_version"]["const"] == report["schema_version"]
    assert report["memory"]["predicted_peak_bytes"] == sum(report["memory"]["predicted_terms"].values())
    assert report["host"]["cores_used"] <= report["host"]["cores"]
    for path, value in ((("quality", "top1_agreement"), 1.5), (("latency", "ttft_s"), {"median": 1.0})):
        broken = copy.deepcopy(report)
        broken[path[0]][path[1]] = value
        with pytest.raises(QuantkitError, match="/".join(path)):
            validate_report(broken)
    broken = copy.deepcopy(report)
    del broken["quality"]["domains"]["code"]["kld_mean"]
    with pytest.raises(QuantkitError, match="kld_mean"):
        validate_report(broken)
