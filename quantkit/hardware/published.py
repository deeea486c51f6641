"""Speed models fitted on published measurements of a hardware profile (``measurements:`` in its
file: llama-bench rows and the like, each with its source).

Per token, the time is a roofline term divided by an efficiency plus a fixed overhead:

* decode: ``t = (bytes read per token / bandwidth) / e + c`` — small models on GPUs and NPUs are
  bound by kernel launches and synchronisation, not bandwidth (Ascend's CANN backend decodes
  1-3B models at 27-64 tok/s on 1.6 TB/s), which ``c`` captures;
* prefill: ``t = (2 x parameters / peak compute of the kernels' data type) / e + c``.

``e`` (at most 1) and ``c`` (at least 0) are fitted by least squares on relative error over the
points of the same runtime and backend — for decode those of the same quant type when there are
some (dequantizing kernels differ: CANN decodes Q4_0 at half the rate of Q8_0 per byte), for
prefill those of the same compute data type when there are some. One point gives ``e`` alone;
none leaves the caller to its host or default efficiency. Points pooled from other hardware (a
speed a profile has no point for, and the leave-one-out check of a profile with a single point)
give their median efficiency and the backend's per-token overhead where that hardware shows one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .schema import HardwareProfile, Measurement

__all__ = ["SpeedModel", "fit_speed", "published_models", "point_work", "leave_one_out", "compute_dtype_of",
           "backend_overheads", "MIN_SPREAD"]

# GGUF type -> the data type llama.cpp's kernels multiply in (quantized types: int8 dot products)
_FLOAT_TYPES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class SpeedModel:
    efficiency: float
    overhead_s: float
    points: int
    source: str

    def tokens_per_s(self, work_s: float) -> float:
        return 1.0 / (work_s / self.efficiency + self.overhead_s)


MIN_SPREAD = 1.5  # points must span this ratio of roofline work to tell efficiency from overhead


def fit_speed(work: list[float], seconds: list[float], overhead_s: float | None = None) -> tuple[float, float]:
    """(efficiency, overhead_s) minimising the relative error of ``t = w / e + c``, e <= 1, c >= 0.

    Points of about one size (less than :data:`MIN_SPREAD` apart) cannot separate the two: then
    the overhead is ``overhead_s`` if given (borrowed from other hardware), else 0."""
    spread = max(work) >= MIN_SPREAD * min(work)
    wts = [1.0 / t / t for t in seconds]
    if not spread:
        c = overhead_s or 0.0
        a = sum(w * x * (t - c) for w, x, t in zip(wts, work, seconds, strict=True)) / sum(w * x * x for w, x in zip(wts, work, strict=True))
        if a < 1.0:  # faster than the roofline allows with that overhead: e = 1, the rest is overhead
            return 1.0, max(0.0, sum(w * (t - x) for w, x, t in zip(wts, work, seconds, strict=True)) / sum(wts))
        return 1.0 / a, c
    # weighted least squares of t = a w + c with weights 1/t^2 (relative error)
    sw = sum(wts)
    swx = sum(w * x for w, x in zip(wts, work, strict=True))
    swy = sum(w * y for w, y in zip(wts, seconds, strict=True))
    swxx = sum(w * x * x for w, x in zip(wts, work, strict=True))
    swxy = sum(w * x * y for w, x, y in zip(wts, work, seconds, strict=True))
    det = sw * swxx - swx * swx
    a, c = (sw * swxy - swx * swy) / det, (swxx * swy - swx * swxy) / det
    if c < 0:  # no overhead: a alone
        a, c = swxy / swxx, 0.0
    if a < 1.0:  # faster than the roofline is not an efficiency: a = 1, the rest is overhead
        a, c = 1.0, max(0.0, (swy - swx) / sw)
    return 1.0 / a, c


def compute_dtype_of(quant: str, profile: HardwareProfile) -> str:
    wanted = _FLOAT_TYPES.get(quant, "int8")
    for dtype in (wanted, "fp16", "fp32"):
        if dtype in profile.compute:
            return dtype
    return next(iter(profile.compute))


def point_work(m: Measurement, profile: HardwareProfile) -> dict[str, float]:
    """Roofline seconds per token of a measurement on its profile: decode and prefill."""
    return {"decode": m.size_bytes / profile.memory.bandwidth_bytes_per_s,
            "prefill": 2.0 * m.params / profile.compute[compute_dtype_of(m.quant, profile)]}


def _label(points: list[Measurement], runtime: str, backend: str) -> str:
    names = ", ".join(f"{m.model} {m.quant}" for m in points[:3]) + (" ..." if len(points) > 3 else "")
    return f"{len(points)} published measurement{'s' if len(points) != 1 else ''} ({runtime} {backend}: {names})"


def published_models(profile: HardwareProfile, runtime: str, backend: str, dtype: str | None, quant: str | None = None,
                     points: list[tuple[Measurement, HardwareProfile]] | None = None, pooled: bool = False,
                     overheads: dict[str, float] | None = None) -> dict[str, SpeedModel]:
    """Decode and prefill speed models for ``runtime``/``backend`` on ``profile`` (either missing
    when no point has that speed), for an artifact whose kernels compute in ``dtype`` and whose
    main quant type is ``quant``. ``points`` overrides the profile's own (leave-one-out);
    ``pooled`` points come from other hardware: their median efficiency and the backend's
    per-token overhead where some of that hardware shows one. Where the chosen
    points are all of about one size and cannot show an overhead, the overhead fitted on all of
    ``points`` is used, else ``overheads`` (per metric, from the same backend on other hardware)."""
    if points is None:
        points = [(m, profile) for m in profile.measurements if m.runtime == runtime and m.backend == backend]
    out = {}
    borrowed = None
    if not pooled:  # the overhead is a per-token cost of the backend, whatever the quant type:
        # fitted on all of this hardware's points when they span sizes, else taken from other hardware
        overheads = {**(overheads or {}), **backend_overheads(points)}
    for metric, speed, same in (
        ("decode", lambda m: m.gen_tokens_per_s, lambda m, p: quant is not None and m.quant == quant),
        ("prefill", lambda m: m.prompt_tokens_per_s, lambda m, p: dtype is not None and compute_dtype_of(m.quant, p) == dtype),
    ):
        chosen = [(m, p) for m, p in points if speed(m)]
        chosen = [(m, p) for m, p in chosen if same(m, p)] or chosen
        if not chosen:
            continue
        work = [point_work(m, p)[metric] for m, p in chosen]
        seconds = [1.0 / speed(m) for m, _ in chosen]
        if pooled:  # other hardware: the median efficiency after the backend's per-token overhead
            over = backend_overheads(points).get(metric, 0.0)
            eff = statistics.median(min(1.0, w / (t - over)) if t > over else 1.0 for w, t in zip(work, seconds, strict=True))
            over = over if any(t > over for t in seconds) else 0.0
        else:
            borrowed = (overheads or {}).get(metric) if max(work) < MIN_SPREAD * min(work) else None
            eff, over = fit_speed(work, seconds, borrowed)
        label = _label([m for m, _ in chosen], runtime, backend) + (" + the backend's per-token overhead" if not pooled and borrowed and over else "")
        out[metric] = SpeedModel(eff, over, len(chosen), label)
    return out


def backend_overheads(points: list[tuple[Measurement, HardwareProfile]]) -> dict[str, float]:
    """Per-token overheads (decode, prefill) fitted profile by profile on ``points`` where a
    profile's points span enough sizes; the median per metric (none where no profile can say)."""
    found: dict[str, list[float]] = {"decode": [], "prefill": []}
    for profile in {id(p): p for _, p in points}.values():
        own = [m for m, p in points if p is profile]
        for metric, speed in (("decode", lambda m: m.gen_tokens_per_s), ("prefill", lambda m: m.prompt_tokens_per_s)):
            pts = [m for m in own if speed(m)]
            work = [point_work(m, profile)[metric] for m in pts]
            if len(pts) > 1 and max(work) >= MIN_SPREAD * min(work):
                found[metric].append(fit_speed(work, [1.0 / speed(m) for m in pts])[1])
    return {k: statistics.median(v) for k, v in found.items() if v}


