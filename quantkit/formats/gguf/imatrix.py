"""Importance matrices: how much each input column of each weight matrix matters, for llama.cpp's
quantizer to weigh rounding errors by.

For every Linear of every decoder block: the sum over the calibration tokens of the square of
each input column, and how many tokens were summed (the diagonal of the Hessian that GPTQ
accumulates, from the same calibration windows). A mixture of experts' stacked expert tensors get
one row of sums and one count per expert, over the tokens routed to that expert (llama-imatrix's
layout for ``ffn_*_exps``). Computed on the layer-streaming engine
(``LayerStream.steps``: forward hooks on each block while the engine runs it, so memory follows
one block and no block runs twice), keyed by GGUF tensor name. As llama.cpp's ``llama-imatrix``
does, the output head is left out and the activations are the float model's.

The file is llama.cpp's GGUF imatrix format (``general.type = imatrix``; ``<tensor>.in_sum2``
and ``<tensor>.counts``, float32; ``imatrix.datasets``, ``imatrix.chunk_count``,
``imatrix.chunk_size``), so ``llama-quantize --imatrix FILE`` reads what quantkit writes and
quantkit reads what ``llama-imatrix`` writes. ``llama_model_quantize`` takes, per tensor, the
mean square (sum / count), which is what :meth:`ImportanceMatrix.means` gives it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ConversionError, InputError
from ...source import Source

__all__ = ["ImportanceMatrix", "compute_imatrix"]

_IN_SUM2, _COUNTS = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    """Per GGUF weight name: float64 sums of squared inputs (one per input column) and the count
    of tokens summed; for stacked experts, sums [experts, columns] and counts [experts].
    ``datasets`` names the text, ``chunk_size`` its window length."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int | np.ndarray]
    datasets: list[str]
    chunk_size: int

    @property
    def chunk_count(self) -> int:
        return int(max((np.max(c) for c in self.counts.values()), default=0)) // max(self.chunk_size, 1)

    def means(self) -> dict[str, np.ndarray]:
        """float32 mean square per input column (per expert, flattened, for stacked experts; an
        expert that got no token weighs every column 1, as llama-quantize does): what
        ``llama_model_quantize`` weighs errors by."""
        out = {}
        for name in sorted(self.sums):
            sums, counts = self.sums[name], np.asarray(self.counts[name], dtype=np.float64)
            if sums.ndim == 1:
                out[name] = (sums / max(float(counts), 1.0)).astype(np.float32)
            else:
                mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 1.0)
                out[name] = mean.astype(np.float32).reshape(-1)
        return out

    def write(self, path: Path) -> None:
        """Write llama.cpp's GGUF imatrix file (the bytes ``llama-imatrix`` writes for the same data)."""
        writer = gguf.GGUFWriter(path=None, arch="imatrix")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(self.datasets) or ["unknown"])  # llama.cpp needs the key
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, self.chunk_count)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.chunk_size)
        for name in sorted(self.sums):
            writer.add_tensor(name + _IN_SUM2, self.sums[name].astype(np.float32))
            counts = np.asarray(self.counts[name], dtype=np.float32)  # [experts, 1] for stacked experts
            writer.add_tensor(name + _COUNTS, counts.reshape(-1, 1) if self.sums[name].ndim == 2 else counts.reshape(1))
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def digest(self) -> str:
        """sha256 over names, counts and sums: which importance matrix a GGUF was quantized with."""
        h = hashlib.sha256()
        for name in sorted(self.sums):
            counts = self.counts[name]
            counts = str(counts) if np.ndim(counts) == 0 else ",".join(str(int(c)) for c in counts)
            h.update(name.encode() + b"\0" + counts.encode() + b"\0")
            h.update(self.sums[name].astype(np.float32).tobytes())
        return h.hexdigest()

    @classmethod
    def read(cls, path: Path) -> ImportanceMatrix:
        """A GGUF imatrix file (``llama-imatrix``'s or quantkit's)."""
        from .header import read_gguf_summary

        read_gguf_summary(path)  # magic, header and every tensor inside the file, or one line saying what is wrong
        try:
            reader = gguf.GGUFReader(path)
            kind = reader.get_field(gguf.Keys.General.TYPE)
            kind = kind.contents() if kind is not None else None
            tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape([int(n) for n in reversed(t.shape)])
                       for t in reader.tensors}
            datasets = reader.get_field(gguf.Keys.IMatrix.DATASETS)
            datasets = [str(v) for v in datasets.contents()] if datasets else []
            size = reader.get_field(gguf.Keys.IMatrix.CHUNK_SIZE)
            size = int(size.contents()) if size else 0
        except Exception as exc:  # what gguf-py raises on a damaged file (IndexError, ValueError, ...)
            raise InputError(f"{path}: corrupt GGUF imatrix file ({type(exc).__name__}: {exc})") from exc
        if kind != "imatrix":
            raise InputError(f"{path}: not a GGUF imatrix file (general.type is not 'imatrix'; the legacy .dat format is not read)")
        sums, counts = {}, {}
        for key, data in tensors.items():
            if not key.endswith(_IN_SUM2):
                continue
            name = key[: -len(_IN_SUM2)]
            count = tensors.get(name + _COUNTS)
            if count is None:
                raise InputError(f"{path}: {name} has sums but no counts")
            data = data.reshape(-1) if data.ndim == 2 and data.shape[0] == 1 and count.size == 1 else data
            if data.ndim == 1 and count.size == 1:
                sums[name], counts[name] = data, int(round(float(count.reshape(-1)[0])))
            elif data.ndim == 2 and count.size == data.shape[0]:  # stacked experts: a row and a count each
                sums[name], counts[name] = data, np.rint(count.reshape(-1)).astype(np.int64)
            else:
                raise InputError(f"{path}: {name} has {count.size} counts for sums of shape {data.shape}")
        return cls(sums, counts, datasets, size)


