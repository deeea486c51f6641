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
none leaves the caller to its host or default efficiency. Points pooled from other hardware (the
leave-one-out check of a profile with a single point) give their median efficiency, no overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import HardwareProfile, Measurement

__all__ = ["SpeedModel", "fit_speed", "published_models", "point_work", "leave_one_out", "compute_dtype_of"]

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


def fit_speed(work: list[float], seconds: list[float]) -> tuple[float, float]:
    """(efficiency, overhead_s) minimising the relative error of ``t = w / e + c``, e <= 1, c >= 0."""
    if len(work) == 1:
        return min(1.0, work[0] / seconds[0]), 0.0
    # weighted least squares of t = a w + c with weights 1/t^2 (relative error)
    wts = [1.0 / t / t for t in seconds]
    sw = sum(wts)
    swx = sum(w * x for w, x in zip(wts, work, strict=True))
    swy = sum(w * y for w, y in zip(wts, seconds, strict=True))
    swxx = sum(w * x * x for w, x in zip(wts, work, strict=True))
    swxy = sum(w * x * y for w, x, y in zip(wts, work, seconds, strict=True))
    det = sw * swxx - swx * swx
    # points of (nearly) one size cannot separate efficiency from overhead: efficiency alone
    spread = det > 1e-6 * sw * swxx
    a, c = ((sw * swxy - swx * swy) / det, (swxx * swy - swx * swxy) / det) if spread else (swxy / swxx, 0.0)
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
                     points: list[tuple[Measurement, HardwareProfile]] | None = None, pooled: bool = False) -> dict[str, SpeedModel]:
    """Decode and prefill speed models for ``runtime``/``backend`` on ``profile`` (either missing
    when no point has that speed), for an artifact whose kernels compute in ``dtype`` and whose
    main quant type is ``quant``. ``points`` overrides the profile's own (leave-one-out);
    ``pooled`` points come from other hardware: median efficiency, no overhead."""
    if points is None:
        points = [(m, profile) for m in profile.measurements if m.runtime == runtime and m.backend == backend]
    out = {}
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
        if pooled:
            effs = sorted(min(1.0, w / t) for w, t in zip(work, seconds, strict=True))
            eff, over = effs[len(effs) // 2] if len(effs) % 2 else (effs[len(effs) // 2 - 1] + effs[len(effs) // 2]) / 2, 0.0
        else:
            eff, over = fit_speed(work, seconds)
        out[metric] = SpeedModel(eff, over, len(chosen), _label([m for m, _ in chosen], runtime, backend))
    return out


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
                source, model = "this profile's other points", published_models(profile, m.runtime, m.backend, dtype, m.quant, own).get(metric)
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
