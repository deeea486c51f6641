"""GPTQ over a whole model, one decoder block at a time, on the layer-streaming engine.

GPTQ's "true sequential" schedule (Frantar et al., 2022, Section 5 and the reference code):
the engine captures the inputs of decoder block 0 and loads one block at a time from the
checkpoint; its Linears are quantized in groups (q/k/v, then o, then gate/up, then down),
re-running the block between groups so that each group's Hessian comes from inputs that already
pass through the quantized earlier sublayers; the engine then maps the inputs through the
quantized block to the next block's inputs. Each block's codes go to ``on_block`` (the checkpoint
writer) as soon as they exist, so nothing of a finished block is kept.

A mixture of experts' routed experts are quantized one expert at a time, each from the tokens the
router sent it (the engine's ``expert_inputs``: its Hessian is over those tokens only, as in
GPTQModel and llm-compressor); an expert that got fewer than :data:`MIN_EXPERT_TOKENS`
calibration tokens is rounded to nearest instead (recorded per block in the manifest). The
router stays float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ...errors import ConversionError
from .algorithm import HessianAccumulator, QuantGrid, QuantizedWeight, gptq_quantize, rtn_quantize
from .arch import ARCHITECTURES, EXPERTS_DOWN, EXPERTS_GATE_UP, ArchSpec

__all__ = ["ArchSpec", "ARCHITECTURES", "GPTQSettings", "QuantizeResult", "quantize_blocks", "pick_device", "MIN_EXPERT_TOKENS"]

#: fewer calibration tokens than this routed to an expert: its Hessian would be a guess, so the
#: expert is rounded to nearest (GPTQ on a handful of tokens overfits them)
MIN_EXPERT_TOKENS = 16
_MARKERS = (EXPERTS_GATE_UP, EXPERTS_DOWN)


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


def _linears(block: torch.nn.Module, spec: ArchSpec, index: int) -> dict[str, Any]:
    """The block's Linears of ``spec`` by name (its routed-experts module under each marker)."""
    from ...runtimes.stream import is_experts

    found = {}
    for name in spec.linears:
        try:
            module = block.get_submodule(name.partition(":")[0])
        except AttributeError:
            module = None
        ok = is_experts(module) if name in _MARKERS else isinstance(module, torch.nn.Linear)
        if ok:
            found[name] = module
        elif name not in spec.optional:
            raise ConversionError(f"GPTQ: block {index} has no Linear {name!r}; its layout does not match the architecture table")
    if not found:
        raise ConversionError(f"GPTQ: block {index} has none of the Linears its architecture table names")
    # a block's feed-forward is routed experts or a dense MLP: never neither (experts left float
    # in a "GPTQ" checkpoint, were transformers to change how it lays them out)
    markers = [m for m in _MARKERS if m in spec.linears]
    if markers and not all(m in found for m in markers) and "mlp.gate_proj" not in found:
        raise ConversionError(f"GPTQ: block {index} has neither routed experts quantkit recognises nor a dense MLP")
    return found


def _expert_weights(module, marker: str, e: int) -> list[tuple[str, torch.Tensor]]:
    """The matrices of expert ``e`` under ``marker``: ("gate", [ff, hidden]) and ("up", ...) of
    the stacked gate_up_proj (gate rows first), or ("down", [hidden, ff])."""
    if marker == EXPERTS_DOWN:
        return [("down", module.down_proj[e])]
    ff = module.gate_up_proj.shape[1] // 2
    return [("gate", module.gate_up_proj[e, :ff]), ("up", module.gate_up_proj[e, ff:])]


def _quantize_experts(module, marker: str, hessians: dict[int, HessianAccumulator] | None, settings: GPTQSettings,
                      tokens: list[int]) -> tuple[dict[tuple[int, str], QuantizedWeight], list[int], list[float], dict[str, float]]:
    """Quantize every expert's matrices under ``marker`` in place: GPTQ from the expert's own
    Hessian, or round to nearest (every expert for RTN; an expert with too few tokens for GPTQ).
    Returns codes by (expert, part), the experts rounded to nearest, the GPTQ losses, and the
    dampening raised above the setting, by expert and part."""
    done, fallback, losses, raised = {}, [], [], {}
    for e in range(module.gate_up_proj.shape[0]):
        gptq = hessians is not None and tokens[e] >= MIN_EXPERT_TOKENS
        if hessians is not None and not gptq:
            fallback.append(e)
        hessian = hessians.pop(e, None) if hessians is not None else None  # freed once this expert is done
        for part, weight in _expert_weights(module, marker, e):
            q = _quantize_in_place(weight, hessian.hessian if gptq else None, settings)
            if gptq:
                losses.append(q.loss)
                if q.damp > settings.damp:
                    raised[f"experts.{e}.{part}"] = q.damp
            # the block's parameter now holds the values; the writer needs only codes and grid
            # (128 experts' float32 copies would double the block in memory)
            q.dequantized = q.dequantized.new_empty(0)
            done[e, part] = q
    return done, fallback, losses, raised


