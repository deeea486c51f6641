"""The unquantized reference: an HF checkpoint run in float32 by transformers on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["TorchReference", "TorchEncoder"]


class TorchReference:
    """Loads weights from safetensors (pickles only when the user allowed them), never remote code."""

    def __init__(self, folder: Path, threads: int | None = None, allow_pickle: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=False, use_safetensors=not allow_pickle
        ).eval()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False)
        return out.logits[0].to(torch.float32).numpy()


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
