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
    "write_tensors",
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


# safetensors' dtype names, in the order its serializer sorts by (largest first, then by name)
_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}
_RANK = {name: i for i, name in enumerate(_DTYPES.values())}
_COPY_BYTES = 64 << 20


class SafetensorsShardWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own), holding one tensor at a time: each tensor's bytes go to
    a spool file as they come, and a shard is written, header first, when it is full. The bytes
    are those ``safetensors.torch.save_file`` writes (tensors ordered by dtype, then name).
    States: open (``add``) -> closed (``close``); shards are numbered only at ``close``, once
    their count is known (HF's model-0000i-of-0000N names)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 10**9):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, spool offset, bytes
        self._pending_bytes = 0
        self._spool = None
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ConversionError(f"safetensors writer: add({name!r}) after close; expected no more tensors")
        if name in self._names:
            raise ConversionError(f"safetensors writer: tensor {name!r} written twice")
        if tensor.dtype not in _DTYPES:
            raise ConversionError(f"safetensors writer: {name!r} has dtype {tensor.dtype}, not one of {list(_DTYPES)}")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._spool is None:
            self._spool = open(self.folder / f".spool-{len(self._shards):05d}", "w+b")  # noqa: SIM115 (closed in _flush)
        self._names.add(name)
        offset = self._spool.tell()
        self._spool.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._pending[name] = (_DTYPES[tensor.dtype], list(tensor.shape), offset, size)
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        order = sorted(self._pending, key=lambda n: (-_RANK[self._pending[n][0]], n))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        start = 0
        for name in order:
            dtype, shape, _, size = self._pending[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
            start += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        spool = self._spool
        with open(path, "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            for name in order:
                _, _, offset, size = self._pending[name]
                spool.seek(offset)
                while size:
                    chunk = spool.read(min(size, _COPY_BYTES))
                    out.write(chunk)
                    size -= len(chunk)
        if spool is not None:
            spool.close()
            os.unlink(spool.name)
        self._spool = None
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


def write_tensors(
    writer: SafetensorsShardWriter,
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantized: Mapping[str, QuantizedWeight],
    bits: int,
) -> None:
    """Add weights in order: for a Linear ``name`` in ``quantized`` its packed qweight, qzeros,
    scales and g_idx instead of ``name.weight``; every other tensor (biases too) float16."""
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized and leaf == "weight":
            q = quantized[prefix]
            for part, packed in pack_linear(q.codes, q.zeros, q.scales, q.g_idx, bits).items():
                writer.add(f"{prefix}.{part}", packed)
        else:
            writer.add(name, _to_float16(name, tensor) if tensor.is_floating_point() else tensor)


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
