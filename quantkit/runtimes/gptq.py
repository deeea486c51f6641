"""GPTQ artifacts on the CPU: the packed checkpoint in a transformers model, dequantized per Linear.

GPTQ's own kernels (exllama, marlin, triton) need a GPU, and transformers only loads GPTQ
checkpoints through optimum + gptqmodel; this runtime keeps every quantized Linear packed as
stored (``PackedLinear``) and dequantizes its weight to float32 inside each forward call, one
Linear at a time, so the model holds the checkpoint's packed bytes, not a float32 copy. The
logits are those of the quantized model exactly; the speed is that of a float32 model plus the
unpacking, not of a GPTQ kernel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..source import DTYPE_BYTES
from . import register_runtime
from .hf import TransformersRuntime, read_config
from .stream import LAYOUTS, Layout

__all__ = ["GPTQRuntime", "load_packed_model"]

_INDEX = "model.safetensors.index.json"
_PACKED = ("qweight", "qzeros", "scales", "g_idx")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise InputError(f"{folder}: no model.safetensors or {_INDEX}; not a GPTQ checkpoint folder")
    return [single]


def _bits(config: dict[str, Any], folder: Path) -> int:
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "gptq" or qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise InputError(f"{folder}: config.json has no GPTQ v1 quantization_config")
    return int(qconfig["bits"])


def _packed_linear_class():
    import torch

    from ..formats.gptq.packing import dequantize_linear

    class PackedLinear(torch.nn.Module):
        """A Linear kept in the v1 packed layout; its float32 weight exists only during forward."""

        def __init__(self, qweight, qzeros, scales, g_idx, bias, bits: int):
            super().__init__()
            self.bits = bits
            for name, tensor in zip(_PACKED, (qweight, qzeros, scales, g_idx), strict=True):
                self.register_buffer(name, tensor)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.in_features, self.out_features = int(g_idx.shape[0]), int(qweight.shape[1])

        def weight_t(self):
            """The float32 weight, transposed: [in, out]."""
            return dequantize_linear(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, transposed=True)

        def forward(self, x):
            out = x @ self.weight_t()
            return out if self.bias is None else out + self.bias

    return PackedLinear


def _packed_experts_class():
    import torch

    class PackedExperts(torch.nn.Module):
        """A mixture of experts' routed experts kept packed, one ``PackedLinear`` per expert and
        part (gate, up, down), called as transformers' stacked experts module is: each expert
        runs on the tokens routed to it, its weights dequantized for that call only."""

        def __init__(self, experts: list[tuple[Any, Any, Any]], act_fn):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.ModuleList(parts) for parts in experts)
            self.act_fn = act_fn

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in torch.unique(top_k_index).tolist():
                if not 0 <= e < len(self.experts):
                    continue
                token, slot = torch.where(top_k_index == e)
                gate, up, down = self.experts[e]
                x = hidden_states[token]
                y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
            return out

    return PackedExperts


def _half_table_modules():
    import torch

    from .stream import embed_compact, head_logits

    class ChunkedHead(torch.nn.Module):
        """An output head kept as stored (float16), multiplied in float32 row chunks."""

        def __init__(self, table):
            super().__init__()
            self.register_buffer("table", table)

        def forward(self, x):
            rows, width = self.table.shape
            return head_logits(x, rows, width, lambda start, stop: self.table[start:stop].to(torch.float32))

    def embed_rows_in_float32(module, args):
        """Forward pre-hook of the embedding: it runs on the float32 rows of the ids in this
        call (``embed_compact``), the float16 table staying as stored."""
        return (embed_compact(module, args[0], lambda used: module.table16[used].to(torch.float32)), *args[1:])

    return ChunkedHead, embed_rows_in_float32


def load_packed_model(folder: Path):
    """The checkpoint as a transformers model: quantized Linears packed, the embedding table and
    output head as stored (float16; looked up and multiplied in float32), the rest float32."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .stream import LAYOUTS, Layout, parameters_on_meta

    folder = Path(folder)
    bits = _bits(read_config(folder), folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    # transformers would route a quantization_config to optimum/gptqmodel: this runtime unpacks itself
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights(), parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    packed_cls = _packed_linear_class()
    raw: dict[str, Any] = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                raw[name] = fh.get_tensor(name)
    layout = LAYOUTS.get(config.model_type, Layout())
    # every parameter and stored buffer (DeepSeek V3's router bias), under its module name or the
    # checkpoint's (Mixtral's block_sparse_moe); stacked experts come as packed Linears below
    expected: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        parts = layout.checkpoint_parts(name, tuple(tensor.shape))
        if len(parts) == 1:
            expected.update({name: name, parts[0][0]: name})
    experts: dict[str, dict[int, dict[str, Any]]] = {}
    embed_name, head_name = layout.embed + ".weight", layout.head + ".weight"
    tables = {name: raw.pop(name) for name in (embed_name, head_name) if name in raw}
    if embed_name not in tables:
        raise InputError(f"{folder}: the checkpoint does not match its config.json (missing {embed_name})")
    packed = {name.rpartition(".")[0] for name in raw if name.endswith(".qweight")}
    for name in sorted(raw):
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            bias = raw.get(f"{prefix}.bias")
            linear = packed_cls(*(raw[f"{prefix}.{p}"] for p in _PACKED), None if bias is None else bias.to(torch.float32), bits)
            if expert := layout.parse_expert(prefix):  # one routed expert's part: gathered per block below
                block, e, part = expert
                experts.setdefault(block, {}).setdefault(e, {})[part] = linear
                continue
            owner, _, attr = prefix.rpartition(".")
            try:
                parent = model.get_submodule(owner)
                getattr(parent, attr)
            except AttributeError:
                raise InputError(f"{folder}: the checkpoint does not match its config.json (unexpected {prefix})") from None
            setattr(parent, attr, linear)
        elif prefix not in packed:  # a packed Linear's other tensors (bias included) went in with its qweight
            if name not in expected:
                raise InputError(f"{folder}: the checkpoint does not match its config.json (unexpected {name})")
            tensor = raw[name]
            owner, _, leaf = expected[name].rpartition(".")
            module = model.get_submodule(owner)
            if leaf in module._buffers:  # a stored buffer (DeepSeek V3's router bias)
                module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype)
            else:
                module._parameters[leaf] = torch.nn.Parameter(tensor.to(torch.float32) if tensor.is_floating_point() else tensor, requires_grad=False)
    raw.clear()
    experts_cls = _packed_experts_class()
    for owner, by_expert in experts.items():
        try:
            mlp = model.get_submodule(f"{owner}.mlp")
            count = mlp.experts.gate_up_proj.shape[0]
        except AttributeError:
            raise InputError(f"{folder}: the checkpoint does not match its config.json (unexpected experts in {owner})") from None
        if sorted(by_expert) != list(range(count)) or any(len(parts) != 3 for parts in by_expert.values()):
            raise InputError(f"{folder}: {owner} has packed experts {sorted(by_expert)[:8]}; config.json says {count}, each with 3 parts")
        mlp.experts = experts_cls([tuple(by_expert[e][part] for part in ("gate", "up", "down")) for e in range(count)],
                                  mlp.experts.act_fn)
    head_cls, embed_hook = _half_table_modules()
    embed = model.get_submodule(layout.embed)
    embed.register_buffer("table16", tables[embed_name], persistent=False)
    embed.register_forward_pre_hook(embed_hook)
    owner, _, attr = layout.head.rpartition(".")
    # a tied head (no tensor of its own in the checkpoint) multiplies by the embedding table
    setattr(model.get_submodule(owner) if owner else model, attr, head_cls(tables.get(head_name, tables[embed_name])))
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and n != embed_name]
    if missing:
        raise InputError(f"{folder}: the checkpoint does not match its config.json (missing {missing[:3]})")
    return model.eval()


