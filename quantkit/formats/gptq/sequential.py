"""GPTQ over a whole model, one decoder block at a time, on the layer-streaming engine.

GPTQ's "true sequential" schedule (Frantar et al., 2022, Section 5 and the reference code):
the engine captures the inputs of decoder block 0 and loads one block at a time from the
checkpoint; its Linears are quantized in groups (q/k/v, then o, then gate/up, then down),
re-running the block between groups so that each group's Hessian comes from inputs that already
pass through the quantized earlier sublayers; the engine then maps the inputs through the
quantized block to the next block's inputs. Each block's codes go to ``on_block`` (the checkpoint
writer) as soon as they exist, so nothing of a finished block is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ...errors import ConversionError
from .algorithm import HessianAccumulator, QuantGrid, QuantizedWeight, gptq_quantize, rtn_quantize
from .arch import ARCHITECTURES, ArchSpec

__all__ = ["ArchSpec", "ARCHITECTURES", "GPTQSettings", "QuantizeResult", "quantize_blocks", "pick_device"]


@dataclass(frozen=True)
class GPTQSettings:
    """How to choose the codes: ``method`` 'gptq' (needs calibration windows) or 'rtn'."""

    grid: QuantGrid
    method: str = "gptq"
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False


@dataclass
class QuantizeResult:
    """Per-block figures for the manifest and the number of quantized Linears."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    quantized_linears: int = 0


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _linears(block: torch.nn.Module, spec: ArchSpec, index: int) -> dict[str, torch.nn.Linear]:
    found = {}
    for name in spec.linears:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            raise ConversionError(f"GPTQ: block {index} has no Linear {name!r}; its layout does not match the architecture table")
        found[name] = module
    return found


class _GroupSeen(Exception):
    """Raised by the hook that completes a group: the rest of the block's forward pass would not
    change the group's Hessians (an MLP after the attention projections is most of a block's work)."""


def _record(hessian: HessianAccumulator, pending: set[str], name: str, module, args, out) -> None:
    """Forward hook: add a Linear's input to its Hessian; stop the pass once the group is complete."""
    hessian.add(args[0])
    pending.discard(name)
    if not pending:
        raise _GroupSeen


def _gptq_block(step, linears: dict[str, torch.nn.Linear], spec: ArchSpec, settings: GPTQSettings, advance) -> tuple[dict, dict]:
    """Quantize one block's Linears group by group; (codes by Linear name, per-block figures)."""
    done: dict[str, QuantizedWeight] = {}
    losses, raised = [], {}
    for group in spec.sequential:
        hessians = {name: HessianAccumulator(linears[name].in_features, step.inputs[0].device) for name in group}
        pending: set[str] = set()
        handles = [linears[name].register_forward_hook(partial(_record, hessians[name], pending, name)) for name in group]
        try:
            for j in range(len(step.inputs)):
                pending.update(group)
                try:
                    step.forward(j)
                except _GroupSeen:
                    pass
        finally:
            for h in handles:
                h.remove()
        for name in group:
            linear = linears[name]
            q = gptq_quantize(
                linear.weight, hessians.pop(name).hessian, settings.grid, damp=settings.damp,
                act_order=settings.act_order, static_groups=settings.static_groups,
            )
            linear.weight.copy_(q.dequantized.to(linear.weight.device))
            done[name] = q
            losses.append(q.loss)
            if q.damp > settings.damp:  # the Hessian needed more dampening than asked
                raised[name] = q.damp
            advance(1)
    figures = {"gptq_loss_mean": sum(losses) / len(losses), "gptq_loss_max": max(losses), **({"damp_raised": raised} if raised else {})}
    return done, figures


def quantize_blocks(
    stream,
    spec: ArchSpec,
    settings: GPTQSettings,
    windows: Sequence[list[int]] | None = None,
    *,
    on_block: Callable[[Any, dict[str, QuantizedWeight]], None],
    task: Callable[[str, int], Any] | None = None,
) -> QuantizeResult:
    """Quantize every Linear of ``spec`` in the model of ``stream`` (a ``LayerStream``), block by
    block; ``on_block(step, codes)`` gets each block (its quantized Linears holding their
    dequantized weights) with its codes keyed by full module name. ``task(description, total)``
    is a ``Progress.task``-like context manager factory yielding ``advance``."""
    task = task or _no_progress
    if settings.method != "rtn" and not windows:
        raise ConversionError("GPTQ needs calibration windows (or use an -rtn scheme)")
    result = QuantizeResult()
    with torch.no_grad():
        for step in stream.steps(windows if settings.method != "rtn" else None):
            linears = _linears(step.block, spec, step.index)
            with task(f"{settings.method} layer {step.index + 1}/{step.count}", len(linears)) as advance:
                if settings.method == "rtn":
                    done, figures = {}, {}
                    for name, linear in linears.items():
                        done[name] = q = rtn_quantize(linear.weight, settings.grid)
                        linear.weight.copy_(q.dequantized)
                        advance(1)
                else:
                    done, figures = _gptq_block(step, linears, spec, settings, advance)
            on_block(step, {f"{stream.layout.blocks}.{step.index}.{name}": q for name, q in done.items()})
            result.quantized_linears += len(done)
            result.layers.append({"layer": step.index, **figures})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


class _NoProgress:
    def __enter__(self):
        return lambda n=1: None

    def __exit__(self, *exc):
        return False


def _no_progress(description: str, total: int | None = None) -> _NoProgress:
    return _NoProgress()
