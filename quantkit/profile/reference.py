"""Reference log-probs, computed once per (model, text, settings) and cached on disk.

For each scored position the cache keeps what KL divergence, top-1 agreement and perplexity
need, compactly: the reference's top-k token ids and log-probs, and the log-prob of the actual
next token. The probability mass outside the top k is treated as one bucket when computing
KLD (see ``quality.kld_from_topk``), which by the log-sum inequality is a slight lower bound
of the full KLD and exact when the tail is empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import atomic_file

__all__ = ["TOP_K", "ReferenceScores", "reference_scores", "log_softmax", "score_start"]

TOP_K = 64
_CACHE_VERSION = 1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class ReferenceScores:
    topk_ids: np.ndarray  # int32 [n, k], most probable first
    topk_logp: np.ndarray  # float32 [n, k]
    target_logp: np.ndarray  # float32 [n]: log-prob of the actual next token

    def __len__(self) -> int:
        return len(self.target_logp)


def score_start(window: Sequence[int]) -> int:
    """Scoring starts halfway: every scored token sees at least half a window of context."""
    return len(window) // 2


def _compute(logits_fn: Callable[[list[int]], np.ndarray], windows: Sequence[list[int]]) -> ReferenceScores:
    ids, logps, targets = [], [], []
    for window in windows:
        score_from = score_start(window)
        logp = log_softmax(logits_fn(window)[score_from : len(window) - 1])
        k = min(TOP_K, logp.shape[-1])
        top = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(logp, top, axis=-1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, axis=-1)
        ids.append(top.astype(np.int32))
        logps.append(np.take_along_axis(logp, top, axis=-1).astype(np.float32))
        nxt = np.asarray(window[score_from + 1 :])
        targets.append(logp[np.arange(len(nxt)), nxt].astype(np.float32))
    return ReferenceScores(np.concatenate(ids), np.concatenate(logps), np.concatenate(targets))


def reference_scores(
    logits_fn: Callable[[list[int]], np.ndarray],
    windows: Sequence[list[int]],
    *,
    fingerprint: str,
    cache_dir: Path | None,
) -> ReferenceScores:
    """Scores for the second half of each window, from the on-disk cache when present."""
    key = hashlib.sha256(
        json.dumps([_CACHE_VERSION, fingerprint, TOP_K, [list(w) for w in windows]]).encode()
    ).hexdigest()
    path = cache_dir / f"{key}.npz" if cache_dir else None
    if path and path.is_file():
        with np.load(path) as data:
            return ReferenceScores(data["topk_ids"], data["topk_logp"], data["target_logp"])
    scores = _compute(logits_fn, windows)
    if path:
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, topk_ids=scores.topk_ids, topk_logp=scores.topk_logp, target_logp=scores.target_logp)
    return scores
