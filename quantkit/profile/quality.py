"""Quality-loss metrics between a reference model's logits and an artifact's, per token."""

from __future__ import annotations

import numpy as np

__all__ = ["kl_divergence", "top1_agreement"]


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray, chunk_rows: int = 64) -> np.ndarray:
    """KL(P_ref || Q) in nats for each row, computed in float64 chunks to bound memory."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {reference_logits.shape} vs {logits.shape}")
    out = np.empty(reference_logits.shape[0], dtype=np.float64)
    for start in range(0, reference_logits.shape[0], chunk_rows):
        p = _log_softmax(reference_logits[start : start + chunk_rows])
        q = _log_softmax(logits[start : start + chunk_rows])
        out[start : start + chunk_rows] = np.sum(np.exp(p) * (p - q), axis=-1)
    return np.maximum(out, 0.0)


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    return float(np.mean(reference_logits.argmax(-1) == logits.argmax(-1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
