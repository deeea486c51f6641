"""What an ONNX model is made of, read without loading its weights: opset, operators, input
shapes (which dimensions are symbolic), and the bytes of its initializers; and the feeds a window
of tokens needs (``OnnxSessionInputs``: the runtime and the static-quantization calibration share it).

The manifest records this summary, so a compatibility check (an NPU compiler's operator list,
static shapes, maximum opset) can read it without opening the model again.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError

__all__ = ["summarize_model", "initializer_bytes", "element_bytes", "OnnxSessionInputs", "STANDARD_DOMAINS"]

# the domains of standard ONNX operators; anything else (com.microsoft, ...) is a runtime extension
STANDARD_DOMAINS = ("", "ai.onnx")

# bits per element of each ONNX TensorProto data type that weights use
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
         21: 4, 22: 4}


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from exc


def element_bytes(elem_type: int) -> float:
    """Bytes per element of an ONNX TensorProto data type (1 float32 -> 4, 10 float16 -> 2, int4 -> 0.5)."""
    return _BITS.get(elem_type, 32) / 8


def initializer_bytes(model) -> dict[str, int]:
    """Bytes of every initializer (external data included: computed from shape and type)."""
    return {t.name: (math.prod(t.dims) * _BITS.get(t.data_type, 32) + 7) // 8 for t in model.graph.initializer}


def _shape(value_info) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def summarize_model(path: Path) -> dict[str, Any]:
    """opset, operators (``domain::op`` with counts), inputs and outputs with their shapes, the
    symbolic input dimensions, and weight bytes (the embedding tables read by ``Gather`` apart)."""
    model = _load(Path(path))
    graph = model.graph
    opset = {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import}
    ops = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in graph.node)
    sizes = initializer_bytes(model)
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input and n.input[0] in sizes}
    inputs = {i.name: _shape(i) for i in graph.input if i.name not in sizes}
    # float32 weight operands of MatMul/Gemm: ONNX Runtime's CPU kernels copy them into a packed
    # layout at load (measured on Gemma 3 270M fp32 with mapped weights: +1 GB); MatMulNBits ones
    # are packed in place or nearly
    floats = {t.name for t in graph.initializer if t.data_type == 1}
    packed = {n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in floats}
    return {
        "opset": opset.get("ai.onnx", 0),
        "opset_imports": dict(sorted(opset.items())),
        "operators": dict(sorted(ops.items())),
        "inputs": inputs,
        # element type of each input (1 float32, 10 float16, 7 int64: ONNX TensorProto codes)
        "input_types": {i.name: int(i.type.tensor_type.elem_type) for i in graph.input if i.name not in sizes},
        "outputs": {o.name: _shape(o) for o in graph.output},
        "dynamic_inputs": sorted(name for name, shape in inputs.items() if any(isinstance(d, str) for d in shape)),
        "weight_bytes": sum(sizes.values()),
        "embedding_bytes": sum(sizes[name] for name in gathered),
        "packed_weight_bytes": sum(sizes[name] for name in packed),
        # weights in a separate data file, which ONNX Runtime maps into memory instead of parsing
        "external_data": any(t.data_location == 1 for t in graph.initializer),
    }


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
_ONNX_ELEM = {1: "tensor(float)", 10: "tensor(float16)", 7: "tensor(int64)", 6: "tensor(int32)"}


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple  # ints, or str for symbolic dimensions
    type: str


@dataclass(frozen=True)
class OnnxSessionInputs:
    """The model's inputs, and the feeds for one window of tokens."""

    inputs: tuple[_Input, ...]
    kv_dim: int | None = None  # the KV cache's head size where the graph leaves it symbolic
    # onnxruntime-genai's sliding-window attention shares one preallocated past/present buffer
    # and wants it at least a window long, even when empty (the mask says how much is used)
    kv_window: int = 0

    @classmethod
    def from_summary(cls, summary: dict[str, Any], kv_dim: int | None = None, kv_window: int = 0) -> OnnxSessionInputs:
        """From :func:`summarize_model`'s ``inputs`` and ``input_types``."""
        types = summary["input_types"]
        return cls(tuple(_Input(name, tuple(shape), _ONNX_ELEM.get(types[name], "tensor(float)"))
                         for name, shape in summary["inputs"].items()), kv_dim, kv_window)

    @classmethod
    def from_model_file(cls, path: Path) -> OnnxSessionInputs:
        return cls.from_summary(summarize_model(path))

    @property
    def names(self) -> set[str]:
        return {i.name for i in self.inputs}

    @property
    def past(self) -> list[_Input]:
        return [i for i in self.inputs if i.name.startswith("past_key_values.")]

    @property
    def fixed_length(self) -> int | None:
        """The sequence length of a static-shape model, else None."""
        for i in self.inputs:
            if i.name == "input_ids" and len(i.shape) == 2 and isinstance(i.shape[1], int) and i.shape[1] > 0:
                return i.shape[1]
        return None

    def feeds(self, tokens: list[int], pad_id: int = 0) -> dict[str, np.ndarray]:
        """Inputs for one window (empty KV cache); a static model gets the window right-padded."""
        n = len(tokens)
        length = self.fixed_length or n
        if n > length:
            raise InputError(f"a window of {n} tokens does not fit this static-shape model ({length} tokens)")
        ids = np.full((1, length), pad_id, dtype=np.int64)
        ids[0, :n] = tokens
        mask = np.zeros((1, length), dtype=np.int64)
        mask[0, :n] = 1
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.names:
            feeds["position_ids"] = np.arange(length, dtype=np.int64)[None]
        if "token_type_ids" in self.names:
            feeds["token_type_ids"] = np.zeros((1, length), dtype=np.int64)
        for p in self.past:
            head = p.shape[3] if isinstance(p.shape[3], int) else self.kv_dim
            if not isinstance(p.shape[1], int) or not isinstance(head, int):
                raise InputError(f"{p.name}: the KV cache's shape {list(p.shape)} leaves heads or head size open")
            shape = [1, p.shape[1], max(self.kv_window, n) if self.kv_window else 0, head]
            feeds[p.name] = np.zeros(shape, dtype=_NP_TYPES.get(p.type, np.float32))
        return {k: v for k, v in feeds.items() if k in self.names}
