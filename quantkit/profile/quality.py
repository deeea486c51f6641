"""Quality-loss metrics between a reference model and an artifact, per token and aggregated."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import stats
from .reference import ReferenceScores, log_softmax, score_start

__all__ = ["kl_divergence", "top1_agreement", "kld_from_topk", "summarize", "score_artifact_window", "score_windows"]


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray, chunk_rows: int = 16) -> np.ndarray:
    """Exact KL(P_ref || Q) in nats for each row, computed in float64 chunks to bound memory."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {reference_logits.shape} vs {logits.shape}")
    out = np.empty(reference_logits.shape[0], dtype=np.float64)
    for start in range(0, reference_logits.shape[0], chunk_rows):
        p = log_softmax(reference_logits[start : start + chunk_rows])
        q = log_softmax(logits[start : start + chunk_rows])
        out[start : start + chunk_rows] = np.sum(np.exp(p) * (p - q), axis=-1)
    return np.maximum(out, 0.0)


def argmax_rows(logits: np.ndarray, chunk_rows: int = 16) -> np.ndarray:
    """``logits.argmax(-1)`` in row chunks: numpy's argmax copies a read-only (memory-mapped)
    array whole first, 300 MB for a window over a 150k-token vocabulary."""
    return np.concatenate([logits[i : i + chunk_rows].argmax(-1) for i in range(0, logits.shape[0], chunk_rows)])


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    return float(np.mean(argmax_rows(reference_logits) == argmax_rows(logits)))


def kld_from_topk(ref_ids: np.ndarray, ref_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(P||Q) from P's top-k plus one bucket for the rest of P's mass (a tight lower bound)."""
    p = np.exp(ref_logp.astype(np.float64))
    q_top = np.take_along_axis(logq, ref_ids.astype(np.int64), axis=-1)
    head = np.sum(p * (ref_logp - q_top), axis=-1)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(q_top).sum(-1), 1e-30, 1.0)
    tail = np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
    return np.maximum(head + tail, 0.0)


def score_artifact_window(
    logits: np.ndarray, window: list[int], ref: ReferenceScores, offset: int, chunk_rows: int = 16
) -> dict[str, np.ndarray]:
    """Per-position KLD, top-1 match and NLL for one window against reference rows at ``offset``
    (in row chunks: the float64 log-probs of a whole window are 300 MB for a 150k vocabulary)."""
    score_from = score_start(window)
    rows = logits[score_from : len(window) - 1]
    n = rows.shape[0]
    nxt = np.asarray(window[score_from + 1 :])
    kld, top1, nll = [], [], []
    for start in range(0, n, chunk_rows):
        logq = log_softmax(rows[start : start + chunk_rows])
        stop = start + logq.shape[0]
        ids, lp = ref.topk_ids[offset + start : offset + stop], ref.topk_logp[offset + start : offset + stop]
        kld.append(kld_from_topk(ids, lp, logq))
        top1.append((logq.argmax(-1) == ids[:, 0]).astype(np.float64))
        nll.append(-logq[np.arange(stop - start), nxt[start:stop]])
    return {
        "kld": np.concatenate(kld),
        "top1": np.concatenate(top1),
        "nll": np.concatenate(nll),
        "ref_nll": -ref.target_logp[offset : offset + n].astype(np.float64),
    }


def score_windows(runtime, windows: list[list[int]], ref: ReferenceScores, advance=None) -> list[dict[str, np.ndarray]]:
    """:func:`score_artifact_window` for each window of one set, in order, against that set's
    reference rows (``ref`` holds every window's scored rows back to back)."""
    parts, offset = [], 0
    for window in windows:
        part = score_artifact_window(runtime.logits(window), window, ref, offset)
        offset += len(part["kld"])
        parts.append(part)
        if advance:
            advance(1)
    return parts


def summarize(parts: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Aggregate per-position arrays (one dict per window) into the report's quality keys, each
    statistic with its 95 % interval (``intervals``; methods in :mod:`quantkit.profile.stats`)."""
    kld = np.concatenate([p["kld"] for p in parts])
    nll = np.concatenate([p["nll"] for p in parts])
    ref_nll = np.concatenate([p["ref_nll"] for p in parts])
    top1 = np.concatenate([p["top1"] for p in parts])
    ppl, ppl_ref = math.exp(float(nll.mean())), math.exp(float(ref_nll.mean()))
    kld_mean, kld_se = stats.mean_stderr(kld)
    ratio, _log_se, ratio_interval = stats.log_ratio_interval(nll - ref_nll)
    return {
        "tokens": int(kld.size),
        "windows": len(parts),
        "kld_mean": kld_mean,
        "kld_mean_stderr": kld_se,
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float(top1.mean()),
        "ppl": ppl,
        "ppl_reference": ppl_ref,
        "ppl_ratio": ratio,
        "ppl_delta_pct": 100.0 * (ppl - ppl_ref) / ppl_ref,
        "intervals": {
            "kld_mean": stats.normal_interval(kld_mean, kld_se),
            "kld_p99": stats.bootstrap_percentile([p["kld"] for p in parts], 99),
            "top1_agreement": stats.wilson_interval(float(top1.sum()), int(top1.size)),
            "ppl_ratio": ratio_interval,
            "ppl_delta_pct": [100.0 * (r - 1.0) for r in ratio_interval],
        },
        # per-window series: a later report that scored the same windows is compared pairwise
        "window_stats": {
            "kld_mean": [float(p["kld"].mean()) for p in parts],
            "top1_agreement": [float(p["top1"].mean()) for p in parts],
            "log_ppl_ratio": [float((p["nll"] - p["ref_nll"]).mean()) for p in parts],
        },
    }
