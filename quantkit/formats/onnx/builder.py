"""Decoders with a KV cache through onnxruntime-genai's model builder: the graphs (fused
attention, ``GroupQueryAttention`` on the CPU, ``MatMulNBits`` int4/int8 weights) and the
``genai_config.json`` that ``onnxruntime_genai`` runs, so every such artifact loads there.

The builder is called through its Python API in a child process (``isolate``): it loads the
whole model, and ONNX Runtime's quantizers underneath are native code. quantkit adapts what the
builder does not read itself around it, and replaces two of its methods in that child process
only (the last two points):

* transformers 5 keeps Gemma 3's RoPE settings per layer type (``rope_parameters:
  {full_attention: ..., sliding_attention: ...}``); the builder expects the flat
  ``rope_theta`` / ``rope_local_base_freq`` of transformers 4, so they are set on the loaded config;
* no Hugging Face token lookups (``hf_token=false``) and no remote code;
* memory (``Model.to_nbits``): before writing, the builder quantizes the graph's remaining float weights (from a
  GPTQ checkpoint, the output head) with ONNX Runtime's ``MatMulNBitsQuantizer`` on a protobuf
  copy of the whole graph, whose float32 head the quantizer copies again and again (at 0.5B
  parameters the step added 1.9 GB to a 1.1 GB process; at 8B it would not fit 24 GB).
  quantkit's child replaces that one step (:func:`light_to_nbits`): each float ``MatMul`` weight
  is quantized by the same quantizer a slice of output columns at a time (its blocks run along
  the input dimension of one column, so the slices' results, joined, are the whole one's), and
  the rest of the pass sees a graph holding only the weights it may quantize; for the builds
  quantkit makes (int4 or int8 heads, tied or not, GPTQ or float input) the files are the builder's
  own, byte for byte (tested against its pass);
* reproducibility (``Model.get_genai_commit``): the builder stamps the graph with
  ``git rev-parse HEAD`` run beside its installed files, which inside a git checkout (a project's
  virtual environment) is that checkout's commit; the wheel's own commit is stamped instead.

Its input may be quantkit's own GPTQ checkpoint (``int4-gptq``): the builder turns the packed
GPTQ weights into ``MatMulNBits`` blocks as they are (its pre-quantized input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import ConversionError, UnsupportedArchitectureError

__all__ = ["build_decoder", "builder_version"]


def builder_version() -> str:
    from importlib.metadata import version

    return f"onnxruntime-genai {version('onnxruntime-genai')}"


def build_decoder(folder: Path, out: Path, precision: str, extra: dict[str, Any], cache: Path) -> dict:
    """Build ``folder`` (an HF checkpoint, float or GPTQ) into ``out`` at ``precision``
    (fp32, fp16, int8, int4) with the builder's ``extra`` options; returns what the child reports."""
    from ...isolate import run_isolated

    return run_isolated(
        "quantkit.formats.onnx.builder:build_in_child",
        {"folder": str(folder), "out": str(out), "precision": precision, "cache": str(cache),
         "extra": {k: str(v) for k, v in sorted(extra.items())}},
        what=f"onnxruntime-genai's model builder ({precision})",
    )


def adapt_config(config) -> list[str]:
    """Give the builder the config fields it reads, from either transformers layout. Returns
    what was changed (recorded in the manifest)."""
    from ...source import rope_parameters

    changed = []
    nested = getattr(config, "rope_parameters", None)
    if isinstance(nested, dict) and nested and all(isinstance(v, dict) for v in nested.values()):
        raw = config.to_dict()
        full, local = rope_parameters(raw, "full_attention"), rope_parameters(raw, "sliding_attention")
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]
        config.rope_parameters = full
        changed.append("rope_parameters per layer type -> rope_theta, rope_local_base_freq")
    return changed


COLUMN_SLICE_BYTES = 16 * 2**20  # float weight a slice of columns holds while it is quantized


