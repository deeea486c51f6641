"""Float32 ONNX -> the quantized forms ONNX Runtime and NPU compilers run, with ONNX Runtime's
own quantizers:

* ``fp16``: every float tensor in float16, inputs and outputs kept float32;
* ``int8``: dynamic quantization (``quantize_dynamic``): int8 per-channel weights of the
  MatMul/Gemm nodes and the embedding table (``Gather``), activations quantized per tensor at run
  time (QOperator ``MatMulInteger``/``DynamicQuantizeLinear``; an encoder's fused Attention
  becomes ``QAttention``, its packed q/k/v weights int8); the feed-forward down projections
  stay float (see below: on Gemma 3 270M quantizing them raises the KLD from 0.060 to 0.147);
* ``int8-static``: QDQ (``QuantizeLinear``/``DequantizeLinear`` pairs) with activation ranges
  calibrated on token windows, the form NPU compilers that need static ranges accept. Weights
  int8 per channel, activations uint8 asymmetric per tensor; only MatMuls with a weight operand,
  and not the feed-forward down projections, whose inputs (after GELU/SiLU gating) carry the
  outliers a per-tensor range cannot hold (on all-MiniLM-L6-v2 quantizing them drops the mean
  embedding cosine from 0.992 to 0.918);
* ``int4``: weight-only blocks of 32 or 128 (``com.microsoft::MatMulNBits``) for the MatMuls
  and the embedding table (``com.microsoft::GatherBlockQuantized``: on Gemma 3 270M, whose
  262k-token table is most of the model, 274 MB instead of 840 MB), round to nearest by default
  or HQQ (MatMuls only: ONNX Runtime's HQQ does not quantize Gather).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["save_model", "to_fp16", "int8_dynamic", "int8_static", "int4_weight_only", "EXTERNAL_DATA_ABOVE"]

# models whose weights pass this size keep them in ``model.onnx_data`` beside ``model.onnx``
# (protobuf cannot serialize a message over 2 GB; quantizers add tensors, so leave room)
EXTERNAL_DATA_ABOVE = 1 << 30
QUANTIZED_OPS = ["MatMul", "Gemm"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the ONNX tools while they work (progress is quantkit's job): ONNX Runtime's
    quantizers log every node and advise pre-processing on the root logger, the torch exporter and
    onnxruntime-genai's builder log and print at every step."""
    names = ("", "transformers", "torch.onnx", "torch.export", "onnxscript", "onnxruntime", "onnx_ir")  # "" is the root logger
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _weight_bytes(model) -> int:
    from .graph import initializer_bytes

    return sum(initializer_bytes(model).values())


def save_model(model, path: Path) -> None:
    """Write ``model`` to ``path``; weights go to ``<name>_data`` when the model is large."""
    import onnx

    external = _weight_bytes(model) > EXTERNAL_DATA_ABOVE
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
        location=f"{path.name}_data" if external else None, size_threshold=1024,
    )


def _large(src: Path) -> bool:
    import onnx

    return _weight_bytes(onnx.load(str(src), load_external_data=False)) > EXTERNAL_DATA_ABOVE


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    save_model(model, dst)


