"""llama.cpp (through llama-cpp-python) as a runtime: tokenize and score GGUF artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import VerificationError
from . import register_runtime

__all__ = ["LlamaCppRuntime"]


@register_runtime("gguf")
class LlamaCppRuntime:
    """A GGUF model loaded for scoring: all positions' logits are kept (logits_all)."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None):
        import llama_cpp

        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                logits_all=True,
                n_threads=threads or os.cpu_count(),
                seed=0,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise VerificationError(f"llama.cpp could not load {path}: {exc}") from exc
        self.n_ctx = n_ctx

    @property
    def add_bos(self) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._llm._model.vocab))

    @property
    def bos_id(self) -> int:
        return int(self._llm.token_bos())

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS and no special-token parsing."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Next-token logits at every position of ``tokens`` (one window, <= n_ctx)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"window of {len(tokens)} tokens exceeds n_ctx={self.n_ctx}")
        self._llm.reset()
        self._llm.eval(tokens)
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self._llm.close()
