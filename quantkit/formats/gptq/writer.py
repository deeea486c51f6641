"""Writing a GPTQ checkpoint folder that transformers, vLLM and GPTQModel recognise (v1 layout).

``model.safetensors`` (or shards plus ``model.safetensors.index.json``) with the packed tensors
of every quantized Linear and every other tensor in float16, ``config.json`` carrying a
``quantization_config``, ``quantize_config.json`` (auto-gptq / GPTQModel), and the source's
tokenizer and generation files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import ConversionError
from .algorithm import QuantizedWeight
from .packing import pack_linear

__all__ = [
    "SafetensorsShardWriter",
    "write_checkpoint",
    "quantization_config",
    "copy_tokenizer_files",
    "write_configs",
    "WEIGHTS_NAME",
    "INDEX_NAME",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
)


class SafetensorsShardWriter:
    """Collects tensors into safetensors shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own). States: open (``add``) -> closed (``close``); shards are
    numbered only at ``close``, once their count is known (HF's model-0000i-of-0000N names)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 10**9):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ConversionError(f"safetensors writer: add({name!r}) after close; expected no more tensors")
        if name in self._names:
            raise ConversionError(f"safetensors writer: tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and, when there are several, the index; returns the file names."""
        if self._closed:
            raise ConversionError("safetensors writer: close() called twice")
        if self._pending or not self._shards:
            self._flush()
        self._closed = True
        if len(self._shards) == 1:
            os.replace(self._shards[0][0], self.folder / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        n, weight_map, names = len(self._shards), {}, []
        for i, (path, tensors) in enumerate(self._shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_NAME]


def _to_float16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.detach().to(torch.float16)
    if tensor.is_floating_point() and not torch.isfinite(half).all() and torch.isfinite(tensor).all():
        raise ConversionError(f"{name}: values beyond the float16 range (±65504) cannot be stored in a GPTQ checkpoint")
    return half


def write_checkpoint(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantized: Mapping[str, QuantizedWeight],
    bits: int,
    *,
    max_shard_bytes: int = 2 * 10**9,
) -> list[str]:
    """Write the weights: for a Linear ``name`` in ``quantized`` its packed qweight, qzeros,
    scales and g_idx (and bias, float16) instead of ``name.weight``; every other tensor float16.

    ``tensors`` is the model's state dict in order; a tensor sharing storage with one already
    written (tied input and output embeddings) is written once, as ``save_pretrained`` does."""
    writer = SafetensorsShardWriter(folder, max_shard_bytes)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in tensors:
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized and leaf == "weight":
            q = quantized[prefix]
            for part, packed in pack_linear(q.codes, q.zeros, q.scales, q.g_idx, bits).items():
                writer.add(f"{prefix}.{part}", packed)
        else:
            writer.add(name, _to_float16(name, tensor) if tensor.is_floating_point() else tensor)
    return writer.close()


def quantization_config(*, bits: int, group_size: int, desc_act: bool, sym: bool, static_groups: bool, damp: float, true_sequential: bool) -> dict[str, Any]:
    """The ``quantization_config`` transformers/optimum, vLLM and GPTQModel read (v1 format)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp,
        "true_sequential": true_sequential,
        "static_groups": static_groups,
        "checkpoint_format": "gptq",
    }


def write_configs(folder: Path, source_config: Mapping[str, Any], qconfig: Mapping[str, Any]) -> None:
    """``config.json`` (the source's, weights now float16 plus the quantization config) and
    auto-gptq's ``quantize_config.json``."""
    config = dict(source_config)
    config["quantization_config"] = dict(qconfig)
    # transformers >= 4.56 writes "dtype", older readers (and vLLM through them) "torch_dtype"
    config["torch_dtype"] = config["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    quantize = {**qconfig, "model_file_base_name": "model", "model_name_or_path": None}
    (folder / "quantize_config.json").write_text(json.dumps(quantize, indent=2, sort_keys=True) + "\n")


def _is_sentencepiece(path: Path) -> bool:
    """True for a SentencePiece model proto; transformers saves a GGUF-loaded tokenizer's source
    file (not SentencePiece) under the same name, and loaders choke on it."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        return len(proto.pieces) > 0
    except Exception:  # any parse failure means "not a SentencePiece model"
        return False


def copy_tokenizer_files(source_folder: Path, folder: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files the source has."""
    copied = []
    for name in _TOKENIZER_FILES:
        if (source_folder / name).is_file():
            shutil.copyfile(source_folder / name, folder / name)
            copied.append(name)
    spm = source_folder / "tokenizer.model"
    if spm.is_file() and _is_sentencepiece(spm):
        shutil.copyfile(spm, folder / "tokenizer.model")
        copied.append("tokenizer.model")
    return copied
