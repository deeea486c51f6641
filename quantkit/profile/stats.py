"""Uncertainty of the quality statistics, each computed the way the statistic needs it.

* ``kld_mean``: mean of per-token KLD ± its standard error (std / sqrt(n)), 95 % normal
  interval — as llama.cpp's ``perplexity --kl-divergence`` reports it.
* ``kld_p99``: percentile bootstrap over windows (windows resampled with replacement; tokens
  inside a window are not independent, windows are), 95 %.
* ``top1_agreement``: Wilson score interval for a binomial proportion, 95 %.
* ``ppl_ratio`` = PPL(artifact) / PPL(reference) and ``ppl_delta_pct``: delta method on the
  paired per-token NLL differences: ln(ratio) = mean(nll - nll_ref) ± its standard error, the
  interval mapped through exp.

The bootstrap uses a seeded generator (PCG64), so the same scores give the same intervals.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Z95", "mean_stderr", "normal_interval", "wilson_interval", "bootstrap_percentile", "log_ratio_interval",
           "METHODS", "tokens_to_decide"]

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 400
METHODS = {
    "kld_mean": "mean ± 1.96 standard errors of per-token KLD",
    "kld_p99": f"percentile bootstrap over windows ({BOOTSTRAP_RESAMPLES} resamples)",
    "top1_agreement": "Wilson score interval (binomial)",
    "ppl_ratio": "delta method: exp(mean ± 1.96 stderr of paired per-token NLL differences)",
    "ppl_delta_pct": "100 × (ppl_ratio interval − 1)",
}


def mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with n - 1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(values.mean()), se


def normal_interval(mean: float, stderr: float, z: float = Z95) -> list[float]:
    return [mean - z * stderr, mean + z * stderr]


def wilson_interval(successes: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of a proportion (well-behaved near 0 and 1, unlike mean ± z·se)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap_percentile(groups: list[np.ndarray], q: float, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the ``q``-th percentile, resampling whole groups."""
    if len(groups) < 2:
        value = float(np.percentile(np.concatenate(groups), q))
        return [value, value]
    rng = np.random.Generator(np.random.PCG64(seed))
    stats = np.empty(resamples)
    for i in range(resamples):
        pick = rng.integers(0, len(groups), len(groups))
        stats[i] = np.percentile(np.concatenate([groups[j] for j in pick]), q)
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def log_ratio_interval(diff: np.ndarray) -> tuple[float, float, list[float]]:
    """(ratio, stderr of its log, 95 % interval of the ratio) from paired log differences."""
    mean, se = mean_stderr(diff)
    lo, hi = normal_interval(mean, se)
    return math.exp(mean), se, [math.exp(lo), math.exp(hi)]


def tokens_to_decide(tokens: int, estimate: float, interval: list[float], limit: float) -> int | None:
    """About how many tokens in all would put ``limit`` outside the interval (a half-width that
    shrinks as 1/sqrt(n)); None when the estimate sits on the limit."""
    half = (interval[1] - interval[0]) / 2
    gap = abs(estimate - limit)
    if gap <= 0 or half <= 0:
        return None
    return math.ceil(tokens * (half / gap) ** 2)