def _quantize_in_place(weight: torch.Tensor, hessian: torch.Tensor | None, settings: GPTQSettings) -> QuantizedWeight:
    """GPTQ of ``weight`` from ``hessian`` (round to nearest without one); ``weight`` then holds the
    quantized values, which the engine runs the next inputs through."""
    if hessian is None:
        q = rtn_quantize(weight, settings.grid)
    else:
        q = gptq_quantize(weight, hessian, settings.grid, damp=settings.damp, act_order=settings.act_order,
                          static_groups=settings.static_groups)
    weight.copy_(q.dequantized.to(weight.device))
    return q


class _GroupSeen(Exception):
    """Raised by the hook that completes a group: the rest of the block's forward pass would not
    change the group's Hessians (an MLP after the attention projections is most of a block's work)."""


def _record(hessian: HessianAccumulator, pending: set[str], name: str, module, args, out) -> None:
    """Forward hook: add a Linear's input to its Hessian; stop the pass once the group is complete."""
    hessian.add(args[0])
    pending.discard(name)
    if not pending:
        raise _GroupSeen


def _record_experts(hessians: dict[int, HessianAccumulator], tokens: list[int], pending: set[str], marker: str, module, args,
                    kwargs) -> None:
    """Forward pre-hook of a routed-experts module: add each expert's own inputs (to gate/up, or
    to down through the already quantized gate/up) to its Hessian."""
    from ...runtimes.stream import expert_inputs

    down = marker == EXPERTS_DOWN
    for e, x, h in expert_inputs(module, args, kwargs, down=down):
        inputs = h if down else x
        if e not in hessians:
            hessians[e] = HessianAccumulator(inputs.shape[-1], inputs.device)
        hessians[e].add(inputs)
        tokens[e] += x.shape[0]
    pending.discard(marker)
    if not pending:
        raise _GroupSeen


def _gptq_block(step, linears: dict[str, Any], spec: ArchSpec, settings: GPTQSettings, advance) -> tuple[dict, dict]:
    """Quantize one block's Linears group by group; (codes by Linear name, or by (marker,
    expert, part) for routed experts; per-block figures)."""
    done: dict[Any, QuantizedWeight] = {}
    losses, raised, experts_figures = [], {}, {}
    for group in spec.sequential:
        group = tuple(name for name in group if name in linears)
        plain = [name for name in group if name not in _MARKERS]
        hessians: dict[str, Any] = {name: HessianAccumulator(linears[name].in_features, step.inputs[0].device) for name in plain}
        tokens: dict[str, list[int]] = {}
        pending: set[str] = set()
        handles = [linears[name].register_forward_hook(partial(_record, hessians[name], pending, name)) for name in plain]
        for marker in (name for name in group if name in _MARKERS):
            hessians[marker], tokens[marker] = {}, [0] * linears[marker].gate_up_proj.shape[0]
            handles.append(linears[marker].register_forward_pre_hook(
                partial(_record_experts, hessians[marker], tokens[marker], pending, marker), with_kwargs=True))
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
        for marker in (name for name in group if name in _MARKERS):
            codes, fallback, expert_losses, expert_raised = _quantize_experts(linears[marker], marker, hessians.pop(marker), settings,
                                                                              tokens[marker])
            done.update({(marker, e, part): q for (e, part), q in codes.items()})
            losses += expert_losses
            raised.update(expert_raised)
            experts_figures[marker.partition(":")[2]] = {"tokens": tokens[marker], "rtn_fallback": fallback}
            advance(1)
        for name in plain:
            done[name] = q = _quantize_in_place(linears[name].weight, hessians.pop(name).hessian, settings)
            losses.append(q.loss)
            if q.damp > settings.damp:  # the Hessian needed more dampening than asked
                raised[name] = q.damp
            advance(1)
    figures = {"gptq_loss_mean": sum(losses) / len(losses), "gptq_loss_max": max(losses), **({"damp_raised": raised} if raised else {}),
               **({"experts": experts_figures} if experts_figures else {})}
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
                        if name in _MARKERS:
                            codes, _, _, _ = _quantize_experts(linear, name, None, settings, [])
                            done.update({(name, e, part): q for (e, part), q in codes.items()})
                        else:
                            done[name] = _quantize_in_place(linear.weight, None, settings)
                        advance(1)
                else:
                    done, figures = _gptq_block(step, linears, spec, settings, advance)
            on_block(step, {_checkpoint_name(stream.layout, step.index, key): q for key, q in done.items()})
            result.quantized_linears += len(done)
            result.layers.append({"layer": step.index, **figures})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _checkpoint_name(layout, index: int, key) -> str:
    """Where a quantized matrix goes in the checkpoint: a Linear under its module path, a routed
    expert's part as one Linear per expert under transformers 5's module names
    (``mlp.experts.{e}.{gate,up,down}_proj``, for every family: GPTQModel 7.7 looks for exactly
    these, Mixtral's too, and transformers 5 reads them)."""
    if isinstance(key, str):
        return f"{layout.blocks}.{index}.{key}"
    _, e, part = key
    return f"{layout.blocks}.{index}.mlp.experts.{e}.{part}_proj"


class _NoProgress:
    def __enter__(self):
        return lambda n=1: None

    def __exit__(self, *exc):
        return False


def _no_progress(description: str, total: int | None = None) -> _NoProgress:
    return _NoProgress()
