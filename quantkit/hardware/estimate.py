"""What a profiled artifact would do on each hardware profile: does it fit, how fast should it
run, and can the target's runtimes run it at all.

* fits: weights + KV cache at the context + compute buffers against usable memory (total minus
  what the OS, driver or runtime keep); the largest context that fits.
* speed, a roofline: decode is bound by memory bandwidth over bytes read per token, prefill by
  compute over 2 x linear weights per token. Where the profile lists published measurements for
  the runtime and backend the artifact would use, an efficiency and a per-token overhead fitted
  on them (:mod:`quantkit.hardware.published`) give the speed; elsewhere an efficiency calibrated
  on this host (measured speed over the host's own roofline, from the artifact's profile run or
  a reference run passed in). Every estimate says what it was calibrated on
  (``efficiency.calibrated_on``, ``efficiency.prefill_calibrated_on``). Every figure here is
  ``estimated``; the host's measurements stay ``measured``.
* compatible: some runtime of the target takes the artifact's format and quant types, and for
  ONNX the target's operator domains, operator list, static shapes and maximum opset hold; each
  failed check is a reason. Ascend-style targets get the compiler command line for a compatible
  ONNX artifact and, otherwise, the recipes that would be compatible.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from .published import SpeedModel, backend_overheads, published_models
from .schema import HardwareProfile

__all__ = ["ArtifactFacts", "Calibration", "artifact_facts", "calibrate", "estimate_target", "compatibility"]

# the data type each format's kernels compute in, by scheme prefix (first match); a target without
# that type falls back to fp16, then fp32
_COMPUTE_DTYPE: dict[str, tuple[tuple[str, str], ...]] = {
    "gguf": (("f32", "fp32"), ("f16", "fp16"), ("bf16", "bf16"), ("", "int8")),  # quantized: int8 dot products
    "onnx": (("fp32", "fp32"), ("fp16", "fp16"), ("int8", "int8"), ("int4", "int8")),
    "gptq": (("", "fp16"),),
    "bnb": (("int8", "int8"), ("", "fp16")),
}
_EFFICIENCY_BOUNDS = (0.05, 0.95)
DEFAULT_EFFICIENCY = {"decode": 0.5, "prefill": 0.3}  # when nothing was measured on this host


@dataclass(frozen=True)
class ArtifactFacts:
    """What the estimates need about an artifact, from its manifest and runtime description."""

    format: str
    scheme: str
    kind: str  # decoder or encoder
    weight_bytes: int  # resident on the target
    bytes_read_per_token: int  # weights read to generate one token (embedding tables excluded)
    kv_bytes_per_token: int
    linear_params: int  # weights a token is multiplied through
    n_vocab: int
    n_embd: int
    max_ctx: int | None
    gguf_tensor_types: frozenset[str] = frozenset()
    onnx_graph: dict[str, Any] = field(default_factory=dict)
    # a mixture of experts: the routed experts a token does not go through stay resident but are
    # not read (0 for a dense model); active_params: the weights a token is multiplied through
    idle_expert_bytes: int = 0
    active_params: int | None = None

    @property
    def has_kv_cache(self) -> bool:
        """False for a static-shape ONNX decoder: each new token re-runs the whole window."""
        if not self.onnx_graph:
            return True
        return any(name.startswith("past_key_values.") for name in self.onnx_graph.get("inputs", {}))


@dataclass(frozen=True)
class Calibration:
    """Host efficiencies: measured speed divided by the host's roofline for the same work."""

    decode: float
    prefill: float
    source: str


