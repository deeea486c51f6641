"""Which Linears GPTQ quantizes in each supported architecture, as data (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArchSpec", "ARCHITECTURES", "EXPERTS_GATE_UP", "EXPERTS_DOWN"]

#: in a sequential group, the routed experts' gate and up projections (their stacked
#: ``mlp.experts.gate_up_proj``), or their down projections: quantized per expert, each from the
#: tokens routed to it
EXPERTS_GATE_UP, EXPERTS_DOWN = "mlp.experts:gate_up", "mlp.experts:down"


@dataclass(frozen=True)
class ArchSpec:
    """Which Linears of a decoder block GPTQ quantizes, in the order (and groups) of the
    true-sequential schedule (where the blocks are is the engine's ``runtimes.stream.Layout``).
    ``optional``: names a block may lack (a mixture of experts' leading dense blocks have a dense
    MLP and no experts, the others the reverse; DeepSeek's q projection is low-rank or not)."""

    sequential: tuple[tuple[str, ...], ...]
    optional: frozenset[str] = frozenset()

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA_LIKE = ArchSpec(sequential=_ATTENTION + _MLP)


def _moe(attention: tuple[tuple[str, ...], ...], shared: str | None, dense: bool, optional_attention: tuple[str, ...] = ()) -> ArchSpec:
    """A mixture-of-experts block: attention, then the routed experts' gate/up beside the shared
    expert's (and, in leading dense blocks, the dense MLP's), then the down projections."""
    gate_up, down = [EXPERTS_GATE_UP], [EXPERTS_DOWN]
    if shared:
        gate_up += [f"mlp.{shared}.gate_proj", f"mlp.{shared}.up_proj"]
        down += [f"mlp.{shared}.down_proj"]
    if dense:
        gate_up += ["mlp.gate_proj", "mlp.up_proj"]
        down += ["mlp.down_proj"]
    mlp = (*gate_up, *down)
    return ArchSpec(sequential=(*attention, tuple(gate_up), tuple(down)), optional=frozenset((*mlp, *optional_attention)))


# DeepSeek's multi-head latent attention: the low-rank q (or, V2-Lite, a full q) and the kv
# latent from the block's input; their up-projections from the normed latents; the output
_MLA = (("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj", "self_attn.kv_b_proj"), ("self_attn.o_proj",))

# config.json model_type -> layout; the dense families share Llama's block layout
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "qwen3_moe": _moe(_ATTENTION, None, dense=False),
    "qwen2_moe": _moe(_ATTENTION, "shared_expert", dense=False),
    "mixtral": _moe(_ATTENTION, None, dense=False),
    "olmoe": _moe(_ATTENTION, None, dense=False),
    "deepseek_v2": _moe(_MLA, "shared_experts", dense=True, optional_attention=("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.q_b_proj")),
    "deepseek_v3": _moe(_MLA, "shared_experts", dense=True, optional_attention=("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.q_b_proj")),
    "glm4_moe": _moe(_ATTENTION, "shared_experts", dense=True),
}
