"""Shared base of runtimes that run a transformers model in torch on the CPU.

bitsandbytes artifacts and dequantized GPTQ checkpoints both end up as a transformers model;
this class gives them the runtime interface the profiler uses (tokenize, logits, timed greedy
generation, sizes for the memory model). Subclasses implement ``load_model`` and
``describe_weights``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HFTokenizerMixin", "TransformersRuntime", "config_sizes", "read_config", "linear_params"]


def linear_params(sizes: dict[str, int], n_ff: int, gated: bool = True) -> int:
    """Weights one token is multiplied through in the transformer blocks (attention q/k/v/o and
    the feed-forward; the embedding and output head apart): half the FLOPs a token costs."""
    q = sizes["n_head"] * sizes["head_dim"]
    kv = sizes["n_head_kv"] * sizes["head_dim"]
    attention = sizes["n_embd"] * (2 * q + 2 * kv)
    mlp = (3 if gated else 2) * sizes["n_embd"] * n_ff
    return sizes["n_layers"] * (attention + mlp)


def block_params(config: dict[str, Any]) -> list[tuple[int, int]]:
    """(weights, of which routed experts) of each decoder block, from an HF ``config.json``
    alone: attention (grouped-query, or DeepSeek's multi-head latent attention), the dense
    feed-forward or the router, routed experts and shared experts of a mixture of experts.
    Norms and biases are left out (a rounding error on a model's size)."""
    from ..source import experts_of

    cfg = config.get("text_config") or config
    sizes = config_sizes(config)
    h, n_head = sizes["n_embd"], sizes["n_head"]
    if "kv_lora_rank" in cfg:  # DeepSeek MLA: low-rank q (or a full one), shared kv latent, per-head up-projections
        q_lora, kv_lora = int(cfg.get("q_lora_rank") or 0), int(cfg["kv_lora_rank"])
        nope, rope, v = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["v_head_dim"])
        q = h * q_lora + q_lora * n_head * (nope + rope) if q_lora else h * n_head * (nope + rope)
        attention = q + h * (kv_lora + rope) + kv_lora * n_head * (nope + v) + n_head * v * h
    else:
        q, kv = n_head * sizes["head_dim"], sizes["n_head_kv"] * sizes["head_dim"]
        attention = h * (2 * q + 2 * kv)
    dense = 3 * h * int(cfg.get("intermediate_size") or 4 * h)
    experts = experts_of(cfg)
    if experts is None:
        return [(attention + dense, 0)] * sizes["n_layers"]
    routed = 3 * h * experts.ff * experts.count
    moe = h * experts.count + routed + 3 * h * experts.shared_ff
    return [(attention + dense, 0) if i < experts.dense_blocks else (attention + moe, routed) for i in range(sizes["n_layers"])]


def kv_dims(config: dict[str, Any]) -> tuple[int, int, int]:
    """(KV heads, key width, value width) llama.cpp caches per layer and token: DeepSeek's latent
    attention caches one "head" of the kv latent plus its RoPE part (keys) and the latent (values)."""
    cfg = config.get("text_config") or config
    if "kv_lora_rank" in cfg:
        return 1, int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"]), int(cfg["kv_lora_rank"])
    sizes = config_sizes(config)
    return sizes["n_head_kv"], sizes["head_dim"], sizes["head_dim"]


def config_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Layer count, widths and vocabulary from an HF ``config.json`` (text config if nested)."""
    cfg = config.get("text_config") or config
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return {
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": int(cfg.get("num_key_value_heads") or n_head),
        "head_dim": int(cfg.get("head_dim") or n_embd // n_head),
        "n_vocab": int(cfg["vocab_size"]),
    }


#: resident bytes of a loaded HF fast tokenizer per byte of its tokenizer.json, for the memory
#: prediction: measured 12 for Gemma 3's 262k-entry BPE under transformers 5 (397 MB resident;
#: 9.3 under transformers 4) and 15 for MiniLM's 30k WordPiece (10 MB); only a large vocabulary
#: makes the term matter
TOKENIZER_RSS_PER_FILE_BYTE = 12


class HFTokenizerMixin:
    """Tokenizing through an HF tokenizer held in ``self.tokenizer`` (the part of the runtime
    interface every runtime that is not llama.cpp shares)."""

    @staticmethod
    def tokenizer_bytes(folder: Path) -> int:
        """Estimated resident size of the tokenizer loaded from ``folder``."""
        file = Path(folder) / "tokenizer.json"
        return TOKENIZER_RSS_PER_FILE_BYTE * file.stat().st_size if file.is_file() else 0

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def add_bos(self) -> bool:
        ids = self.tokenizer("a")["input_ids"]
        return self.bos_id is not None and ids[:1] == [self.bos_id]

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


class TransformersRuntime(HFTokenizerMixin):
    """A transformers causal LM in float32 on the CPU, behind the profiler's runtime interface."""

    name = "transformers"
    #: bytes per KV-cache element: transformers keeps the cache in the activation dtype
    kv_bytes_per_element = 4

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.n_ctx = n_ctx
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_folder(self.path), trust_remote_code=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes and transformers warn on every CPU load
            self.model = self.load_model(self.path).eval()

    # -- what a subclass provides ------------------------------------------------------------
    def load_model(self, path: Path):
        raise NotImplementedError

    def tokenizer_folder(self, path: Path) -> Path:
        return path.parent

    @classmethod
    def describe_weights(cls, path: Path) -> dict[str, Any]:
        """``config`` (the HF config.json), ``tensor_bytes`` (all weights in memory),
        ``embedding_bytes`` and, optionally, ``load_transient_bytes`` (what loading reads) and
        ``tokenizer_dir`` (where the tokenizer is loaded from, if not beside the weights)."""
        raise NotImplementedError

    # -- the runtime interface ---------------------------------------------------------------
    @staticmethod
    def import_library() -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch

        if len(tokens) > self.n_ctx:
            raise ValueError(f"window of {len(tokens)} tokens exceeds n_ctx={self.n_ctx}")
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False)
        return out.logits[0].to(torch.float32).numpy()

    def generate_timed(self, prompt: list[int], n_generate: int) -> dict[str, float]:
        """Greedy generation with the KV cache; prefill (time to first token) and decode seconds."""
        import torch

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            out = self.model(input_ids=torch.tensor([prompt], dtype=torch.long), use_cache=True)
            token = out.logits[0, -1].argmax()
            first = time.perf_counter()
            for _ in range(n_generate):
                out = self.model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax()
            end = time.perf_counter()
        return {"prefill_s": first - start, "decode_s": end - first}

    @classmethod
    def describe(cls, path: Path) -> dict[str, int]:
        weights = cls.describe_weights(Path(path))
        config, tensor_bytes = weights["config"], weights["tensor_bytes"]
        sizes = config_sizes(config)
        text = config.get("text_config") or config
        tied = bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", True)))
        return {
            **sizes,
            "tensor_bytes": tensor_bytes,
            "kv_bytes_per_element": cls.kv_bytes_per_element,
            # decoding reads every weight once, except an untied embedding table (one row per token)
            "bytes_read_per_token": tensor_bytes - (0 if tied else weights["embedding_bytes"]),
            "load_transient_bytes": weights.get("load_transient_bytes", 0),
            "runtime_overhead_bytes": cls.tokenizer_bytes(weights.get("tokenizer_dir", Path(path).parent)),
            "linear_params": linear_params(sizes, int(text.get("intermediate_size") or 4 * sizes["n_embd"])),
            "max_ctx": text.get("max_position_embeddings"),
            # what the weights occupy where the format is served natively (GPTQ kernels keep
            # them packed), as opposed to this CPU runtime's float32 copy
            **{k: weights[k] for k in ("deployed_weight_bytes", "deployed_bytes_read_per_token") if k in weights},
        }

    def close(self) -> None:
        self.model = None


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