def artifact_facts(fmt: str, scheme: str | None, desc: dict[str, Any], kv_bytes_per_token: int) -> ArtifactFacts:
    """Facts from a runtime's ``describe()`` (format-specific keys are optional)."""
    types = frozenset(desc.get("tensor_types", ()))
    if scheme is None:  # a bare .gguf file: its most common quantized tensor type
        scheme = next(iter(sorted(types - {"f32"})), "f16")
    elif fmt == "gguf":  # the llama.cpp type (q4_k_m of q4_k_m+noimatrix): what published points are of
        from ..formats.gguf.quantize import llama_type

        scheme = llama_type(scheme)
    return ArtifactFacts(
        format=fmt,
        scheme=scheme,
        kind=desc.get("kind", "decoder"),
        weight_bytes=int(desc.get("deployed_weight_bytes", desc["tensor_bytes"])),
        bytes_read_per_token=int(desc.get("deployed_bytes_read_per_token", desc["bytes_read_per_token"])),
        kv_bytes_per_token=kv_bytes_per_token,
        linear_params=int(desc["linear_params"]),
        n_vocab=int(desc["n_vocab"]),
        n_embd=int(desc["n_embd"]),
        max_ctx=desc.get("max_ctx"),
        gguf_tensor_types=types,
        onnx_graph=desc.get("graph", {}),
        idle_expert_bytes=int(desc.get("expert_bytes", 0) * (1 - desc.get("expert_used_count", 0) / max(1, desc.get("expert_count", 0))))
        if desc.get("expert_count") else 0,
        active_params=desc.get("active_params"),
    )


def _bounded(x: float) -> float:
    low, high = _EFFICIENCY_BOUNDS
    return min(high, max(low, x))


def _compute_dtype(facts: ArtifactFacts, profile: HardwareProfile) -> str:
    wanted = next(d for prefix, d in _COMPUTE_DTYPE.get(facts.format, (("", "fp32"),)) if facts.scheme.startswith(prefix))
    for dtype in (wanted, "fp16", "fp32"):
        if dtype in profile.compute:
            return dtype
    return next(iter(profile.compute))


def roofline(facts: ArtifactFacts, profile: HardwareProfile, ctx: int) -> dict[str, float]:
    """Unscaled bounds: decode tokens/s from bandwidth, prefill tokens/s from compute."""
    per_token = facts.bytes_read_per_token + facts.kv_bytes_per_token * ctx // 2
    dtype = _compute_dtype(facts, profile)
    return {
        "decode_tokens_per_s": profile.memory.bandwidth_bytes_per_s / max(1, per_token),
        "prefill_tokens_per_s": profile.compute[dtype] / max(1, 2 * facts.linear_params),
        "compute_dtype": dtype,
    }


def _compute_bytes(facts: ArtifactFacts, ctx: int) -> int:
    # activations of one 512-token batch and one logits row (llama.cpp's compute buffer scale)
    ubatch = min(512, ctx)
    return ubatch * facts.n_embd * 4 * 8 + facts.n_vocab * 4 * 2


