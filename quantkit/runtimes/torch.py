"""The unquantized reference: an HF checkpoint run in float32 by transformers on the CPU.

Causal LMs run through the layer-streaming engine (``stream.LayerStream``), so the reference never
holds more than one decoder block; encoders (small) load whole."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..source import Source

__all__ = ["TorchReference", "TorchEncoder"]


class TorchReference:
    """Weights from safetensors (pickles only when the user allowed them), never remote code."""

    def __init__(self, source: Source, threads: int | None = None):
        import torch
        from transformers import AutoTokenizer

        from .stream import LayerStream

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
        self.stream = LayerStream(source)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def logits(self, windows: Sequence[list[int]], task=None) -> Iterator[np.ndarray]:
        """float32 logits of each window, in order: one pass of the model over all of them."""
        return self.stream.logits(windows, task=task)


class TorchEncoder:
    """An HF encoder in float32 with the checkpoint's own pooling: the reference embeddings."""

    def __init__(self, folder: Path, threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from .pooling import read_pooling

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False, use_safetensors=True).eval()
        self.pooling = read_pooling(folder)

    def embed(self, texts: list[str], max_length: int = 512) -> np.ndarray:
        import torch

        limit = min(x for x in (self.pooling.max_seq_length, max_length) if x)
        rows = []
        with torch.inference_mode():
            for text in texts:
                enc = self.tokenizer(text, truncation=True, max_length=limit, return_tensors="pt", verbose=False)
                states = self.model(**enc).last_hidden_state.to(torch.float32).numpy()
                rows.append(self.pooling(states, enc["attention_mask"].numpy()))
        return np.concatenate(rows)