@register_runtime("gptq")
class GPTQRuntime(TransformersRuntime):
    name = "transformers (packed GPTQ, dequantized per Linear)"

    def load_model(self, path: Path):
        return load_packed_model(Path(path).parent)

    @classmethod
    def describe_weights(cls, path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        folder = Path(path).parent
        config = read_config(folder)
        shapes: dict[str, tuple[list[int], str]] = {}
        files = _weight_files(folder)
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                shapes.update({name: (fh.get_slice(name).get_shape(), fh.get_slice(name).get_dtype()) for name in fh.keys()})
        packed_names = {f"{n.rpartition('.')[0]}.{p}" for n in shapes if n.endswith(".qweight") for p in _PACKED}
        total, embedding, stored_float, widest = 0, 0, 0, 0
        layout = LAYOUTS.get(config.get("model_type"), Layout())
        for name, (shape, dtype) in shapes.items():
            n = math.prod(shape)
            if name in (layout.embed + ".weight", layout.head + ".weight"):  # kept as stored
                total += n * DTYPE_BYTES[dtype]
                if name.startswith(layout.embed):
                    embedding = n * DTYPE_BYTES[dtype]
                continue
            if name in packed_names:  # kept as stored
                total += n * DTYPE_BYTES[dtype]
                if name.endswith(".qweight"):  # unpacked per forward: int32 codes and their float32 values
                    widest = max(widest, 8 * shape[1] * shapes[name.replace(".qweight", ".g_idx")][0][0])
                continue
            total += 4 * n  # float32 in memory
            stored_float += n * DTYPE_BYTES[dtype]
        packed = sum(f.stat().st_size for f in files)
        return {
            "config": config,
            "tensor_bytes": total,
            "embedding_bytes": embedding,
            # loading holds the stored float16 tensors while their float32 copies are made; the
            # widest Linear's unpacked codes and weight exist during each forward call
            "load_transient_bytes": stored_float + widest,
            "deployed_weight_bytes": packed,
            "deployed_bytes_read_per_token": packed - (0 if config.get("tie_word_embeddings", True) else embedding),
        }
