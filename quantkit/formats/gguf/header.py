"""A fast reader of GGUF headers: key/values and tensor infos, never the tensor data.

gguf-py's ``GGUFReader`` builds a numpy view for every part of every field; on a 262k-token
vocabulary that takes seconds. The profiler and the converter only need scalars, array lengths
and tensor infos, so this parser walks the header once with ``struct`` and skips string arrays
by their lengths. Layout (GGUF v2/v3, little-endian): magic, version u32, tensor_count u64,
kv_count u64; each kv is a string key, a u32 value type and the value; each tensor info is a
string name, n_dims u32, dims u64[n_dims] (ne0 first), ggml type u32, offset u64 relative to the
data section, which starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import SourceError

__all__ = ["GGUFHeader", "TensorHeader", "StringArray", "read_header", "read_gguf_summary"]

# GGUF value type -> (struct code, numpy dtype) for the fixed-size types
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """An array of strings, kept as its length (the strings are skipped, not decoded)."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorHeader:
    name: str
    shape: tuple[int, ...]  # ne0 first, as stored
    tensor_type: gguf.GGMLQuantizationType
    data_offset: int  # absolute, in bytes from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]
    tensors: list[TensorHeader]
    data_start: int


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def take(self, code: str) -> Any:
        value = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype == _STRING:
                for _ in range(count):  # skip each string by its length
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
                if self.pos > len(self.buf):
                    raise struct.error("string array runs past the end of the file")
                return StringArray(count)
            if etype not in _SCALARS:
                raise ValueError(f"unsupported GGUF array element type {etype}")
            dtype = np.dtype("<" + _SCALARS[etype])
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path``; raises ValueError/struct.error on damage."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(buf[:4])!r}")
        cur.pos = 4
        version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            shape = tuple(cur.take("Q") for _ in range(cur.take("I")))
            qtype = gguf.GGMLQuantizationType(cur.take("I"))
            infos.append((name, shape, qtype, cur.take("Q")))
        alignment = int(fields.get("general.alignment", 32))
        data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        tensors.append(TensorHeader(name, shape, qtype, data_start + offset, n_bytes))
    return GGUFHeader(version, fields, tensors, data_start)


def read_gguf_summary(path: Path) -> dict:
    """Validate a GGUF file (magic, header, tensor data within the file) and summarise it."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SourceError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        reader = read_header(path)
    except Exception as exc:  # ValueError/struct.error on damage
        raise SourceError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise SourceError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
    file_type, arch = reader.fields.get("general.file_type"), reader.fields.get("general.architecture")
    if file_type is not None and not isinstance(file_type, int):
        raise SourceError(f"{path}: corrupt GGUF header (general.file_type is not an integer)")
    if arch is not None and not isinstance(arch, str):
        raise SourceError(f"{path}: corrupt GGUF header (general.architecture is not a string)")
    return {
        "gguf_architecture": arch,
        "file_type": file_type,
        "tensor_count": len(reader.tensors),
    }
