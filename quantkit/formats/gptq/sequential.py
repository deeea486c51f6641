"""The layer-by-layer driver: GPTQ over a whole transformers model, one decoder block at a time.

GPTQ's "true sequential" schedule (Frantar et al., 2022, Section 5 and the reference code):
the inputs of decoder block 0 are captured once; then, for each block, its Linears are
quantized in groups (q/k/v, then o, then gate/up, then down), re-running the block between
groups so that each group's Hessian comes from inputs that already pass through the quantized
earlier sublayers; finally the quantized block maps its inputs to the next block's inputs. Only
one block's activations are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import ConversionError
from .algorithm import HessianAccumulator, QuantGrid, QuantizedWeight, gptq_quantize, rtn_quantize
from .arch import ARCHITECTURES, ArchSpec

__all__ = ["ArchSpec", "ARCHITECTURES", "GPTQSettings", "QuantizeResult", "quantize_model", "pick_device"]


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
    """Every quantized Linear by module name, and per-block figures for the manifest."""

    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's input is recorded: nothing later needs to run."""


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(obj: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """``obj`` (tensors nested in tuples, lists, dicts) on ``device``; shared tensors stay shared."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _blocks(model: torch.nn.Module, spec: ArchSpec) -> torch.nn.ModuleList:
    try:
        return model.get_submodule(spec.blocks)
    except AttributeError as exc:
        raise ConversionError(f"GPTQ: the model has no {spec.blocks!r}; its layout does not match the architecture table") from exc


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


def _capture_inputs(model: torch.nn.Module, blocks: torch.nn.ModuleList, windows: Sequence[list[int]]):
    """Block 0's input for every window, and each block's keyword arguments (masks, rotary
    embeddings; per block since sliding-window layers get their own mask). The first window
    runs the whole model once to record the keywords; the others stop at block 0."""
    inputs: list[torch.Tensor] = []
    block_kwargs: list[dict[str, Any]] = [{} for _ in blocks]
    first = [True]

    def hook_for(i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                inputs.append(hidden.detach())
            if first[0]:
                block_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                block_kwargs[i]["_extra_args"] = tuple(args[1:])
            elif i == 0:
                raise _StopForward

        return hook

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for window in windows:
            try:
                model(input_ids=torch.tensor([window], dtype=torch.long), use_cache=False)
            except _StopForward:
                pass
            first[0] = False
    finally:
        for h in handles:
            h.remove()
    return inputs, block_kwargs


def _run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(kwargs)
    extra = kwargs.pop("_extra_args", ())
    out = block(hidden, *extra, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def quantize_model(
    model: torch.nn.Module,
    spec: ArchSpec,
    settings: GPTQSettings,
    windows: Sequence[list[int]] | None = None,
    *,
    task: Callable[[str, int], Any] | None = None,
    device: torch.device | None = None,
) -> QuantizeResult:
    """Quantize every Linear of ``spec`` in ``model`` (in place: each weight becomes its
    dequantized value) and return the codes. ``task(description, total)`` is a
    ``Progress.task``-like context manager factory yielding ``advance``."""
    task = task or _no_progress
    model.eval()
    blocks = _blocks(model, spec)
    result = QuantizeResult()
    with torch.no_grad():
        if settings.method == "rtn":
            for i, block in enumerate(blocks):
                linears = _linears(block, spec, i)
                with task(f"rtn layer {i + 1}/{len(blocks)}", len(linears)) as advance:
                    for name, linear in linears.items():
                        q = rtn_quantize(linear.weight, settings.grid)
                        linear.weight.copy_(q.dequantized)
                        result.weights[f"{spec.blocks}.{i}.{name}"] = q
                        advance(1)
                result.layers.append({"layer": i})
            return result
        if not windows:
            raise ConversionError("GPTQ needs calibration windows (or use an -rtn scheme)")
        device = device or pick_device()
        inputs, block_kwargs = _capture_inputs(model, blocks, windows)
        memo: dict[int, Any] = {}
        inputs = [x.to(device) for x in inputs]
        for i, block in enumerate(blocks):
            block.to(device)
            kwargs = _to(block_kwargs[i], device, memo)
            linears = _linears(block, spec, i)
            losses, raised = [], {}
            with task(f"gptq layer {i + 1}/{len(blocks)}", len(linears)) as advance:
                for group in spec.sequential:
                    hessians = {name: HessianAccumulator(linears[name].in_features, device) for name in group}
                    handles = [
                        linears[name].register_forward_hook(lambda m, args, out, acc=hessians[name]: acc.add(args[0]))
                        for name in group
                    ]
                    try:
                        for x in inputs:
                            _run_block(block, x, kwargs)
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
                        result.weights[f"{spec.blocks}.{i}.{name}"] = q
                        losses.append(q.loss)
                        if q.damp > settings.damp:  # the Hessian needed more dampening than asked
                            raised[name] = q.damp
                        advance(1)
                inputs = [_run_block(block, x, kwargs) for x in inputs]
            block.to("cpu")
            result.layers.append(
                {
                    "layer": i,
                    "gptq_loss_mean": sum(losses) / len(losses),
                    "gptq_loss_max": max(losses),
                    **({"damp_raised": raised} if raised else {}),
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


class _NoProgress:
    def __enter__(self):
        return lambda n=1: None

    def __exit__(self, *exc):
        return False


def _no_progress(description: str, total: int | None = None) -> _NoProgress:
    return _NoProgress()
