"""llama.cpp quantization of a GGUF file through llama-cpp-python's ``llama_model_quantize``."""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np

from ...errors import ConversionError

__all__ = ["QUANT_SCHEMES", "IMATRIX_SCHEMES", "DEFAULT_IMATRIX_SCHEMES", "IMATRIX_SUFFIX", "NO_IMATRIX_SUFFIX",
           "llama_type", "quantize_gguf", "tensor_type_id"]

F = gguf.LlamaFileType
# recipe scheme -> llama.cpp file type
QUANT_SCHEMES: dict[str, gguf.LlamaFileType] = {
    "f32": F.ALL_F32,
    "f16": F.MOSTLY_F16,
    "bf16": F.MOSTLY_BF16,
    "q8_0": F.MOSTLY_Q8_0,
    "q6_k": F.MOSTLY_Q6_K,
    "q5_k_m": F.MOSTLY_Q5_K_M,
    "q5_k_s": F.MOSTLY_Q5_K_S,
    "q5_1": F.MOSTLY_Q5_1,
    "q5_0": F.MOSTLY_Q5_0,
    "q4_k_m": F.MOSTLY_Q4_K_M,
    "q4_k_s": F.MOSTLY_Q4_K_S,
    "q4_1": F.MOSTLY_Q4_1,
    "q4_0": F.MOSTLY_Q4_0,
    "iq4_nl": F.MOSTLY_IQ4_NL,
    "iq4_xs": F.MOSTLY_IQ4_XS,
    "q3_k_l": F.MOSTLY_Q3_K_L,
    "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_s": F.MOSTLY_Q3_K_S,
    "q2_k": F.MOSTLY_Q2_K,
    "iq3_m": F.MOSTLY_IQ3_M,
    "iq3_s": F.MOSTLY_IQ3_S,
    "iq3_xs": F.MOSTLY_IQ3_XS,
    "iq3_xxs": F.MOSTLY_IQ3_XXS,
    "iq2_m": F.MOSTLY_IQ2_M,
    "iq2_s": F.MOSTLY_IQ2_S,
    "iq2_xs": F.MOSTLY_IQ2_XS,
    "iq2_xxs": F.MOSTLY_IQ2_XXS,
    "iq1_m": F.MOSTLY_IQ1_M,
}
#: the types quantized with an importance matrix always: llama.cpp refuses most of them without
#: one, and the others (iq3_s, iq3_m) are built for one
IMATRIX_SCHEMES = frozenset(s for s in QUANT_SCHEMES if s.startswith(("iq3", "iq2", "iq1")))


IMATRIX_SUFFIX = "+imatrix"
NO_IMATRIX_SUFFIX = "+noimatrix"


def llama_type(scheme: str) -> str:
    """The llama.cpp type of a GGUF scheme (``q4_k_m+noimatrix``: ``q4_k_m``): one suffix at most."""
    for suffix in (IMATRIX_SUFFIX, NO_IMATRIX_SUFFIX):
        if scheme.endswith(suffix):
            return scheme.removesuffix(suffix)
    return scheme


def _bits(scheme: str) -> float:
    """Bits per weight of the tensor type most of a llama.cpp file type's weights get (q4_k_m:
    Q4_K, iq3_m: IQ3_S)."""
    name = scheme.upper()
    if name not in gguf.GGMLQuantizationType.__members__:  # Q4_K_M, IQ3_M: a mix's size suffix
        name = name.rsplit("_", 1)[0] + ("_S" if name.startswith("IQ") else "")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    return size * 8 / block


#: the types quantized with an importance matrix by default (computed on quantkit's calibration
#: text when the source is an HF checkpoint): every type whose base tensor type has fewer than 5
#: bits per weight, where weighing the rounding error pays most (q4_k_s/m, iq4_nl/xs, q3_k_*, q2_k;
#: not q4_1's 5.0); the i-quants always. Not q4_0: it is the 4-bit type of backends that run few
#: types (llama.cpp's CANN for Ascend: f16, q8_0, q4_0), and with a matrix llama.cpp writes the
#: first eighth of the layers' ffn_down as q4_1, which those backends cannot run (q4_0+imatrix asks for it)
DEFAULT_IMATRIX_SCHEMES = frozenset(
    s for s in QUANT_SCHEMES if s not in ("f32", "f16", "bf16", "q4_0") and _bits(s) < 5) | IMATRIX_SCHEMES
# llama.cpp logs "[  12/ 236]  blk.0.attn_k.weight - ..." once per tensor
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def tensor_type_id(name: str) -> int:
    """ggml's id of a tensor type named as in ``GGMLQuantizationType`` (``q4_k``, ``iq4_nl``)."""
    return int(gguf.GGMLQuantizationType[name.upper()])


def quantize_gguf(
    src: Path,
    dst: Path,
    scheme: str,
    *,
    threads: int | None = None,
    advance: Callable[[int], None] | None = None,
    imatrix: Path | None = None,
    overrides: Sequence[tuple[str, str]] = (),
    pure: bool = False,
) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp, in a child process (an abort inside
    llama.cpp becomes a NativeError), weighing errors by the GGUF ``imatrix`` file when given;
    a non-zero return is a ConversionError. ``overrides``: (regex on tensor names, tensor type)
    pairs, the first match wins (llama-quantize's ``--tensor-type``); ``pure``: no type mix,
    every other quantized tensor gets the scheme's base type (llama.cpp still falls back where a
    tensor's rows do not divide into the type's blocks)."""
    from ...isolate import run_isolated

    args = {"src": str(src), "dst": str(dst), "ftype": int(QUANT_SCHEMES[scheme]),
            "threads": threads or os.cpu_count() or 1, "imatrix": str(imatrix) if imatrix else None,
            "overrides": [[pattern, tensor_type_id(kind)] for pattern, kind in overrides], "pure": pure}
    rc = run_isolated("quantkit.formats.gguf.quantize:quantize_in_child", args,
                      what=f"llama.cpp quantizing {src.name} to {scheme}", on_progress=advance)
    if rc != 0 or not dst.is_file():
        raise ConversionError(f"llama.cpp failed to quantize {src.name} to {scheme} (code {rc}); rerun with --debug for its log")


def quantize_in_child(args: dict, reporter) -> int:
    """The child's side of :func:`quantize_gguf`: one progress line per tensor llama.cpp logs."""
    import llama_cpp

    from ...log import on_llama_log

    def on_log(text: str) -> None:
        if _TENSOR_LINE.search(text):
            reporter.progress(1)
        sys.stderr.write(text)

    on_llama_log(on_log)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = args["ftype"]
    params.nthread = args["threads"]
    params.allow_requantize = True  # a quantized GGUF source may be re-quantized
    params.pure = bool(args.get("pure"))
    keep = []  # what params points into lives until llama.cpp returns
    if args.get("overrides"):
        overrides = (llama_cpp.llama_model_tensor_override * (len(args["overrides"]) + 1))()  # null pattern: the end
        for entry, (pattern, kind) in zip(overrides, args["overrides"], strict=False):
            keep.append(pattern.encode())
            entry.pattern, entry.type = keep[-1], kind
        params.tt_overrides = overrides
        keep.append(overrides)
    if args.get("imatrix"):
        from .imatrix import ImportanceMatrix

        means = ImportanceMatrix.read(Path(args["imatrix"])).means()
        entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()  # the last one all null: the end
        for entry, (name, values) in zip(entries, means.items(), strict=False):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep += [name.encode(), data]
            entry.name, entry.size = keep[-2], data.size
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
        keep.append(entries)
    return int(llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(params)))