def _quantize_by_columns(graph, node, bits: int, attrs: dict) -> None:
    """Replace the ``MatMul`` ``node`` of the onnx_ir ``graph`` by the ``MatMulNBits`` node that
    ONNX Runtime's default quantizer makes of it, quantizing its weight a slice of output columns
    at a time on one-node models."""
    import numpy as np
    import onnx_ir as ir
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    weight = node.inputs[1]
    table = weight.const_value.numpy()
    k, n = table.shape
    step = max(1, COLUMN_SLICE_BYTES // (k * table.itemsize))
    elem = helper.np_dtype_to_tensor_dtype(table.dtype)
    parts: dict[str, list] = {}
    template = None
    for start in range(0, n, step):
        cols = np.ascontiguousarray(table[:, start : start + step])
        one = helper.make_graph(
            [helper.make_node("MatMul", ["A", weight.name], ["Y"], name=node.name)], "slice",
            [helper.make_tensor_value_info("A", elem, ["s", k])], [helper.make_tensor_value_info("Y", elem, ["s", cols.shape[1]])],
            initializer=[numpy_helper.from_array(cols, weight.name)])
        quantizer = MatMulNBitsQuantizer(
            helper.make_model(one, opset_imports=[helper.make_opsetid("", 21)]), bits=bits,
            block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
            accuracy_level=attrs["accuracy_level"], quant_format=QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",), algo_config=None)
        quantizer.process()
        out = quantizer.model.model.graph
        [template] = out.node
        if template.op_type != "MatMulNBits":
            raise ConversionError(f"{node.name}: ONNX Runtime's quantizer left it a {template.op_type}")
        for tensor in out.initializer:
            parts.setdefault(tensor.name, []).append(numpy_helper.to_array(tensor))
        del one, quantizer, out, cols
    del table  # the float32 table the builder materialized for this
    values = []
    for name in template.input[1:]:  # the quantized weight, scales and zero points, all column-major
        tensor = ir.tensor(np.concatenate(parts.pop(name), axis=0), name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        values.append(value)
    attributes = [ir.AttrInt64(a.name, n if a.name == "N" else a.i) for a in template.attribute]
    new = ir.Node("com.microsoft", "MatMulNBits", [node.inputs[0], *values], attributes=attributes,
                  name=template.name, num_outputs=1)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
    if not weight.uses():
        del graph.initializers[weight.name]


def light_to_nbits(model_cls) -> None:
    """Replace the builder's ``Model.to_nbits`` (``model_cls``, in this child process only): float
    ``MatMul`` weights are quantized a slice of columns at a time (:func:`_quantize_by_columns`),
    then the builder's own pass runs on a graph holding only the initializers it may still
    quantize and the others are re-attached: the same nodes and tensors, without the whole-graph
    protobuf copy. Non-CPU builds, exact per-node overrides and the neural-compressor algorithms
    (``algo_config``) keep the builder's own pass."""
    import functools

    import onnx_ir as ir

    original = model_cls.to_nbits
    if getattr(original, "quantkit_light", False):
        return

    @functools.wraps(original)
    def to_nbits(self):
        # the CPU builds quantkit makes; exact overrides, the neural-compressor algorithms and the
        # CUDA weight prepacking (which rewrites every MatMulNBits weight) keep the builder's pass
        if (getattr(self, "exact_quant_overrides", None) or getattr(self, "quantization_algo", "default") != "default"
                or getattr(self, "ep", "cpu") != "cpu"):
            return original(self)
        graph, attrs = self.model.graph, self.quant_attrs
        custom = getattr(self, "int4_customized_weight_config", None) or {}
        excluded = set(attrs["nodes_to_exclude"])
        if not attrs["use_qdq"] and "MatMul" in attrs["op_types_to_quantize"]:
            for node in list(graph):
                weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
                if (weight is None or weight.const_value is None or len(weight.const_value.shape) != 2
                        or node.name in excluded or len(weight.uses()) > 1
                        or weight.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16)):
                    continue
                _quantize_by_columns(graph, node, int(custom.get(node.name, {}).get("bits", attrs["bits"])), attrs)
        # what the builder's pass may still quantize: its op types, and the nodes its per-node bits
        # name (ONNX Runtime includes those whatever their type); not the excluded ones
        kinds = set(attrs["op_types_to_quantize"])
        wanted = {node.inputs[0 if node.op_type == "Gather" else 1].name for node in graph
                  if (node.op_type in kinds or node.name in custom) and node.name not in excluded and len(node.inputs) > 1}
        order = list(graph.initializers)
        kept = {name: graph.initializers[name] for name in order if name not in wanted}
        for name in kept:
            del graph.initializers[name]
        try:
            quantized = original(self)
        finally:
            for value in kept.values():
                graph.initializers.add(value)
        # the names the quantized graph reads; an initializer it no longer reads was replaced
        values = {v.name: v for node in quantized.graph.all_nodes() for v in node.inputs if v is not None}
        new = dict(quantized.graph.initializers)
        quantized.graph.initializers.clear()
        for name in order:  # the builder's order: the survivors where they were, then the new ones
            if name in kept and name in values:
                value, tensor = values[name], kept[name].const_value
                # typed as a deserialized initializer is (ir.from_proto), so it is written alike
                value.type = kept[name].type or ir.TensorType(tensor.dtype)
                value.shape = kept[name].shape or tensor.shape
                value.const_value = tensor
                quantized.graph.initializers.add(value)
            elif name in new:
                quantized.graph.initializers.add(new.pop(name))
        for value in new.values():
            quantized.graph.initializers.add(value)
        return quantized

    to_nbits.quantkit_light = True
    model_cls.to_nbits = to_nbits


def _wheel_commit(cls) -> str | None:
    import onnxruntime_genai

    return getattr(onnxruntime_genai, "__commit__", None) or None


def build_in_child(args: dict, reporter) -> dict:
    """The child's side of :func:`build_decoder`."""
    import sys

    from .export import first_line
    from .quantize import quiet

    try:
        from onnxruntime_genai.models import builder
    except ImportError as exc:
        raise ConversionError(f"ONNX decoders need onnxruntime-genai's model builder ({exc})") from exc
    # the builder imports its modules as top-level ``builders``
    base = sys.modules.get("builders.base")
    if base is None or not hasattr(base, "Model"):
        raise ConversionError(f"onnxruntime-genai's builder ({builder_version()}) is laid out differently from the "
                              "version quantkit supports (no builders.base.Model)")
    model_cls = base.Model
    light_to_nbits(model_cls)
    # the builder stamps the graph with `git rev-parse HEAD` run beside its own files, which, with
    # a virtual environment inside a git checkout, is that checkout's commit: the bytes would
    # change with every commit of the project around it; the wheel's own commit instead
    model_cls.get_genai_commit = classmethod(_wheel_commit)
    folder, out, precision, cache = args["folder"], args["out"], args["precision"], args["cache"]
    options = [f"{k}={v}" for k, v in args["extra"].items()] + ["hf_token=false"]
    with quiet():
        try:
            prepared = builder.parse_extra_options(None, folder, out, precision, "cpu", cache, options)
        except (KeyError, ValueError, OSError) as exc:
            raise UnsupportedArchitectureError(f"{folder}: the model builder cannot read it ({first_line(exc)})") from exc
        config = prepared["hf_details"]["hf_config"]
        changed = adapt_config(config)
        try:
            builder.create_model(None, folder, out, precision, "cpu", cache, **prepared)
        except NotImplementedError as exc:
            raise UnsupportedArchitectureError(
                f"{folder}: onnxruntime-genai's builder does not support it ({first_line(exc)})") from exc
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            raise ConversionError(f"{folder}: onnxruntime-genai's builder failed ({first_line(exc)})") from exc
    if not (Path(out) / "genai_config.json").is_file():
        raise ConversionError(f"{folder}: the model builder wrote no genai_config.json")
    return {"config_adapted": changed, "architecture": (getattr(config, "architectures", None) or ["?"])[0]}
