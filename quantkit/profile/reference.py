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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import atomic_file

__all__ = ["TOP_K", "ReferenceScores", "reference_scores", "log_softmax", "score_start"]

#: ``logits(windows)``: the reference's logits of each window, in order (one pass over all)
LogitsFn = Callable[[Sequence[list[int]]], Iterable[np.ndarray]]

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


def _reduce(window: list[int], logits: np.ndarray, chunk_rows: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids and log-probs and the target's log-prob of the scored half of one window (in
    row chunks: float64 log-probs of a whole window are 300 MB for a 150k vocabulary)."""
    score_from = score_start(window)
    rows = logits[score_from : len(window) - 1]
    nxt = np.asarray(window[score_from + 1 :])
    parts = []
    for start in range(0, rows.shape[0], chunk_rows):
        logp = log_softmax(rows[start : start + chunk_rows])
        k = min(TOP_K, logp.shape[-1])
        top = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(logp, top, axis=-1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, axis=-1)
        target = nxt[start : start + logp.shape[0]]
        parts.append((top.astype(np.int32), np.take_along_axis(logp, top, axis=-1).astype(np.float32),
                      logp[np.arange(len(target)), target].astype(np.float32)))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _join(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ReferenceScores:
    return ReferenceScores(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def _cache_path(cache_dir: Path | None, fingerprint: str, windows: Sequence[list[int]]) -> Path | None:
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, fingerprint, TOP_K, [list(w) for w in windows]]).encode()).hexdigest()
    return cache_dir / f"{key}.npz" if cache_dir else None


def reference_scores(
    logits: LogitsFn,
    windows_by_set: dict[str, Sequence[list[int]]],
    *,
    fingerprint: str,
    cache_dir: Path | None,
) -> dict[str, ReferenceScores]:
    """Scores for the second half of each window of each named set (a domain's windows), from
    the on-disk cache when present; the sets not cached are computed in one pass of ``logits``."""
    scores: dict[str, ReferenceScores] = {}
    for name, windows in windows_by_set.items():
        path = _cache_path(cache_dir, fingerprint, windows)
        if path and path.is_file():
            with np.load(path) as data:
                scores[name] = ReferenceScores(data["topk_ids"], data["topk_logp"], data["target_logp"])
    missing = [name for name in windows_by_set if name not in scores]
    flat = [(name, w) for name in missing for w in windows_by_set[name]]
    parts: dict[str, list] = {name: [] for name in missing}
    for (name, window), out in zip(flat, logits([w for _, w in flat]) if flat else (), strict=True):
        parts[name].append(_reduce(window, out))
    for name in missing:
        scores[name] = _join(parts[name])
        path = _cache_path(cache_dir, fingerprint, windows_by_set[name])
        if path:
            with atomic_file(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, topk_ids=scores[name].topk_ids, topk_logp=scores[name].topk_logp,
                             target_logp=scores[name].target_logp)
    return {name: scores[name] for name in windows_by_set}
