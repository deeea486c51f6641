"""The release gate: profile reports checked against a policy a person wrote.

A policy (YAML) sets limits on report metrics, overall or narrowed by a prefix (a domain such as
``zh.ppl_delta_pct``, or a hardware profile such as ``rtx-4060-8gb.decode_tokens_per_s`` for an
estimate), lists the profiles the artifact must fit (``fits``) and run on (``compatible``), and
may compare against a baseline report with a tolerance. Metric names are the report's; where a
metric lives and which direction is better is one table (:data:`METRICS`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InputError

__all__ = ["METRICS", "Policy", "RuleResult", "GateResult", "load_policy", "evaluate", "read_report"]

# metric -> (report block, better direction); latency figures are medians of the measured runs
METRICS: dict[str, tuple[str, Literal["lower", "higher"]]] = {
    "kld_mean": ("quality", "lower"),
    "kld_p99": ("quality", "lower"),
    "kld_max": ("quality", "lower"),
    "top1_agreement": ("quality", "higher"),
    "ppl": ("quality", "lower"),
    "ppl_delta_pct": ("quality", "lower"),
    "cosine_mean": ("quality", "higher"),
    "cosine_min": ("quality", "higher"),
    "file_bytes": ("memory", "lower"),
    "peak_rss_bytes": ("memory", "lower"),
    "predicted_peak_bytes": ("memory", "lower"),
    "ttft_s": ("latency", "lower"),
    "prefill_tokens_per_s": ("latency", "higher"),
    "decode_tokens_per_s": ("latency", "higher"),
    "encode_tokens_per_s": ("latency", "higher"),
    "decode_roofline_fraction": ("host", "higher"),
}
# what a target estimate (``PROFILE.metric``) can be gated on
TARGET_METRICS = ("decode_tokens_per_s", "prefill_tokens_per_s", "max_ctx", "needed_bytes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limit(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one(self) -> Limit:
        if self.min is None and self.max is None:
            raise ValueError("a rule needs min, max or both")
        return self


class Baseline(_Strict):
    tolerance_pct: float = Field(ge=0)
    metrics: list[str] | None = None  # default: every metric both reports have


class Policy(_Strict):
    rules: dict[str, Limit] = Field(default_factory=dict)
    fits: list[str] = Field(default_factory=list)
    compatible: list[str] = Field(default_factory=list)
    baseline: Baseline | None = None
    # a limit inside a statistic's 95 % interval: fail the gate, pass it, or pass with a warning
    on_inconclusive: Literal["fail", "pass", "warn"] = "fail"

    @model_validator(mode="after")
    def _known(self) -> Policy:
        for name in self.rules:
            metric = name.rpartition(".")[2]
            if metric not in METRICS and metric not in TARGET_METRICS:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        for name in (self.baseline.metrics or []) if self.baseline else []:
            if name not in METRICS:
                raise ValueError(f"baseline: unknown metric {name!r}")
        return self


@dataclass(frozen=True)
class RuleResult:
    artifact: str
    rule: str
    value: float | bool | None
    limit: str
    passed: bool  # the outcome for the gate (an inconclusive rule counts as the policy says)
    kind: str  # measured or estimated
    verdict: Literal["pass", "fail", "inconclusive"] | None = None  # None: from ``passed``
    interval: list[float] | None = None  # the value's 95 % interval, when it has one
    more_tokens: int | None = None  # inconclusive: about how many more tokens would decide it

    @property
    def outcome(self) -> str:
        return self.verdict or ("pass" if self.passed else "fail")

    @property
    def verdict_text(self) -> str:
        """'pass', 'FAIL', or 'inconclusive (counted as FAIL; ~N more tokens would decide it)'."""
        if self.outcome != "inconclusive":
            return "pass" if self.passed else "FAIL"
        more = f"; ~{self.more_tokens:,} more tokens would decide it" if self.more_tokens else ""
        return f"inconclusive (counted as {'pass' if self.passed else 'FAIL'}{more})"

    def to_dict(self) -> dict[str, Any]:
        out = {"artifact": self.artifact, "rule": self.rule, "value": self.value, "limit": self.limit,
               "verdict": self.outcome, "passed": self.passed, "kind": self.kind}
        if self.interval is not None:
            out["interval"] = self.interval
        if self.more_tokens is not None:
            out["more_tokens_to_decide"] = self.more_tokens
        return out


@dataclass
class GateResult:
    results: list[RuleResult] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    on_inconclusive: str = "fail"  # the policy's choice, for the warning 'warn' asks for

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    @property
    def inconclusive(self) -> list[RuleResult]:
        return [r for r in self.results if r.outcome == "inconclusive"]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rules": [r.to_dict() for r in self.results],
                "failed": [r.rule for r in self.failed], "inconclusive": [r.rule for r in self.inconclusive]}


def load_policy(path: str | Path) -> Policy:
    """Read a policy file; errors name the file and the field (bad input: exit code 2)."""
    import pydantic
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the policy ({exc.__class__.__name__})") from exc
    try:
        return Policy.model_validate(data or {})
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise InputError(f"{path}: {where}: {first['msg'].removeprefix('Value error, ')}") from exc


def read_report(path: str | Path) -> dict[str, Any]:
    from .report.schema import validate_report

    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable profile report ({exc.__class__.__name__})") from exc
    try:
        validate_report(report, "profile")
    except Exception as exc:  # the schema's own message names the field
        raise InputError(f"{path}: {exc}") from exc
    return report


def artifact_label(report: dict[str, Any]) -> str:
    manifest = report["artifact"].get("manifest") or {}
    recipe = manifest.get("recipe")
    if recipe:
        static = "-static" if recipe.get("options", {}).get("static_shapes") else ""
        return f"{recipe['format']}:{recipe['scheme']}{static}"
    return Path(report["artifact"]["path"]).name


def metric_value(report: dict[str, Any], name: str) -> tuple[float | None, str]:
    """(value, measured|estimated) of ``name``, ``DOMAIN.metric`` or ``PROFILE.metric``; None if absent."""
    prefix, _, metric = name.rpartition(".")
    if prefix:
        targets = {t["name"]: t for t in report.get("targets", [])}
        if prefix in targets:
            return targets[prefix].get(metric), "estimated"
        domains = (report.get("quality") or {}).get("domains", {})
        return (domains.get(prefix) or {}).get(metric), "measured"
    block, _ = METRICS[metric]
    value = (report.get(block) or {}).get(metric)
    if isinstance(value, dict):  # latency: a spread
        value = value.get("median")
    return value, "estimated" if metric == "predicted_peak_bytes" else "measured"


def metric_interval(report: dict[str, Any], name: str) -> tuple[list[float], int] | None:
    """(95 % interval, tokens scored) of a quality metric, overall or ``DOMAIN.metric``; None
    when the report has none (a metric without one, or a report from before intervals)."""
    prefix, _, metric = name.rpartition(".")
    quality = report.get("quality") or {}
    block = (quality.get("domains") or {}).get(prefix) if prefix else quality
    interval = ((block or {}).get("intervals") or {}).get(metric)
    if interval is None or METRICS.get(metric, ("", ""))[0] != "quality":
        return None
    return [float(interval[0]), float(interval[1])], int(block.get("tokens", 0))


def _check_limit(label: str, name: str, value: float, kind: str, limit: Limit, uncertainty, policy: Policy) -> RuleResult:
    """pass when the whole interval is on the right side of every limit, fail when all of it is
    on the wrong side of one, inconclusive when a limit lies inside it (point values: pass/fail)."""
    lo, hi = uncertainty[0] if uncertainty else (value, value)
    fails = (limit.min is not None and hi < limit.min) or (limit.max is not None and lo > limit.max)
    holds = (limit.min is None or lo >= limit.min) and (limit.max is None or hi <= limit.max)
    verdict = "fail" if fails else "pass" if holds else "inconclusive"
    more = None
    if verdict == "inconclusive":
        from .profile.stats import tokens_to_decide

        tokens = uncertainty[1]
        needed = [tokens_to_decide(tokens, value, [lo, hi], b) for b in (limit.min, limit.max) if b is not None and lo <= b <= hi]
        needed = [n for n in needed if n is not None]
        more = max(0, max(needed) - tokens) if needed else None
    passed = verdict == "pass" or (verdict == "inconclusive" and policy.on_inconclusive != "fail")
    return RuleResult(label, name, value, _limit_text(limit), passed, kind, verdict,
                      [lo, hi] if uncertainty else None, more)


def _limit_text(limit: Limit) -> str:
    parts = ([f">= {limit.min:g}"] if limit.min is not None else []) + ([f"<= {limit.max:g}"] if limit.max is not None else [])
    return " and ".join(parts)


def evaluate(reports: list[dict[str, Any]], policy: Policy, baselines: list[dict[str, Any]] | None = None) -> GateResult:
    """Check every report against every rule; a metric a report lacks is bad input (InputError)."""
    result = GateResult(reports=reports, on_inconclusive=policy.on_inconclusive)
    for report in reports:
        label = artifact_label(report)
        for name, limit in policy.rules.items():
            value, kind = metric_value(report, name)
            if value is None:
                raise InputError(
                    f"{label}: the report has no {name!r} (profile with the latency run, the domain, "
                    "or --profile for a target metric)"
                )
            result.results.append(_check_limit(label, name, value, kind, limit, metric_interval(report, name), policy))
        targets = {t["name"]: t for t in report.get("targets", [])}
        for check in ("fits", "compatible"):
            for profile in getattr(policy, check):
                if profile not in targets:
                    raise InputError(f"{label}: the report has no estimate for {profile!r} (profile with --profile {profile})")
                value = bool(targets[profile][check])
                result.results.append(RuleResult(label, f"{check}:{profile}", value, "true", value, "estimated"))
        if policy.baseline and baselines:
            result.results += _against_baseline(report, label, baselines, policy.baseline, policy)
    return result


def _against_baseline(report, label, baselines, baseline: Baseline, policy: Policy) -> list[RuleResult]:
    """New against old: the worsening (positive = worse) must stay within the tolerance. With
    intervals, the difference is tested: paired over windows when both reports scored the same
    windows (kld_mean, top1_agreement, ppl_delta_pct), else from both intervals (independent)."""
    from .profile.stats import Z95

    matches = [b for b in baselines if artifact_label(b) == label] or (baselines if len(baselines) == 1 else [])
    if not matches:
        raise InputError(f"{label}: no baseline report for this artifact (baselines: {', '.join(map(artifact_label, baselines))})")
    old = matches[0]
    out = []
    for metric in baseline.metrics or list(METRICS):
        new_value, kind = metric_value(report, metric)
        old_value, _ = metric_value(old, metric)
        if new_value is None or old_value is None:
            continue
        sign = 1.0 if METRICS[metric][1] == "lower" else -1.0
        worse = sign * (new_value - old_value)
        tolerance = baseline.tolerance_pct / 100.0 * max(abs(old_value), 1e-12)
        se = _difference_stderr(report, old, metric)
        lo, hi = (worse, worse) if se is None else (worse - Z95 * se, worse + Z95 * se)
        verdict = "pass" if hi <= tolerance else "fail" if lo > tolerance else "inconclusive"
        passed = verdict == "pass" or (verdict == "inconclusive" and policy.on_inconclusive != "fail")
        worse_pct = 100.0 * worse / max(abs(old_value), 1e-12)
        spread = "" if se is None else f" ± {100.0 * Z95 * se / max(abs(old_value), 1e-12):.1f}%"
        text = f"within {baseline.tolerance_pct:g}% of {old_value:.6g} ({'+' if worse_pct >= 0 else ''}{worse_pct:.1f}%{spread} worse)"
        interval = None if se is None else [new_value - Z95 * se, new_value + Z95 * se]
        out.append(RuleResult(label, f"baseline.{metric}", new_value, text, passed, kind, verdict, interval))
    return out


# per-window series a paired comparison uses, and how a difference in it maps to the metric
_PAIRED = {"kld_mean": "kld_mean", "top1_agreement": "top1_agreement", "ppl_delta_pct": "log_ppl_ratio"}


def _difference_stderr(new: dict[str, Any], old: dict[str, Any], metric: str) -> float | None:
    """Standard error of (new - old) for ``metric``; None for a point comparison."""
    from .profile.stats import Z95

    q_new, q_old = new.get("quality") or {}, old.get("quality") or {}
    same_windows = q_new.get("windows_sha256") and q_new.get("windows_sha256") == q_old.get("windows_sha256")
    if same_windows:
        series = _PAIRED.get(metric)
        a = (q_new.get("window_stats") or {}).get(series or "")
        b = (q_old.get("window_stats") or {}).get(series or "")
        if not (a and b and len(a) == len(b) and len(a) > 1):
            return None  # the same tokens scored, no per-window series: compared as they are
        diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        se = float(diff.std(ddof=1) / np.sqrt(diff.size))
        if metric == "ppl_delta_pct":  # d(100 (r - 1)) = 100 r d(ln r)
            se *= 100.0 * float(q_old.get("ppl_ratio", 1.0))
        return se
    intervals = [metric_interval(r, metric) for r in (new, old)]
    if any(i is None for i in intervals):
        return None
    # independent samples: each interval's half-width / 1.96 is its standard error
    return math.hypot(*[(hi - lo) / (2 * Z95) for (lo, hi), _tokens in intervals])
