"""GPTQ artifacts on the CPU: the checkpoint dequantized into a float32 transformers model.

GPTQ's own kernels (exllama, marlin, triton) need a GPU, and transformers only loads GPTQ
checkpoints through optimum + gptqmodel; this runtime instead unpacks every quantized Linear
(``quantkit.formats.gptq.packing``) into an ordinary float32 weight. The logits are those of the
quantized model exactly, the speed and memory those of a float32 model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import register_runtime
from .hf import TransformersRuntime, read_config

__all__ = ["GPTQRuntime", "load_dequantized_state_dict"]

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


def load_dequantized_state_dict(folder: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint in float32, each quantized Linear as a plain ``.weight``."""
    import torch
    from safetensors import safe_open

    from ..formats.gptq.packing import dequantize_linear

    folder = Path(folder)
    bits = _bits(read_config(folder), folder)
    raw: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                raw[name] = fh.get_tensor(name)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(raw):
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            parts = [raw[f"{prefix}.{p}"] for p in _PACKED]
            state[f"{prefix}.weight"] = dequantize_linear(*parts, bits)
        elif leaf not in _PACKED[1:]:
            tensor = raw[name]
            state[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    return state


@register_runtime("gptq")
class GPTQRuntime(TransformersRuntime):
    name = "transformers (dequantized GPTQ)"

    def load_model(self, path: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        folder = Path(path).parent
        state = load_dequantized_state_dict(folder)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        # transformers would route a quantization_config to optimum/gptqmodel: the weights are
        # already plain float32 here
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = set(getattr(model, "_tied_weights_keys", None) or []) if getattr(config, "tie_word_embeddings", False) else set()
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise InputError(f"{folder}: the checkpoint does not match its config.json ({what})")
        model.tie_weights()
        return model

    @classmethod
    def describe_weights(cls, path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        folder = Path(path).parent
        config = read_config(folder)
        shapes: dict[str, list[int]] = {}
        files = _weight_files(folder)
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                shapes.update({name: fh.get_slice(name).get_shape() for name in fh.keys()})
        total, embedding = 0, 0
        for name, shape in shapes.items():
            prefix, _, leaf = name.rpartition(".")
            if leaf == "qweight":  # dequantized to float32 [out, in]
                n = shape[1] * shapes[f"{prefix}.g_idx"][0]
            elif leaf in _PACKED[1:]:
                continue
            else:
                n = 1
                for d in shape:
                    n *= d
            total += 4 * n
            if name.endswith("embed_tokens.weight"):
                embedding = 4 * n
        packed = sum(f.stat().st_size for f in files)
        return {
            "config": config,
            "tensor_bytes": total,
            "embedding_bytes": embedding,
            # loading reads every packed file once while the float32 weights are built
            "load_transient_bytes": packed,
            "deployed_weight_bytes": packed,
            "deployed_bytes_read_per_token": packed - (0 if config.get("tie_word_embeddings", True) else embedding // 2),
        }
