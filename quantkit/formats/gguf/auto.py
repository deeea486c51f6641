"""``gguf:auto``: a llama.cpp type for every tensor, chosen under a size budget from measured costs.

1. **Options.** The lossless intermediate GGUF is quantized once per candidate type, every tensor
   to that type, with the importance matrix; llama.cpp falls back where a tensor's rows do not
   divide into the type's blocks (a 640-wide Gemma 3 matrix gets q4_0 when q3_k is asked), so a
   tensor's options are the types it really got, with their bytes. For each option: the
   importance-weighted squared error of the tensor, ``sum_j imatrix_j sum_i (w_ij - q_ij)^2``
   (llama.cpp's own quantization objective), on an even sample of rows.
2. **Sensitivity.** Tensors are grouped by role and layer range (``attn_q[0-5]``, ...; the token
   embedding and the output head alone). On a few calibration windows the KL divergence against
   the float reference is measured for the model in q8_0, then with one group moved down to
   ``PROBE_TYPE`` (or its fallback): the increase per unit of weighted error is that group's
   sensitivity (floored at the measurement's standard error).
3. **Choice.** A tensor's predicted KLD cost at a type is its group's sensitivity times its error
   there; a multiple-choice knapsack picks one type per tensor minimising the summed cost within
   the byte budget. One llama.cpp quantization with a type override per tensor writes the
   artifact, which is then scored on the same windows: the manifest records every type, the
   predicted and the measured KLD.

The analysis (steps 1 and 2) does not depend on the budget: one conversion shares it between
recipes of several sizes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import InputError, RecipeError
from ...progress import Progress
from .quantize import quantize_gguf

__all__ = ["CANDIDATE_TYPES", "PROBE_TYPE", "Analysis", "analyse", "knapsack", "parse_budget", "budget_label",
           "check_budget", "quantize_choice", "measured_kld"]

#: the types asked for (llama.cpp's fallbacks for narrow rows add q4_0, q5_0, q5_1 and iq4_nl)
CANDIDATE_TYPES = ("q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0")
BASE_TYPE = "q8_0"  # the near-lossless model each group is moved down from
PROBE_TYPE = "q3_k"  # where a group is moved to when its sensitivity is measured
LAYER_RANGES = 3  # layer ranges per tensor role
ERROR_ROWS = 2048  # rows per tensor the weighted error is computed on, in ERROR_BANDS evenly spaced bands
ERROR_BANDS = 16
KNAPSACK_STEPS = 100_000  # the byte budget's resolution
# llama.cpp's fallback when a row does not divide into a type's blocks (llama-quant.cpp,
# tensor_type_fallback): used only to refuse an impossible budget before any work
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}
# the file type a mix is labelled with (general.file_type), by the type holding most bytes
_LABEL = {"q2_k": "q2_k", "q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "q6_k": "q6_k", "q8_0": "q8_0",
          "q4_0": "q4_0", "q5_0": "q5_0", "q5_1": "q5_1", "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs"}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(b|kb|mb|gb|tb|kib|mib|gib|tib)?$")
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}
_BPW = re.compile(r"^(\d+(?:\.\d+)?)bpw$")


def parse_budget(text: str) -> dict[str, Any]:
    """``4.5bpw`` -> {"target_bpw": 4.5}; ``250MB``, ``1.5GiB``, ``123456`` -> {"target_size": bytes}."""
    value = str(text).strip().lower().replace(" ", "")
    if m := _BPW.match(value):
        bpw = float(m[1])
        if not 1.0 <= bpw <= 16.0:
            raise RecipeError(f"gguf:auto target {text!r}: bits per weight between 1 and 16")
        return {"target_bpw": bpw}
    if m := _SIZE.match(value):
        size = int(float(m[1]) * _UNITS[m[2]])
        if size <= 0:
            raise RecipeError(f"gguf:auto target {text!r}: a size above zero")
        return {"target_size": size}
    raise RecipeError(f"gguf:auto target {text!r}: expected bits per weight (4.5bpw) or a file size (250MB, 1.5GiB, bytes)")


def budget_label(budget: Mapping[str, Any]) -> str:
    """The scheme suffix of a budget: ``4.5bpw``, ``250mb`` or the size in bytes."""
    if "target_bpw" in budget:
        return f"{budget['target_bpw']:g}bpw"
    size = int(budget["target_size"])
    for unit in ("gb", "gib", "mb", "mib", "kb", "kib"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}b"


def knapsack(items: Sequence[Sequence[tuple[int, float]]], capacity: int) -> list[int] | None:
    """One option index per item, minimising the summed cost with the summed weight at most
    ``capacity`` (options are (integer weight, cost)); None when even the lightest do not fit.
    Exact dynamic programme over the capacity; ties keep the earlier option."""
    best = np.zeros(capacity + 1)  # least cost of the items so far with weight <= c
    picks = np.empty((len(items), capacity + 1), dtype=np.int16)
    for k, options in enumerate(items):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int16)
        for j, (weight, cost) in enumerate(options):
            if weight > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[weight:] = best[: capacity + 1 - weight] + cost
            better = candidate < new
            new[better], pick[better] = candidate[better], j
        best, picks[k] = new, pick
    if not np.isfinite(best[capacity]):
        return None
    chosen, c = [], capacity
    for k in range(len(items) - 1, -1, -1):
        j = int(picks[k, c])
        chosen.append(j)
        c -= items[k][j][0]
    return chosen[::-1]


def group_of(name: str, n_layers: int) -> str:
    """``blk.7.attn_q.weight`` -> ``attn_q[6-11]`` (role and layer range); other tensors alone."""
    m = re.match(r"^blk\.(\d+)\.(.+)\.weight$", name)
    if not m:
        return name.removesuffix(".weight")
    ranges = max(1, min(LAYER_RANGES, n_layers))
    r = int(m[1]) * ranges // n_layers
    lo = next(i for i in range(n_layers) if i * ranges // n_layers == r)
    hi = max(i for i in range(n_layers) if i * ranges // n_layers == r)
    return f"{m[2]}[{lo}-{hi}]"


@dataclass(frozen=True)
class Option:
    type: str
    nbytes: int
    error: float  # importance-weighted squared error of the whole tensor


@dataclass
class Tensor:
    name: str
    group: str
    options: dict[str, Option]  # by type, lightest first


@dataclass
class Analysis:
    """What a budget's choice needs: each tensor's options and each group's sensitivity."""

    tensors: list[Tensor]
    fixed_file_bytes: int  # file bytes no choice changes: metadata and unquantized tensors
    fixed_tensor_bytes: int  # of which tensor data
    n_params: int  # every tensor's elements
    base_kld: float
    windows: list[list[int]]
    reference: Any  # the float model's ReferenceScores on the windows
    sensitivity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cost(self, tensor: Tensor, kind: str) -> float:
        """Predicted KLD added by ``tensor`` at ``kind`` over the base type."""
        per_error = self.sensitivity[tensor.group]["per_error"]
        return per_error * (tensor.options[kind].error - tensor.options[BASE_TYPE].error)

    def predicted_kld(self, types: Mapping[str, str]) -> float:
        return self.base_kld + sum(self.cost(t, types[t.name]) for t in self.tensors)

    def file_bytes(self, types: Mapping[str, str]) -> int:
        return self.fixed_file_bytes + sum(t.options[types[t.name]].nbytes for t in self.tensors)

    def bpw(self, types: Mapping[str, str]) -> float:
        tensor_bytes = self.fixed_tensor_bytes + sum(t.options[types[t.name]].nbytes for t in self.tensors)
        return 8.0 * tensor_bytes / self.n_params

    def item_budget(self, budget: Mapping[str, Any]) -> int:
        """Bytes the chosen tensors may take: a file size less the fixed bytes, or bits per
        weight over every parameter (llama.cpp's BPW: tensor bytes only) less the fixed tensors."""
        if "target_size" in budget:
            return int(budget["target_size"]) - self.fixed_file_bytes
        return int(budget["target_bpw"] * self.n_params / 8) - self.fixed_tensor_bytes

    def choose(self, budget: Mapping[str, Any], label: str) -> dict[str, str]:
        """The type of every tensor minimising the predicted KLD within ``budget``."""
        room = self.item_budget(budget)
        lightest = {t.name: next(iter(t.options)) for t in self.tensors}
        if room < sum(t.options[lightest[t.name]].nbytes for t in self.tensors):
            raise InputError(f"gguf:{label}: the smallest mix of {', '.join(CANDIDATE_TYPES)} is "
                             f"{self.file_bytes(lightest) / 1e6:.1f} MB ({self.bpw(lightest):.2f} bpw); raise the target")
        unit = max(1, room // KNAPSACK_STEPS)
        items = [[(math.ceil(o.nbytes / unit), self.cost(t, o.type)) for o in t.options.values()] for t in self.tensors]
        picks = knapsack(items, room // unit)
        if picks is None:  # only the rounding up of sizes can make the lightest mix not fit
            return lightest
        return {t.name: list(t.options)[j] for t, j in zip(self.tensors, picks, strict=True)}

    def describe(self, types: Mapping[str, str], budget: Mapping[str, Any]) -> dict[str, Any]:
        """What the manifest records of one choice."""
        counts: dict[str, int] = {}
        for kind in types.values():
            counts[kind] = counts.get(kind, 0) + 1
        groups: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            groups.setdefault(t.group, {}).setdefault(types[t.name], 0)
            groups[t.group][types[t.name]] += 1
        return {
            "budget": dict(budget),
            "predicted_file_bytes": self.file_bytes(types),
            "bpw": round(self.bpw(types), 4),
            "predicted_kld": self.predicted_kld(types),
            "base_type": BASE_TYPE,
            "base_kld": self.base_kld,
            "probe_type": PROBE_TYPE,
            "candidate_types": list(CANDIDATE_TYPES),
            "probe_windows": len(self.windows),
            "probe_tokens": len(self.reference),
            "type_counts": dict(sorted(counts.items())),
            "groups": {g: {"types": groups[g], **self.sensitivity[g]} for g in sorted(groups)},
            "types": dict(types),
        }


def check_budget(base: Path, budget: Mapping[str, Any], label: str) -> None:
    """Refuse, before any work, a budget below the smallest mix the candidate types can give the
    lossless GGUF ``base`` (from its tensor shapes, llama.cpp's fallbacks applied)."""
    reader = gguf.GGUFReader(base)
    tensors = _smallest_tensors(reader)
    params = sum(int(t.n_elements) for t in reader.tensors)
    size = base.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors) + tensors
    if budget.get("target_size", math.inf) < size or budget.get("target_bpw", math.inf) < 8 * tensors / params:
        raise InputError(f"gguf:{label}: the smallest mix of {', '.join(CANDIDATE_TYPES)} is about {size / 1e6:.1f} MB "
                         f"({8 * tensors / params:.2f} bpw); raise the target")


def _smallest_tensors(reader: gguf.GGUFReader) -> int:
    total = 0
    for t in reader.tensors:
        if len(t.shape) < 2:
            total += int(t.n_bytes)
            continue
        ncols, n = int(t.shape[0]), int(t.n_elements)
        sizes = []
        for kind in CANDIDATE_TYPES:
            for candidate in (kind, _FALLBACK.get(kind)):
                if candidate is None:
                    continue
                block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[candidate.upper()]]
                if ncols % block == 0:
                    sizes.append(n // block * nbytes)
                    break
        total += min(sizes) if sizes else int(t.n_bytes)
    return total


def _sample_rows(fd: int, tensor: Any) -> np.ndarray:
    """Up to ERROR_ROWS rows of a GGUF tensor as dequantized float32, read with ``pread`` in
    ERROR_BANDS evenly spaced bands (a memory map would keep every page around a touched row
    resident: the whole model, over the candidate files)."""
    from gguf.quants import dequantize

    rows = int(tensor.n_elements) // int(tensor.shape[0])
    row_bytes = int(tensor.n_bytes) // rows
    if rows <= ERROR_ROWS:
        spans = [(0, rows)]
    else:
        band = ERROR_ROWS // ERROR_BANDS
        spans = [(k * (rows - band) // (ERROR_BANDS - 1), band) for k in range(ERROR_BANDS)]
    data = b"".join(os.pread(fd, n * row_bytes, int(tensor.data_offset) + start * row_bytes) for start, n in spans)
    return dequantize(np.frombuffer(data, dtype=np.uint8).reshape(-1, row_bytes), tensor.tensor_type)


def _weighted_error(original: np.ndarray, quantized: np.ndarray, rows: int, weights: np.ndarray | None) -> float:
    """sum_j weights_j sum_i (w_ij - q_ij)^2 of a tensor of ``rows`` rows, from the same sample
    of rows of the original and the quantized tensor."""
    col = ((original - quantized) ** 2).sum(0, dtype=np.float64)
    total = float(col @ weights) if weights is not None and weights.size == col.size else float(col.sum())
    return total * rows / original.shape[0]


def _is_quantized(kind: gguf.GGMLQuantizationType) -> bool:
    return kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def _options(base: Path, imatrix: Path, originals: Mapping[str, Any], base_fd: int, means: Mapping[str, np.ndarray],
             total: int, work: Path, threads: int | None, progress: Progress
             ) -> tuple[dict[str, dict[str, Option]], dict[str, str], int, int]:
    """Step 1: every quantizable tensor's options (type, bytes, weighted error), the type each got
    in PROBE_TYPE, and the tensor and file bytes no choice changes. The BASE_TYPE file stays in
    ``work`` (the probes' reference point); the others go once read."""
    base_file = work / f"auto-{BASE_TYPE}.gguf"
    options: dict[str, dict[str, Option]] = {}
    probe_types: dict[str, str] = {}
    fixed_tensor_bytes = 0
    for kind in (BASE_TYPE, *(k for k in CANDIDATE_TYPES if k != BASE_TYPE)):
        path = base_file if kind == BASE_TYPE else work / f"auto-{kind}.gguf"
        with progress.task(f"gguf:auto: every tensor in {kind}", total) as advance:
            quantize_gguf(base, path, "q8_0", threads=threads, advance=advance, imatrix=imatrix, overrides=[(".", kind)],
                          pure=True)
        reader = gguf.GGUFReader(path)
        with progress.task(f"gguf:auto: weighted errors in {kind}", total) as advance, open(path, "rb") as fh:
            for t in reader.tensors:
                advance(1)
                if kind == BASE_TYPE:
                    if not _is_quantized(t.tensor_type):
                        fixed_tensor_bytes += int(t.n_bytes)
                        continue
                    options[t.name] = {}
                elif t.name not in options:
                    continue
                actual = t.tensor_type.name.lower()
                if kind == PROBE_TYPE:
                    probe_types[t.name] = actual
                if actual not in options[t.name]:
                    rows = int(t.n_elements) // int(t.shape[0])
                    error = _weighted_error(_sample_rows(base_fd, originals[t.name]), _sample_rows(fh.fileno(), t), rows,
                                            means.get(t.name))
                    options[t.name][actual] = Option(actual, int(t.n_bytes), error)
        if kind == BASE_TYPE:
            fixed_file_bytes = path.stat().st_size - sum(o[BASE_TYPE].nbytes for o in options.values())
        else:
            del reader
            path.unlink()
    return options, probe_types, fixed_tensor_bytes, fixed_file_bytes


def analyse(
    base: Path,
    imatrix: Path,
    reference: Any,
    windows: list[list[int]],
    work: Path,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Steps 1 and 2 (module docstring) for the lossless GGUF ``base``, quantized with the GGUF
    ``imatrix``; sensitivities on ``windows`` against ``reference``, the float model's
    ``ReferenceScores`` of them."""
    from .imatrix import ImportanceMatrix

    progress = progress or Progress(False)
    means = ImportanceMatrix.read(imatrix).means()
    original = gguf.GGUFReader(base)
    originals = {t.name: t for t in original.tensors}
    n_params = sum(int(t.n_elements) for t in original.tensors)
    total = len(original.tensors)
    with open(base, "rb") as fh:
        options, probe_types, fixed_tensor_bytes, fixed_file_bytes = _options(base, imatrix, originals, fh.fileno(), means,
                                                                              total, work, threads, progress)
    del originals, original  # the intermediate's map
    base_file = work / f"auto-{BASE_TYPE}.gguf"
    names = list(options)
    n_layers = 1 + max((int(m[1]) for n in names if (m := re.match(r"^blk\.(\d+)\.", n))), default=0)
    tensors = [Tensor(n, group_of(n, n_layers), dict(sorted(options[n].items(), key=lambda kv: (kv[1].nbytes, kv[0]))))
               for n in names]
    groups: dict[str, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.group, []).append(t)

    base_kld = token_kld(base_file, windows, reference, threads)
    analysis = Analysis(tensors, fixed_file_bytes, fixed_tensor_bytes, n_params, float(base_kld.mean()), windows,
                        reference)
    probe_file = work / "auto-probe.gguf"
    with progress.task("gguf:auto: sensitivity of each tensor group", len(groups)) as advance:
        for group, members in groups.items():
            overrides = [(f"^{re.escape(t.name)}$", PROBE_TYPE) for t in members]
            quantize_gguf(base, probe_file, "q8_0", threads=threads, imatrix=imatrix, overrides=overrides, pure=True)
            diff = token_kld(probe_file, windows, reference, threads) - base_kld
            probe_file.unlink()
            delta = float(diff.mean())
            stderr = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
            error = sum(t.options[probe_types[t.name]].error - t.options[BASE_TYPE].error for t in members)
            # a group whose move is lost in the noise still costs: its increase is at least one stderr
            analysis.sensitivity[group] = {"probe_kld_delta": delta, "probe_kld_stderr": stderr,
                                           "per_error": max(delta, stderr, 1e-12) / max(error, 1e-30)}
            advance(1)
    return analysis


def quantize_choice(base: Path, out: Path, types: Mapping[str, str], imatrix: Path, analysis: Analysis, *,
                    threads: int | None, advance: Callable[[int], None] | None = None) -> None:
    """One llama.cpp quantization of ``base`` with every tensor's type given; the file type label
    is that of the type holding the most bytes."""
    by_bytes: dict[str, int] = {}
    for t in analysis.tensors:
        kind = types[t.name]
        by_bytes[kind] = by_bytes.get(kind, 0) + t.options[kind].nbytes
    label = _LABEL.get(max(sorted(by_bytes), key=by_bytes.__getitem__), "q8_0")
    overrides = [(f"^{re.escape(name)}$", kind) for name, kind in types.items()]
    quantize_gguf(base, out, label, threads=threads, advance=advance, imatrix=imatrix, overrides=overrides, pure=True)


def token_kld(path: Path, windows: list[list[int]], reference: Any, threads: int | None) -> np.ndarray:
    """Per-token KLD of the GGUF ``path`` on ``windows`` against the reference's scores of them."""
    from ...profile.quality import score_windows
    from ...runtimes.llamacpp import LlamaCppRuntime

    runtime = LlamaCppRuntime(path, n_ctx=max(map(len, windows)), threads=threads)
    try:
        return np.concatenate([p["kld"] for p in score_windows(runtime, windows, reference)])
    finally:
        runtime.close()


def measured_kld(path: Path, analysis: Analysis, threads: int | None) -> dict[str, float]:
    """Mean KLD of the GGUF ``path`` on the analysis' windows, with its standard error."""
    kld = token_kld(path, analysis.windows, analysis.reference, threads)
    return {"measured_kld": float(kld.mean()),
            "measured_kld_stderr": float(kld.std(ddof=1) / math.sqrt(kld.size)) if kld.size > 1 else 0.0}