def fuse_for_ort(src: Path, dst: Path) -> dict[str, int]:
    """ONNX Runtime's fused operators for an encoder exported by torch.onnx: onnxscript's ORT
    rewrites turn each attention subgraph into one ``com.microsoft::Attention`` (its q/k/v
    projections in one GEMM), residual adds and LayerNorms into ``SkipLayerNormalization``, bias
    and GELU into ``BiasGelu``. The dynamo graph has none of these patterns where ORT's own BERT
    optimizer looks for them (it fuses no Attention there). Returns the count of each fusion made.

    The rewrite leaves each packed q/k/v weight as a ``Concat`` of the three initializers and
    states ``qkv_hidden_sizes`` even when they are equal (the default): both are folded away here,
    so that ONNX Runtime's dynamic quantizer can turn each Attention into a ``QAttention`` (it
    skips an Attention with that attribute, and leaves the Concat's float inputs behind)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    with quiet():
        _, counts = optimize_for_ort(model)
    _fold_packed_weights(model.graph)
    ir.save(model, str(dst), external_data=f"{dst.name}.data" if _large(src) else None)
    return {name: int(n) for name, n in sorted(counts.items()) if n}


def _fold_packed_weights(graph) -> None:
    """Concats of initializers become one initializer (their inputs go when nothing else uses
    them); Attention's ``qkv_hidden_sizes`` goes where q, k and v are of one size (the
    operator's default then). On the ONNX IR: external tensors are read where they lie."""
    import numpy as np
    import onnx_ir as ir

    for node in list(graph):
        if node.op_type == "Attention" and "qkv_hidden_sizes" in node.attributes:
            if len(set(node.attributes["qkv_hidden_sizes"].as_ints())) == 1:
                node.attributes.pop("qkv_hidden_sizes")
            continue
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        inputs, [output] = list(node.inputs), node.outputs
        if output.is_graph_output() or not all(v is not None and v.is_initializer() and v.const_value is not None for v in inputs):
            continue
        axis = node.attributes["axis"].as_int()
        folded = ir.Value(name=f"{output.name}_folded", const_value=ir.tensor(
            np.concatenate([v.const_value.numpy() for v in inputs], axis=axis), name=f"{output.name}_folded"))
        graph.register_initializer(folded)
        output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        for value in inputs:
            if not value.uses() and not value.is_graph_input() and value.name in graph.initializers:
                del graph.initializers[value.name]


def int8_dynamic(src: Path, dst: Path) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _, down = static_int8_nodes(onnx.load(str(src), load_external_data=False))
    with quiet():
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
            op_types_to_quantize=[*QUANTIZED_OPS, "Attention", "Gather"], nodes_to_exclude=down,
            use_external_data_format=_large(src),
        )
    return {"float_down_projections": len(down)}


class _Feeds:
    """ONNX Runtime's CalibrationDataReader over prepared input dicts."""

    def __init__(self, feeds: Iterable[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed for MinMax; part of the reader interface
        raise NotImplementedError


# feed-forward down projections in the exporters' node names; their inputs (after GELU/SiLU
# gating) carry outliers a per-tensor activation range cannot hold (Llama/Qwen/Gemma, BERT, OPT/Phi, GPT-2, Mistral-style)
_DOWN_PROJECTIONS = ("/mlp/down_proj/", "/output/dense/", "/fc2/", "/mlp/c_proj/", "/w2/")


def _module_path(node) -> str:
    """'/model/layers/0/mlp/down_proj/': the torch module a node came from (the dynamo exporter
    records the module path among the node's name scopes), else the node's name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            import ast

            scopes = [str(s) for s in ast.literal_eval(prop.value) if s]  # ..., 'a.b.dense', 'linear_5'
            if scopes:
                return "/" + max(scopes, key=len).replace(".", "/") + "/"
    return node.name


def static_int8_nodes(model) -> tuple[list[str], list[str]]:
    """(MatMul nodes to quantize, down projections left in float) for ``int8_static``."""
    weights = {t.name for t in model.graph.initializer}
    chosen, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        path = _module_path(node)
        down = any(p in path for p in _DOWN_PROJECTIONS) and "/attention/" not in path
        (skipped if down else chosen).append(node.name)
    return chosen, skipped


def int8_static(src: Path, dst: Path, feeds: Iterable[dict]) -> dict:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    chosen, skipped = static_int8_nodes(onnx.load(str(src), load_external_data=False))
    reader = type("Reader", (_Feeds, CalibrationDataReader), {})(feeds)
    with quiet():
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=chosen,
            op_types_to_quantize=QUANTIZED_OPS, calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_large(src),
        )
    return {"quantized_matmuls": len(chosen), "float_down_projections": len(skipped)}


def int4_weight_only(src: Path, dst: Path, block_size: int, algo: str, accuracy_level: int = 4) -> None:
    """MatMulNBits, symmetric blocks; ``accuracy_level=4`` lets the CPU kernel compute in int8."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    ops = ("MatMul",) if algo == "hqq" else ("MatMul", "Gather")  # ONNX Runtime's HQQ has no Gather
    if algo == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=ops)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                              op_types_to_quantize=ops)
    with quiet():
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, algo_config=config,
            op_types_to_quantize=ops,
        )
        quantizer.process()
    save_model(quantizer.model.model, dst)
