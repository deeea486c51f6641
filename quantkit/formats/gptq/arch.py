"""Which Linears GPTQ quantizes in each supported architecture, as data (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ArchSpec", "ARCHITECTURES"]


@dataclass(frozen=True)
class ArchSpec:
    """Which Linears of a decoder block GPTQ quantizes, in the order (and groups) of the
    true-sequential schedule (where the blocks are is the engine's ``runtimes.stream.Layout``)."""

    sequential: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


_LLAMA_LIKE = ArchSpec(
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)
# config.json model_type -> layout; all supported families share Llama's block layout
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}
