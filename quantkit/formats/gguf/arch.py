"""Architecture table for the HF -> GGUF writer: one row per HF architecture, one loop uses it.

Each row says which llama.cpp architecture the model maps to and which of a few known tensor
layout differences apply. Hyperparameters are read the same way for every row; the few
architecture-specific limits of llama.cpp are checked here so an unsupported variant fails
before anything is written instead of producing a file that loads but computes wrong logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from ...errors import UnsupportedArchitectureError
from ...source import rope_parameters

__all__ = ["ArchSpec", "ARCHITECTURES", "arch_for_config", "HParams"]


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: gguf.MODEL_ARCH
    # HF stores q/k projections for rotate-half RoPE; llama.cpp's LLAMA arch expects the
    # interleaved (original Meta) layout, so rows are permuted (see convert_hf_to_gguf's permute).
    permute_qk: bool = False
    # Gemma's RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored weight directly.
    norm_shift: float = 0.0
    always_head_dim: bool = False
    sliding_window: bool = False
    check: Callable[[dict[str, Any]], None] | None = None

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def _check_gemma3(config: dict[str, Any]) -> None:
    # llama.cpp hard-codes Gemma 3's local RoPE base and its 5-local/1-global layer pattern.
    if rope_parameters(config, "sliding_attention")["rope_theta"] != 10000.0:
        raise UnsupportedArchitectureError("gemma3 with rope_local_base_freq != 10000 is not supported by llama.cpp")
    layer_types = config.get("layer_types")
    if layer_types:
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(layer_types))]
        if list(layer_types) != expected:
            raise UnsupportedArchitectureError("gemma3 with a layer pattern other than 5 sliding : 1 global is not supported by llama.cpp")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise UnsupportedArchitectureError(f"gemma3 with {key} set is not supported by llama.cpp")


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, always_head_dim=True),
    "Gemma3ForCausalLM": ArchSpec(
        gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, always_head_dim=True, sliding_window=True, check=_check_gemma3
    ),
}


def arch_for_config(config: dict[str, Any]) -> ArchSpec:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            spec = ARCHITECTURES[name]
            if spec.check:
                spec.check(config)
            return spec
    known = ", ".join(sorted(ARCHITECTURES))
    shown = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise UnsupportedArchitectureError(f"architecture {shown} is not supported for GGUF; supported: {known}")


@dataclass(frozen=True)
class HParams:
    """The hyperparameters every row needs, read once from config.json."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HParams:
        try:
            hidden, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                n_layers=int(config["num_hidden_layers"]),
                hidden=hidden,
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                head_dim=int(config.get("head_dim") or hidden // n_heads),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedArchitectureError(f"config.json lacks a usable {exc} hyperparameter") from exc


def write_hparams(writer: gguf.GGUFWriter, spec: ArchSpec, config: dict[str, Any]) -> None:
    hp = HParams.from_config(config)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if spec.always_head_dim or hp.head_dim != hp.hidden // hp.n_heads:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if not spec.sliding_window:
        writer.add_rope_dimension_count(hp.head_dim)
    if spec.sliding_window and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    _write_rope_scaling(writer, config)


def _write_rope_scaling(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    scaling = rope_parameters(config)
    kind = scaling["rope_type"]
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind != "llama3":  # llama3 is expressed as the rope_freqs tensor, see extra_tensors
        raise UnsupportedArchitectureError(f"rope_scaling type {kind!r} is not supported for GGUF")


def extra_tensors(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that HF computes at run time (Llama 3.1's RoPE frequency factors)."""
    scaling = rope_parameters(config)
    if scaling["rope_type"] != "llama3":
        return {}
    hp = HParams.from_config(config)
    base = scaling["rope_theta"]
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, hp.head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / hp.head_dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:  # smooth interpolation between the two bands (Llama 3.1 reference implementation)
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": np.asarray(factors, dtype=np.float32)}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform_tensor(spec: ArchSpec, hf_name: str, data: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Apply the row's layout differences to one float32 tensor."""
    if spec.permute_qk:
        hp = HParams.from_config(config)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, hp.n_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, hp.n_kv_heads)
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        data = data + np.float32(spec.norm_shift)
    return data