def leave_one_out(profiles: list[HardwareProfile]) -> list[dict]:
    """Each published point estimated from the others: the same profile's points of that runtime
    and backend, else (a profile with one point) the same backend's points on other profiles."""
    rows = []
    for profile in profiles:
        for i, m in enumerate(profile.measurements):
            own = [(o, profile) for j, o in enumerate(profile.measurements)
                   if j != i and o.runtime == m.runtime and o.backend == m.backend]
            pooled = [(o, p) for p in profiles if p is not profile for o in p.measurements
                      if o.runtime == m.runtime and o.backend == m.backend]
            work = point_work(m, profile)
            dtype = compute_dtype_of(m.quant, profile)
            for metric, measured in (("decode", m.gen_tokens_per_s), ("prefill", m.prompt_tokens_per_s)):
                if not measured:
                    continue
                overheads = backend_overheads(pooled)
                source, model = "this profile's other points", published_models(
                    profile, m.runtime, m.backend, dtype, m.quant, own, overheads=overheads).get(metric)
                if model is None:
                    source, model = "other profiles, same backend", published_models(
                        profile, m.runtime, m.backend, dtype, m.quant, pooled, pooled=True).get(metric)
                if model is None:
                    continue
                estimate = model.tokens_per_s(work[metric])
                rows.append({"profile": profile.name, "model": m.model, "quant": m.quant, "backend": m.backend,
                             "metric": metric, "published": measured, "estimated": estimate,
                             "ratio": estimate / measured, "calibrated_on": source, "points": model.points})
    return rows
