"""What an ONNX model is made of, read without loading its weights: opset, operators, input
shapes (which dimensions are symbolic), and the bytes of its initializers.

The manifest records this summary, so a compatibility check (an NPU compiler's operator list,
static shapes, maximum opset) can read it without opening the model again.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["summarize_model", "initializer_bytes", "STANDARD_DOMAINS"]

# the domains of standard ONNX operators; anything else (com.microsoft, ...) is a runtime extension
STANDARD_DOMAINS = ("", "ai.onnx")

# bits per element of each ONNX TensorProto data type that weights use
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
         21: 4, 22: 4}


def _load(path: Path):
    import onnx

    from ...errors import InputError

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from exc



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
    }
