"""The unquantized reference: an HF checkpoint run in float32 by transformers on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["TorchReference"]


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