def estimate_target(facts: ArtifactFacts, profile: HardwareProfile, ctx: int, calibration: Calibration | None) -> dict[str, Any]:
    """Fits, largest context, estimated speeds and compatibility of one artifact on one profile."""
    usable = profile.usable_bytes
    fixed = facts.weight_bytes + _compute_bytes(facts, ctx)
    needed = fixed + facts.kv_bytes_per_token * ctx
    if facts.kv_bytes_per_token:
        max_ctx = max(0, (usable - fixed) // facts.kv_bytes_per_token)
        if facts.max_ctx:
            max_ctx = min(max_ctx, facts.max_ctx)
    else:
        max_ctx = facts.max_ctx or ctx
    bounds = roofline(facts, profile, ctx)
    eff = calibration or Calibration(DEFAULT_EFFICIENCY["decode"], DEFAULT_EFFICIENCY["prefill"], "default")
    compatible, reasons, extra = compatibility(facts, profile)
    published = _published(profile, extra.get("runtime"), bounds["compute_dtype"], facts)
    result: dict[str, Any] = {
        "name": profile.name,
        "kind": profile.kind,
        "fits": needed <= usable,
        "needed_bytes": int(needed),
        "usable_bytes": int(usable),
        "max_ctx": int(max_ctx),
        "ctx": ctx,
        "compatible": compatible,
        "reasons": reasons,
        "compute_dtype": bounds["compute_dtype"],
        "efficiency": {"decode": eff.decode, "prefill": eff.prefill, "calibrated_on": eff.source},
        "estimated": True,
        **extra,
    }
    efficiency = result["efficiency"]
    if "prefill" in published:  # published measurements on this hardware win over this host's
        model = published["prefill"]
        result["prefill_tokens_per_s"] = model.tokens_per_s(1.0 / bounds["prefill_tokens_per_s"])
        efficiency.update(prefill=model.efficiency, prefill_overhead_s=model.overhead_s, prefill_calibrated_on=model.source)
    else:
        result["prefill_tokens_per_s"] = bounds["prefill_tokens_per_s"] * eff.prefill
        efficiency["prefill_calibrated_on"] = eff.source
    if facts.kind == "decoder" and facts.has_kv_cache:
        result["decode_roofline_tokens_per_s"] = bounds["decode_tokens_per_s"]
        if "decode" in published:
            # fitted on published file sizes of dense models: the artifact's work in the same unit
            # (weights, not only the bytes a token reads, plus the KV cache), less the experts a
            # token of a mixture of experts does not go through
            model = published["decode"]
            work = (facts.weight_bytes - facts.idle_expert_bytes + facts.kv_bytes_per_token * ctx // 2) / profile.memory.bandwidth_bytes_per_s
            result["decode_tokens_per_s"] = model.tokens_per_s(work)
            efficiency.update(decode=model.efficiency, decode_overhead_s=model.overhead_s, calibrated_on=model.source)
        else:
            result["decode_tokens_per_s"] = bounds["decode_tokens_per_s"] * eff.decode
    elif facts.kind == "decoder":  # no KV cache: every token is a prefill of the whole window
        result["decode_tokens_per_s"] = result["prefill_tokens_per_s"] / ctx
    return result


def _published(profile: HardwareProfile, runtime_label: str | None, dtype: str, facts: ArtifactFacts) -> dict[str, SpeedModel]:
    """Speed models from the profile's published measurements for the runtime the artifact would use."""
    runtime = next((r for r in profile.runtimes if f"{r.name} ({r.backend})" == runtime_label), None)
    if runtime is None or profile.measured:
        return {}
    quant = facts.scheme if facts.format == "gguf" else None
    # the same backend on the other shipped hardware: overheads where this profile's points cannot
    # show one, and whole speeds this profile has no point for
    others = [(m, p) for p in _shipped_profiles() if p.name != profile.name for m in p.measurements
              if m.runtime == runtime.name and m.backend == runtime.backend]
    models = published_models(profile, runtime.name, runtime.backend, dtype, quant,
                              overheads=backend_overheads(others)) if profile.measurements else {}
    if len(models) < 2:
        pooled = published_models(profile, runtime.name, runtime.backend, dtype, quant, others, pooled=True)
        for metric, model in pooled.items():
            if metric not in models:
                models[metric] = SpeedModel(model.efficiency, model.overhead_s, model.points, f"{model.source}, on other hardware")
    return models


@functools.cache
def _shipped_profiles() -> tuple[HardwareProfile, ...]:
    from .loading import load_profile_file, profile_files

    return tuple(load_profile_file(path) for path in profile_files().values())


def calibrate(facts: ArtifactFacts, host: HardwareProfile, latency: dict[str, Any], ctx: int, source: str) -> Calibration:
    """Efficiencies from a measured run on the host: measured / roofline, bounded."""
    bounds = roofline(facts, host, ctx)
    if "decode_tokens_per_s" in latency:
        decode = latency["decode_tokens_per_s"]["median"] / bounds["decode_tokens_per_s"]
        prefill = latency["prefill_tokens_per_s"]["median"] / bounds["prefill_tokens_per_s"]
    else:  # encoders: tokens embedded per second is prefill work
        decode = DEFAULT_EFFICIENCY["decode"]
        prefill = latency["encode_tokens_per_s"]["median"] / bounds["prefill_tokens_per_s"]
    return Calibration(_bounded(decode), _bounded(prefill), source)


# -- compatibility ---------------------------------------------------------------------------------
def _gguf_types(facts: ArtifactFacts) -> set[str]:
    # 1-D tensors (norms, biases) stay F32 in every GGUF file and every backend runs them
    return {t for t in facts.gguf_tensor_types if t != "f32"} or {facts.scheme}


def _runtime_problem(facts: ArtifactFacts, runtime) -> str | None:
    if runtime.quant_types is None:
        return None
    label = f"{runtime.name} ({runtime.backend})"
    if facts.format == "gguf":
        unsupported = sorted(_gguf_types(facts) - set(runtime.quant_types))
        if unsupported:
            return f"quant type: GGUF tensor types {', '.join(unsupported)} are not supported by {label}, which runs {', '.join(runtime.quant_types)}"
        return None
    if facts.scheme not in runtime.quant_types:
        return f"quant type: {facts.format}:{facts.scheme} is not supported by {label}, which runs {', '.join(runtime.quant_types)}"
    return None


def _onnx_problems(facts: ArtifactFacts, profile: HardwareProfile) -> list[str]:
    c, graph = profile.constraints, facts.onnx_graph
    problems = []
    ops = list(graph.get("operators", {}))
    if c.onnx_domains is not None:
        allowed = {d or "ai.onnx" for d in c.onnx_domains}
        outside = [op for op in ops if op.split("::")[0] not in allowed]
        if outside:
            problems.append(f"operators outside {', '.join(sorted(allowed))}: {', '.join(outside)}")
    if c.onnx_operators is not None:
        known = set(c.onnx_operators)
        missing = [op for op in ops if op.split("::")[0] == "ai.onnx" and op.split("::")[1] not in known]
        if missing:
            problems.append(f"operators the compiler lacks: {', '.join(missing)}")
    if c.static_shapes and graph.get("dynamic_inputs"):
        dynamic = graph["dynamic_inputs"]
        shown = ", ".join(dynamic[:4]) + (f" and {len(dynamic) - 4} more" if len(dynamic) > 4 else "")
        problems.append(f"dynamic shapes: inputs {shown} have symbolic dimensions; the compiler needs static shapes (--static-shapes)")
    if c.max_onnx_opset is not None and graph.get("opset", 0) > c.max_onnx_opset:
        problems.append(f"opset {graph['opset']} is newer than the compiler's maximum {c.max_onnx_opset} (--opset {c.max_onnx_opset})")
    return problems


def _suggestions(profile: HardwareProfile) -> list[str]:
    """Recipes the target's runtimes would take."""
    out = []
    for runtime in profile.runtimes:
        for fmt in runtime.formats:
            if fmt == "gguf":
                types = runtime.quant_types or ["q4_k_m", "q8_0"]
                out += [f"gguf:{t}" for t in types if t != "f32"]
            elif fmt == "onnx":
                static = " --static-shapes" if profile.constraints.static_shapes else ""
                out += [f"onnx:{t}{static}" for t in (runtime.quant_types or ["int8", "int4"])]
            else:
                out += [f"{fmt}:{t}" for t in (runtime.quant_types or [])] or [f"{fmt}:*"]
    return list(dict.fromkeys(out))


def _input_shape(graph: dict[str, Any]) -> str:
    return ";".join(f"{name}:{','.join(str(d) for d in shape)}" for name, shape in graph.get("inputs", {}).items())


def compatibility(facts: ArtifactFacts, profile: HardwareProfile) -> tuple[bool, list[str], dict[str, Any]]:
    """(compatible, reasons, extra) where extra may hold ``runtime``, ``compile_command`` and
    ``compatible_recipes``."""
    candidates = [r for r in profile.runtimes if facts.format in r.formats]
    extra: dict[str, Any] = {}
    reasons: list[str] = []
    chosen = None
    if not candidates:
        offered = "; ".join(f"{r.name} ({r.backend}): {', '.join(r.formats)}" for r in profile.runtimes)
        reasons.append(f"format: no runtime on {profile.name} runs {facts.format} ({offered})")
    onnx_problems = _onnx_problems(facts, profile) if facts.format == "onnx" else []
    for runtime in candidates:
        problems = [p for p in [_runtime_problem(facts, runtime), *onnx_problems] if p]
        if not problems:
            chosen = runtime
            break
        reasons += [p for p in problems if p not in reasons]
    compatible = chosen is not None
    if compatible:
        reasons = []
        extra["runtime"] = f"{chosen.name} ({chosen.backend})"
        if chosen.note:
            extra["runtime_note"] = chosen.note
        if facts.format == "onnx" and profile.compiler is not None:
            extra["compile_command"] = profile.compiler.command.format(
                model="model.onnx", output="model", input_shape=_input_shape(facts.onnx_graph)
            )
    else:
        extra["compatible_recipes"] = _suggestions(profile)
    return compatible, reasons, extra
