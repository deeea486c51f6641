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
from ...source import Experts, experts_of, rope_parameters

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
    # mixture of experts: llama.cpp hard-codes softmax routing for some architectures, with or
    # without renormalising the chosen experts' weights (None: both come from the GGUF's keys)
    fixed_normalize: bool | None = None
    output_required: bool = False  # no tied-head fallback in llama.cpp: the embedding is written twice
    mla: bool = False  # DeepSeek's multi-head latent attention (its own attention keys and tensors)
    rotary_fraction: float = 1.0  # of the head dimension, when config.json has no partial_rotary_factor

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


def _check_square_heads(config: dict[str, Any]) -> None:
    # llama.cpp's qwen2moe, olmoe and phi3 size the query and output projections hidden x hidden
    hp = HParams.from_config(config)
    if hp.n_heads * hp.head_dim != hp.hidden:
        raise UnsupportedArchitectureError(f"{config.get('model_type')} with heads x head_dim ({hp.n_heads} x {hp.head_dim}) "
                                           f"!= hidden_size ({hp.hidden}) is not supported by llama.cpp")


def _check_olmoe(config: dict[str, Any]) -> None:
    _check_square_heads(config)
    hp = HParams.from_config(config)
    if hp.n_kv_heads != hp.n_heads:  # llama.cpp's key norm spans the hidden width
        raise UnsupportedArchitectureError("olmoe with grouped-query attention is not supported by llama.cpp")
    if config.get("clip_qkv") is not None:
        raise UnsupportedArchitectureError("olmoe with clip_qkv set is not supported by llama.cpp")


def _check_phi3(config: dict[str, Any]) -> None:
    _check_square_heads(config)
    kind = rope_parameters(config)["rope_type"]
    if kind != "default":
        raise UnsupportedArchitectureError(f"phi3 with rope_scaling type {kind!r} is not supported for GGUF")


def _check_deepseek(config: dict[str, Any]) -> None:
    if config.get("model_type") == "deepseek_v3" and config.get("rope_interleave") is False:
        raise UnsupportedArchitectureError("deepseek_v3 with rope_interleave false is not supported by llama.cpp (interleaved RoPE only)")
    experts = experts_of(config)
    if (experts and config.get("topk_method") == "group_limited_greedy" and 1 < experts.groups_used < experts.groups):
        raise UnsupportedArchitectureError("deepseek_v2 group-limited routing is not supported: llama.cpp scores a group by the sum "
                                           "of its two best experts, DeepSeek-V2 by its best")


def _check_routing(spec: ArchSpec, experts: Experts) -> None:
    """llama.cpp must route tokens as the checkpoint's reference code does, or the file loads and
    computes other logits: refuse what an architecture's llama.cpp graph cannot express."""
    name = spec.arch_name
    if spec.fixed_normalize is not None:
        if experts.gating != "softmax" or experts.scale != 1.0 or experts.groups > 1:
            raise UnsupportedArchitectureError(f"{name} routing in llama.cpp is a plain softmax: sigmoid gating, a routed scale "
                                               "or expert groups are not supported")
        if experts.normalize != spec.fixed_normalize:
            raise UnsupportedArchitectureError(f"{name} with norm_topk_prob={experts.normalize} is not supported: llama.cpp "
                                               f"{'always' if spec.fixed_normalize else 'never'} renormalises the top-k weights")
    elif experts.groups > 1 and experts.groups_used < experts.groups:
        if experts.count % experts.groups or experts.count // experts.groups < 2 or experts.groups_used < 1:
            raise UnsupportedArchitectureError(f"{experts.count} experts in {experts.groups} groups of which {experts.groups_used} "
                                               "are used: not a grouping llama.cpp accepts")


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MixtralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True, fixed_normalize=True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, always_head_dim=True),
    "Qwen2MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2MOE, fixed_normalize=False, output_required=True, check=_check_square_heads),
    "Qwen3MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3MOE, always_head_dim=True, fixed_normalize=True),
    "OlmoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.OLMOE, fixed_normalize=False, output_required=True, check=_check_olmoe),
    "DeepseekV2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.DEEPSEEK2, mla=True, check=_check_deepseek),
    "DeepseekV3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.DEEPSEEK2, mla=True, check=_check_deepseek),
    "Glm4MoeForCausalLM": ArchSpec(gguf.MODEL_ARCH.GLM4_MOE, always_head_dim=True, rotary_fraction=0.5),
    "Glm4ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GLM4, always_head_dim=True, rotary_fraction=0.5),
    "Phi3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.PHI3, check=_check_phi3),
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
            experts = experts_of(config)
            if experts:
                _check_routing(spec, experts)
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
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if spec.mla:
        _write_mla(writer, config)
    else:
        writer.add_head_count_kv(hp.n_kv_heads)
        if spec.always_head_dim or hp.head_dim != hp.hidden // hp.n_heads:
            writer.add_key_length(hp.head_dim)
            writer.add_value_length(hp.head_dim)
        if not spec.sliding_window:
            # transformers 5 keeps partial_rotary_factor among the RoPE parameters, 4 at the top level
            fraction = float(rope_parameters(config).get("partial_rotary_factor") or config.get("partial_rotary_factor")
                             or spec.rotary_fraction)
            writer.add_rope_dimension_count(int(hp.head_dim * fraction))
    if spec.sliding_window and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    experts = experts_of(config)
    if experts:
        _write_experts(writer, experts)
    _write_rope_scaling(writer, config)


