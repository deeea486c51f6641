"""bitsandbytes artifacts: the source checkpoint loaded by transformers with a BitsAndBytesConfig."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..source import DTYPE_BYTES, Source, resolve_source
from . import register_runtime
from .hf import TransformersRuntime

__all__ = ["BnbRuntime"]

# bytes per weight element of a quantized nn.Linear, with bitsandbytes' statistics:
# LLM.int8() keeps one float32 scale per output row; NF4/FP4 one float32 absmax per 64 weights
_BYTES_PER_ELEMENT = {"int8": 1.0, "4bit": 0.5 + 4 / 64}


def _read(path: Path) -> tuple[dict[str, Any], Source]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        source_id = config["source"]["id"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: not a readable bitsandbytes artifact config ({exc})") from exc
    return config, resolve_source(source_id)


def _is_quantized_linear(name: str, shape: tuple[int, ...]) -> bool:
    # transformers replaces every nn.Linear inside the decoder blocks; the embedding, norms and
    # the output head stay in the load dtype
    return len(shape) == 2 and ".layers." in name and name.endswith(".weight")


@register_runtime("bnb")
class BnbRuntime(TransformersRuntime):
    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True):
        self.config, self.source = _read(path)
        super().__init__(path, n_ctx=n_ctx, threads=threads, logits_all=logits_all)

    @staticmethod
    def import_library() -> None:
        import bitsandbytes  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def tokenizer_folder(self, path: Path) -> Path:
        return self.source.path

    def load_model(self, path: Path):
        import logging

        import torch

        # LLM.int8() logs a cast notice on every matmul of a float32 input
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        args = dict(self.config["quantization_config"])
        if "bnb_4bit_compute_dtype" in args:
            args["bnb_4bit_compute_dtype"] = getattr(torch, args["bnb_4bit_compute_dtype"])
        return AutoModelForCausalLM.from_pretrained(
            self.source.path, quantization_config=BitsAndBytesConfig(**args), device_map="cpu",
            dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
        )

    @classmethod
    def describe_weights(cls, path: Path) -> dict[str, Any]:
        config, source = _read(path)
        per = _BYTES_PER_ELEMENT["int8" if config["quantization_config"].get("load_in_8bit") else "4bit"]
        total, embd, transient = 0, 0, 0
        for name, info in source.tensors.items():
            n = math.prod(info.shape)
            quantized = _is_quantized_linear(name, info.shape)
            size = int(n * per) + (4 * info.shape[0] if per == 1.0 else 0) if quantized else 4 * n
            total += size
            if name.endswith("embed_tokens.weight"):
                embd = size
            # transformers reads the checkpoint through a memory map: the pages of every tensor it
            # quantizes or converts stay resident while loading; a float32 tensor kept as it is
            # (embeddings, norms of a float32 checkpoint) is those pages, already in tensor_bytes
            if quantized or info.dtype != "F32":
                transient += n * DTYPE_BYTES.get(info.dtype, 4)
        return {
            "config": source.config,
            "tensor_bytes": total,
            "embedding_bytes": embd,
            "load_transient_bytes": transient,
            "tokenizer_dir": source.path,
        }
