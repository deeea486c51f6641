"""Streaming HF -> GGUF (F32/F16/BF16) writer built on gguf-py's GGUFWriter.

The writer moves through GGUFWriter's states explicitly: all tensor infos are declared from
the safetensors headers (no tensor loaded), header/key-values/tensor-infos are written, then
each tensor is loaded, transformed, written and dropped. Peak memory is about the largest
tensor (in float32), not the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ...errors import SourceError, UnsupportedArchitectureError
from ...source import Source
from .arch import HParams, arch_for_config, extra_tensors, transform_tensor, write_hparams
from .vocab import load_vocab

__all__ = ["FLOAT_TYPES", "write_float_gguf"]

Q = gguf.GGMLQuantizationType
# output name -> (tensor type for 2-D weights, llama.cpp file type)
FLOAT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_SKIP = re.compile(r"rotary_emb\.inv_freq$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class _Planned:
    hf_name: str | None  # None for tensors computed here (e.g. rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def _order(name: str) -> tuple[int, str]:
    m = _BLOCK.match(name)
    if m:
        return (int(m.group(1)) + 1, name)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 1 << 30, name)


def _plan(source: Source, arch, float_type: str) -> list[_Planned]:
    hp = HParams.from_config(source.config)
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, hp.n_layers)
    target = FLOAT_TYPES[float_type][0]
    plan = []
    for name, info in source.tensors.items():
        if _SKIP.search(name):
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedArchitectureError(f"tensor {name!r} has no GGUF name for {arch.arch_name}")
        if info.dtype not in ("F32", "F16", "BF16"):
            raise SourceError(f"tensor {name!r} has dtype {info.dtype}; only float checkpoints convert to GGUF")
        qtype = target if len(info.shape) >= 2 else Q.F32  # norms and biases stay F32, as in llama.cpp
        plan.append(_Planned(name, gname, info.shape, qtype))
    for gname, data in extra_tensors(source.config).items():
        plan.append(_Planned(None, gname, data.shape, Q.F32))
    return sorted(plan, key=lambda p: _order(p.gguf_name))


def _cast(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.BF16:
        import torch  # numpy has no bfloat16; torch rounds to nearest even like llama.cpp

        return torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return data.astype(np.float16 if qtype == Q.F16 else np.float32, copy=False)


def write_float_gguf(
    source: Source, out_path: Path, float_type: str, advance: Callable[[int], None] | None = None
) -> dict:
    """Write ``source`` as a GGUF file of ``float_type`` (f32/f16/bf16); returns details."""
    arch = arch_for_config(source.config)
    vocab = load_vocab(source.path, source.config)  # validated before anything is written
    plan = _plan(source, arch, float_type)
    extras = extra_tensors(source.config)

    writer = gguf.GGUFWriter(path=None, arch=arch.arch_name)
    writer.add_name(source.name)
    writer.add_file_type(int(FLOAT_TYPES[float_type][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, arch, source.config)
    vocab.write(writer)
    for p in plan:
        itemsize = 4 if p.qtype == Q.F32 else 2
        nbytes = int(np.prod(p.shape)) * itemsize
        np_dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[p.qtype]
        raw = Q.BF16 if p.qtype == Q.BF16 else None
        writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with source.open_tensors() as reader:
        for p in plan:
            if p.hf_name is None:
                data = extras[p.gguf_name]
            else:
                data = transform_tensor(arch, p.hf_name, reader.get(p.hf_name), source.config)
            writer.write_tensor_data(np.ascontiguousarray(_cast(data, p.qtype)))
            if advance:
                advance(1)
    writer.close()
    return {
        "gguf_architecture": arch.arch_name,
        "tokenizer_model": vocab.model,
        "tokenizer_pre": vocab.pre,
        "tensor_count": len(plan),
    }


def tensor_count(source: Source) -> int:
    return sum(1 for n in source.tensors if not _SKIP.search(n)) + len(extra_tensors(source.config))
