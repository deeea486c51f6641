"""The release gate: profile reports checked against a policy a person wrote.

A policy (YAML) sets limits on report metrics, overall or narrowed by a prefix (a domain such as
``zh.ppl_delta_pct``, or a hardware profile such as ``rtx-4060-8gb.decode_tokens_per_s`` for an
estimate), lists the profiles the artifact must fit (``fits``) and run on (``compatible``), and
may compare against a baseline report with a tolerance. Metric names are the report's; where a
metric lives and which direction is better is one table (:data:`METRICS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    passed: bool
    kind: str  # measured or estimated

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "rule": self.rule, "value": self.value, "limit": self.limit,
                "verdict": "pass" if self.passed else "fail", "kind": self.kind}


@dataclass
class GateResult:
    results: list[RuleResult] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rules": [r.to_dict() for r in self.results],
                "failed": [r.rule for r in self.failed]}


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


def _limit_text(limit: Limit) -> str:
    parts = ([f">= {limit.min:g}"] if limit.min is not None else []) + ([f"<= {limit.max:g}"] if limit.max is not None else [])
    return " and ".join(parts)


def evaluate(reports: list[dict[str, Any]], policy: Policy, baselines: list[dict[str, Any]] | None = None) -> GateResult:
    """Check every report against every rule; a metric a report lacks is bad input (InputError)."""
    result = GateResult(reports=reports)
    for report in reports:
        label = artifact_label(report)
        for name, limit in policy.rules.items():
            value, kind = metric_value(report, name)
            if value is None:
                raise InputError(
                    f"{label}: the report has no {name!r} (profile with the latency run, the domain, "
                    "or --profile for a target metric)"
                )
            ok = (limit.min is None or value >= limit.min) and (limit.max is None or value <= limit.max)
            result.results.append(RuleResult(label, name, value, _limit_text(limit), ok, kind))
        targets = {t["name"]: t for t in report.get("targets", [])}
        for check in ("fits", "compatible"):
            for profile in getattr(policy, check):
                if profile not in targets:
                    raise InputError(f"{label}: the report has no estimate for {profile!r} (profile with --profile {profile})")
                value = bool(targets[profile][check])
                result.results.append(RuleResult(label, f"{check}:{profile}", value, "true", value, "estimated"))
        if policy.baseline and baselines:
            result.results += _against_baseline(report, label, baselines, policy.baseline)
    return result


def _against_baseline(report, label, baselines, baseline: Baseline) -> list[RuleResult]:
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
        better = METRICS[metric][1]
        worse_pct = 100.0 * ((new_value - old_value) if better == "lower" else (old_value - new_value)) / max(abs(old_value), 1e-12)
        ok = worse_pct <= baseline.tolerance_pct
        out.append(RuleResult(label, f"baseline.{metric}", new_value,
                              f"within {baseline.tolerance_pct:g}% of {old_value:.6g} ({'+' if worse_pct >= 0 else ''}{worse_pct:.1f}% worse)",
                              ok, kind))
    return out