def _write_experts(writer: gguf.GGUFWriter, experts: Experts) -> None:
    # every architecture reads the keys it needs and ignores the rest; routing an architecture
    # hard-codes was checked against the config in arch_for_config
    writer.add_expert_count(experts.count)
    writer.add_expert_used_count(experts.used)
    writer.add_expert_feed_forward_length(experts.ff)
    if experts.shared_ff:
        writer.add_expert_shared_feed_forward_length(experts.shared_ff)
        writer.add_expert_shared_count(experts.shared_ff // experts.ff)
    else:
        writer.add_expert_shared_count(0)
    writer.add_leading_dense_block_count(experts.dense_blocks)
    writer.add_expert_weights_scale(experts.scale)
    writer.add_expert_weights_norm(experts.normalize)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType[experts.gating.upper()])
    if experts.groups > 1 and experts.groups_used < experts.groups:  # all groups used: no grouping
        writer.add_expert_group_count(experts.groups)
        writer.add_expert_group_used_count(experts.groups_used)


def mla_dims(config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """DeepSeek's attention widths: q LoRA rank (0: a full q projection), kv LoRA rank, and the
    per-head no-RoPE, RoPE and value dimensions."""
    try:
        return (int(config.get("q_lora_rank") or 0), int(config["kv_lora_rank"]), int(config["qk_nope_head_dim"]),
                int(config["qk_rope_head_dim"]), int(config["v_head_dim"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedArchitectureError(f"config.json lacks a usable {exc} attention setting") from exc


def _write_mla(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    # llama.cpp runs MLA as one shared latent "head": the cache holds kv_lora + rope values a
    # token, keys of that width and values of kv_lora; the per-head sizes go in the _mla keys
    q_lora, kv_lora, nope, rope, v = mla_dims(config)
    writer.add_head_count_kv(1)
    writer.add_q_lora_rank(q_lora)  # 0 written too: llama.cpp needs the key unless the model is V2-Lite-sized
    writer.add_kv_lora_rank(kv_lora)
    writer.add_key_length(kv_lora + rope)
    writer.add_value_length(kv_lora)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(v)
    writer.add_rope_dimension_count(rope)
    scaling = rope_parameters(config)
    if scaling["rope_type"] == "yarn" and scaling.get("mscale_all_dim"):
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(scaling["mscale_all_dim"]))


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


def split_kv_b(data: np.ndarray, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's ``kv_b_proj`` [heads x (nope + v), kv_lora] as llama.cpp's two per-head
    matrices: ``attn_k_b`` [heads, kv_lora, nope] (transposed) and ``attn_v_b`` [heads, v, kv_lora]."""
    _, kv_lora, nope, _, v = mla_dims(config)
    per_head = data.reshape(-1, nope + v, kv_lora)
    return np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(per_head[:, nope:])


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
