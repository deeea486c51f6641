"""Uncertainty of the quality statistics (issue 15): standard errors checked against a direct
computation, interval coverage where the truth is known, and a gate that says pass, fail or
inconclusive for the same report under three limits."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from quantkit.gate import evaluate, load_policy
from quantkit.profile import stats
from quantkit.profile.quality import summarize


def _parts(rng, windows: int, per_window: int, kld_mean: float = 0.05, top1: float = 0.9, log_ratio: float = 0.02):
    parts = []
    for _ in range(windows):
        ref_nll = rng.exponential(2.0, per_window)
        parts.append({
            "kld": rng.exponential(kld_mean, per_window),
            "top1": (rng.random(per_window) < top1).astype(np.float64),
            "ref_nll": ref_nll,
            "nll": ref_nll + rng.normal(log_ratio, 0.3, per_window),
        })
    return parts


def test_kld_stderr_matches_a_direct_computation():
    rng = np.random.Generator(np.random.PCG64(1))
    parts = _parts(rng, 6, 50)
    kld = np.concatenate([p["kld"] for p in parts])
    figures = summarize(parts)
    assert figures["kld_mean"] == pytest.approx(kld.mean())
    assert figures["kld_mean_stderr"] == pytest.approx(np.std(kld, ddof=1) / math.sqrt(kld.size))
    lo, hi = figures["intervals"]["kld_mean"]
    assert (hi - lo) / 2 == pytest.approx(1.959964 * figures["kld_mean_stderr"], rel=1e-5)
    diff = np.concatenate([p["nll"] - p["ref_nll"] for p in parts])
    assert figures["ppl_ratio"] == pytest.approx(math.exp(diff.mean()))
    assert figures["ppl_delta_pct"] == pytest.approx(100 * (figures["ppl_ratio"] - 1))
    assert figures["intervals"]["ppl_delta_pct"][0] < figures["ppl_delta_pct"] < figures["intervals"]["ppl_delta_pct"][1]
    assert len(figures["window_stats"]["kld_mean"]) == 6 and figures["windows"] == 6


def test_intervals_cover_the_truth_about_95_percent_of_the_time():
    """Synthetic scores with known means: each interval method covers the truth in ~95 % of 400
    repetitions (binomial noise allows 0.91-0.98)."""
    rng = np.random.Generator(np.random.PCG64(7))
    truth = {"kld_mean": 0.05, "top1_agreement": 0.9, "ppl_ratio": math.exp(0.02)}
    hits = dict.fromkeys(truth, 0)
    trials = 400
    for _ in range(trials):
        figures = summarize(_parts(rng, 4, 64))
        for key, value in truth.items():
            lo, hi = figures["intervals"][key]
            hits[key] += lo <= value <= hi
    for key, count in hits.items():
        assert 0.91 <= count / trials <= 0.98, (key, count / trials)


def test_wilson_interval_and_tokens_to_decide():
    lo, hi = stats.wilson_interval(90, 100)
    assert lo < 0.9 < hi and 0.82 < lo and hi < 0.95
    assert stats.wilson_interval(100, 100)[1] == 1.0
    # the half-width shrinks as 1/sqrt(n): four times the tokens halves it
    assert stats.tokens_to_decide(1000, 0.05, [0.04, 0.06], 0.055) == pytest.approx(4000, abs=1)


def test_bootstrap_is_reproducible_and_brackets_the_percentile():
    rng = np.random.Generator(np.random.PCG64(3))
    groups = [rng.exponential(0.05, 64) for _ in range(8)]
    a, b = stats.bootstrap_percentile(groups, 99), stats.bootstrap_percentile(groups, 99)
    assert a == b
    assert a[0] <= np.percentile(np.concatenate(groups), 99) <= a[1]


@pytest.fixture
def report():
    sample = json.loads((Path(__file__).parent / "data" / "profile-report.json").read_text())
    rng = np.random.Generator(np.random.PCG64(5))
    parts = _parts(rng, 8, 64, kld_mean=0.05)
    sample["quality"] = {**sample["quality"], **summarize(parts), "windows_sha256": "a" * 64}
    return sample


def _policy(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


def test_gate_pass_fail_and_inconclusive_on_one_report(report, tmp_path):
    lo, hi = report["quality"]["intervals"]["kld_mean"]
    verdicts = {}
    for name, limit in (("pass", hi * 1.5), ("fail", lo * 0.5), ("inconclusive", report["quality"]["kld_mean"] * 1.01)):
        result = evaluate([report], _policy(tmp_path, f"rules:\n  kld_mean: {{max: {limit}}}\n"))
        verdicts[name] = result.results[0]
    assert verdicts["pass"].outcome == "pass" and verdicts["pass"].passed
    assert verdicts["fail"].outcome == "fail" and not verdicts["fail"].passed
    undecided = verdicts["inconclusive"]
    assert undecided.outcome == "inconclusive" and not undecided.passed  # default: inconclusive fails
    assert undecided.interval == [lo, hi] and undecided.more_tokens > 0
    for choice, passes in (("pass", True), ("warn", True), ("fail", False)):
        policy = _policy(tmp_path, f"on_inconclusive: {choice}\nrules:\n  kld_mean: {{max: {report['quality']['kld_mean'] * 1.01}}}\n")
        assert evaluate([report], policy).passed is passes


def test_baseline_paired_over_the_same_windows(report, tmp_path):
    policy = _policy(tmp_path, "baseline: {tolerance_pct: 5, metrics: [kld_mean, top1_agreement, ppl_delta_pct]}\n")
    assert evaluate([report], policy, [report]).passed  # against itself: a zero paired difference
    worse = copy.deepcopy(report)
    worse["quality"]["kld_mean"] *= 1.5
    worse["quality"]["window_stats"]["kld_mean"] = [v * 1.5 for v in worse["quality"]["window_stats"]["kld_mean"]]
    rule = next(r for r in evaluate([worse], policy, [report]).results if r.rule == "baseline.kld_mean")
    assert rule.outcome == "fail", rule
    # another text: no pairing, the two intervals decide; a 1 % change is within noise
    other = copy.deepcopy(report)
    other["quality"]["windows_sha256"] = "b" * 64
    other["quality"]["kld_mean"] *= 1.01
    rule = next(r for r in evaluate([other], policy, [report]).results if r.rule == "baseline.kld_mean")
    assert rule.outcome in ("pass", "inconclusive") and rule.interval is not None
