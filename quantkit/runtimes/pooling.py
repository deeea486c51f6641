"""Sentence embeddings from token states, the way the checkpoint's sentence-transformers files
say (``modules.json``, ``1_Pooling/config.json``): mean, CLS or max pooling, then optional L2
normalisation. Without those files: mean pooling, no normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Pooling", "read_pooling"]


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean, cls, max
    normalize: bool = False
    max_seq_length: int | None = None

    def __call__(self, states: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``states`` [batch, seq, dim], ``mask`` [batch, seq] -> [batch, dim] float32."""
        states = states.astype(np.float32)
        m = mask.astype(np.float32)[..., None]
        if self.mode == "cls":
            out = states[:, 0]
        elif self.mode == "max":
            out = np.where(m > 0, states, -np.inf).max(axis=1)
        else:
            out = (states * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        if self.normalize:
            out = out / np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)
        return out


def read_pooling(folder: Path) -> Pooling:
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    mode, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg_file = folder / module.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                mode = "max"
        elif kind.endswith("Normalize"):
            normalize = True
    st_file = folder / "sentence_bert_config.json"
    max_len = json.loads(st_file.read_text(encoding="utf-8")).get("max_seq_length") if st_file.is_file() else None
    return Pooling(mode, normalize, max_len)