def compute_imatrix(
    source: Source, windows: Sequence[list[int]], *, datasets: list[str], task: Callable[[str, int], Any] | None = None
) -> ImportanceMatrix:
    """The importance matrix of ``source`` (an HF decoder) over ``windows`` of token ids."""
    import torch

    from ...runtimes.stream import LayerStream, expert_inputs, is_experts
    from .arch import HParams, arch_for_config

    if not windows:
        raise ConversionError(f"{source.id}: an importance matrix needs calibration windows")
    arch = arch_for_config(source.config)
    names = gguf.get_tensor_name_map(arch.gguf_arch, HParams.from_config(source.config).n_layers)
    stream = LayerStream(source)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, module, args, out) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        sums[name] += (x * x).sum(0, dtype=torch.float64)
        counts[name] += x.shape[0]

    def record_experts(prefix: str, module, args, kwargs) -> None:
        count = module.gate_up_proj.shape[0]
        gate_up, down = f"{prefix}.ffn_gate_exps.weight", f"{prefix}.ffn_down_exps.weight"
        if gate_up not in sums:  # ffn_up_exps sees the same inputs: the gate's sums, copied at the end
            for name, width in ((gate_up, module.gate_up_proj.shape[2]), (down, module.down_proj.shape[2])):
                sums[name], counts[name] = torch.zeros(count, width, dtype=torch.float64), np.zeros(count, dtype=np.int64)
        for e, x, h in expert_inputs(module, args, kwargs):
            sums[gate_up][e] += (x * x).sum(0, dtype=torch.float64)
            sums[down][e] += (h * h).sum(0, dtype=torch.float64)
            counts[gate_up][e] += x.shape[0]
            counts[down][e] += x.shape[0]

    handles: list[Any] = []
    for step in stream.steps(windows, task=task):
        for handle in handles:  # the previous block has run on every window by now
            handle.remove()
        handles = []
        for module_name, module in step.block.named_modules():
            if is_experts(module):  # stacked routed experts: per expert, over its own tokens
                prefix = f"blk.{step.index}"
                handles.append(module.register_forward_pre_hook(partial(record_experts, prefix), with_kwargs=True))
                continue
            if not isinstance(module, torch.nn.Linear):
                continue
            hf_name = f"{stream.layout.blocks}.{step.index}.{module_name}.weight"
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            if name is None:
                raise ConversionError(f"{source.id}: {hf_name} has no GGUF name for {arch.arch_name}")
            sums[name] = torch.zeros(module.in_features, dtype=torch.float64)
            counts[name] = 0
            handles.append(module.register_forward_hook(partial(record, name)))
    for handle in handles:
        handle.remove()
    for prefix in {n.rsplit(".ffn_", 1)[0] for n in sums if n.endswith("_exps.weight")}:  # gate and up share inputs
        sums[f"{prefix}.ffn_up_exps.weight"] = sums[f"{prefix}.ffn_gate_exps.weight"].clone()
        counts[f"{prefix}.ffn_up_exps.weight"] = counts[f"{prefix}.ffn_gate_exps.weight"].copy()
    return ImportanceMatrix({k: v.numpy() for k, v in sums.items()}, counts, datasets, max(len(w) for w in windows))
