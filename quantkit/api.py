"""The Python API the CLI calls: one public function per verb."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import Artifact, remove_stale
from .errors import InputError
from .formats import ConvertOptions, get_format
from .profile.corpus import default_texts
from .progress import Progress
from .recipe import Recipe, parse_recipe
from .source import resolve_source
from .verify import FLOAT_KLD_LIMITS, Reference, verify_artifact

__all__ = ["convert", "profile", "gate", "plan", "ship", "convert_and_gate", "policy_profiles", "list_profiles", "show_profile", "validate_profiles", "ConvertResult", "DEFAULT_RECIPES"]

DEFAULT_RECIPES = ("gguf:q4_k_m",)


@dataclass
class ConvertResult:
    source: dict[str, Any]
    artifacts: list[Artifact] = field(default_factory=list)
    elapsed_s: float = 0.0
    peak_rss_bytes: int = 0
    stale_removed: tuple[int, int] = (0, 0)  # unfinished outputs of killed runs removed: (count, bytes)
    predicted_peaks: list[dict[str, Any]] = field(default_factory=list)  # per recipe, before converting
    available_bytes: int | None = None
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "artifacts": [
                {
                    "recipe": a.recipe,
                    "path": str(a.path),
                    "file": str(a.main_file),
                    "file_bytes": a.file_bytes,
                    "verification": a.manifest["details"].get("verification"),
                }
                for a in self.artifacts
            ],
            "elapsed_s": round(self.elapsed_s, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "stale_removed": {"count": self.stale_removed[0], "bytes": self.stale_removed[1]},
            "predicted_peaks": self.predicted_peaks,
            "available_bytes": self.available_bytes,
            "dry_run": self.dry_run,
        }


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def convert(
    source: str | Path | None = None,
    to: Iterable[str | Recipe] = DEFAULT_RECIPES,
    out_dir: str | Path = "quantkit-out",
    *,
    verify: bool = True,
    verify_texts: dict[str, str] | None = None,
    verify_tokens: int = 2048,
    verify_ctx: int = 512,
    allow_pickle: bool = False,
    threads: int | None = None,
    recipe_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    dry_run: bool = False,
    check_memory: bool = True,
) -> ConvertResult:
    """Convert ``source`` (HF folder, hub id, .gguf file, or None for the embedded default model)
    into one artifact per recipe under ``out_dir``; verify each before it is renamed into place.

    ``recipe_options`` are format settings such as ``{"damp": 0.01, "act_order": True}`` for
    GPTQ; each format takes the keys it knows, and a key no requested format knows is an error.

    Before converting an HF checkpoint, each recipe's peak memory is predicted from the source's
    shape (:mod:`quantkit.footprint`); with ``check_memory`` a prediction above the memory this
    machine has available is an InputError. ``dry_run`` stops there and returns the predictions."""
    start = time.perf_counter()
    recipe_options = {k: v for k, v in (recipe_options or {}).items() if v is not None}
    recipes = list(dict.fromkeys(parse_recipe(r, recipe_options) if isinstance(r, str) else r for r in to))
    _check_options_used(recipes, recipe_options)
    src = resolve_source(source, allow_pickle=allow_pickle)
    recipes = list(dict.fromkeys(get_format(r.format).for_source(r, src) for r in recipes))
    progress = progress or Progress(False)
    predicted, available = _predict_peaks(src, recipes, verify, verify_tokens, verify_ctx)
    if dry_run:  # the caller shows the predictions, then ``memory_refusal`` says whether they fit
        return ConvertResult(source=src.to_manifest(), predicted_peaks=predicted, available_bytes=available, dry_run=True)
    if check_memory and (message := memory_refusal(predicted, available)):
        raise InputError(message)
    checker, reference = None, None
    if verify:
        reference = Reference(src, threads=threads) if src.kind == "hf" else None
        texts = verify_texts or default_texts()

        def checker(artifact: Artifact) -> dict:
            scheme = artifact.manifest["recipe"]["scheme"]
            with progress.task(f"verifying {artifact.main_file.name}"):
                return verify_artifact(
                    artifact,
                    reference,
                    texts,
                    kld_limit=FLOAT_KLD_LIMITS.get(scheme),
                    max_tokens=verify_tokens,
                    ctx=verify_ctx,
                    threads=threads,
                )

    options = ConvertOptions(threads=threads, progress=progress, verify=checker)
    result = ConvertResult(source=src.to_manifest(), stale_removed=remove_stale(Path(out_dir)),
                           predicted_peaks=predicted, available_bytes=available)
    by_format: dict[str, list[Recipe]] = {}
    for recipe in recipes:
        by_format.setdefault(recipe.format, []).append(recipe)
    try:
        for fmt, group in by_format.items():
            result.artifacts += get_format(fmt).convert(src, group, Path(out_dir), options)
    finally:
        if reference is not None:
            reference.close()
    result.elapsed_s = time.perf_counter() - start
    result.peak_rss_bytes = _peak_rss_bytes()
    return result


def memory_refusal(predicted: list[dict[str, Any]], available: int | None) -> str | None:
    """The one-line refusal when a predicted peak exceeds the memory available, else None."""
    over = [p for p in predicted if available is not None and p["total_bytes"] > available]
    if not over:
        return None
    worst = max(over, key=lambda p: p["total_bytes"])
    hint = ""
    for phase, option in (("verify", "--no-verify"), ("imatrix", "--imatrix none")):
        other = {k: v for k, v in worst.get("phases", {}).items() if k != phase}
        if worst["phase"] == phase and other:
            hint = f", {option} (peak {max(other.values()) / 1e9:.1f} GB)"
    return (f"{worst['recipe']}: predicted peak memory {worst['total_bytes'] / 1e9:.1f} GB ({worst['phase']}) exceeds the "
            f"{available / 1e9:.1f} GB available; free memory{hint}, or pass --ignore-memory to try anyway")


def _predict_peaks(src, recipes: list[Recipe], verify: bool, tokens: int, ctx: int) -> tuple[list[dict[str, Any]], int | None]:
    """Predicted peak of each recipe (HF sources; a GGUF source is requantized by llama.cpp, one
    tensor at a time) and the memory available here."""
    from .footprint import available_memory_bytes, predict_convert_peak

    if src.kind != "hf":
        return [], available_memory_bytes()
    predicted = []
    for recipe in recipes:
        try:
            p = predict_convert_peak(src, recipe, verify=verify and recipe.format != "bnb", verify_tokens=tokens, verify_ctx=ctx)
        except (KeyError, TypeError, ValueError):  # a config without a decoder's sizes: the format says what is wrong
            return [], available_memory_bytes()
        predicted.append({"recipe": str(recipe), **p})
    return predicted, available_memory_bytes()


def _check_options_used(recipes: list[Recipe], options: dict[str, Any]) -> None:
    from .errors import RecipeError

    known = set().union(*(get_format(r.format).option_names() for r in recipes)) if recipes else set()
    unused = sorted(set(options) - known)
    if unused:
        names = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise RecipeError(f"{names} do(es) not apply to any requested recipe ({', '.join(map(str, recipes))})")


def _reference_for(manifest: dict | None, reference: str | Path | None, threads: int | None) -> Reference:
    if reference is None:
        src_info = (manifest or {}).get("source") or {}
        if src_info.get("kind") != "hf":
            raise InputError("this artifact has no HF source recorded; pass --reference SOURCE (an HF checkpoint)")
        reference = src_info["id"]
    src = resolve_source(reference)
    if src.kind != "hf":
        raise InputError(f"{reference}: the reference must be an HF checkpoint, not a GGUF file")
    recorded = ((manifest or {}).get("source") or {}).get("fingerprint")
    if recorded and recorded != src.fingerprint:
        raise InputError(f"{reference}: its fingerprint differs from the one the artifact was built from")
    return Reference(src, threads=threads)


def profile(
    artifact: str | Path,
    *,
    reference: str | Path | None = None,
    eval_data: list[str] | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    quality: bool = True,
    latency: bool = True,
    progress: Progress | None = None,
    profiles: list[str] | None = None,
    calibrate_from: str | Path | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Measure quality loss against the reference, latency and memory of one artifact, here;
    with ``profiles`` (hardware profile names or files, ``host`` included), add what it would
    do on each target: fits, estimated speed, compatibility. ``calibrate_from`` takes the host
    efficiencies from another profile report instead of this artifact's own run. The artifact's
    files are checked against its manifest first (sha256 too unless ``check`` is False)."""
    from .embedded import cache_dir
    from .hardware import HOST, load_profile
    from .profile.corpus import load_eval_data
    from .profile.run import locate_artifact, profile_artifact
    from .report.schema import validate_report

    # profile files are checked before anything is measured
    targets = [HOST if name == HOST else load_profile(name) for name in dict.fromkeys(profiles or [])]
    calibration = _calibration_from(calibrate_from) if calibrate_from else None
    _fmt, _main, manifest = locate_artifact(Path(artifact), check=True, hashes=check)
    ref = _reference_for(manifest, reference, threads) if quality else None
    texts = load_eval_data(eval_data) if quality else {}
    report = profile_artifact(
        Path(artifact), ref, texts, ctx=ctx, chunks=chunks, threads=threads, latency=latency,
        cache_dir=cache_dir() / "reference", progress=progress, targets=targets, calibration=calibration,
    )
    validate_report(report, "profile")  # what other tools read must match what we ship
    return report


def _calibration_from(path: str | Path):
    import json

    from .errors import InputError
    from .hardware.estimate import Calibration

    try:
        efficiency = json.loads(Path(path).read_text(encoding="utf-8"))["host"]["efficiency"]
        return Calibration(float(efficiency["decode"]), float(efficiency["prefill"]), f"measured run in {path}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a profile report with host efficiencies (profile it with --profile host)") from exc


def list_profiles() -> list[dict[str, Any]]:
    """Every shipped or user profile (validated), plus ``host``, as summary rows."""
    from .hardware import HOST, load_profile_file, profile_files

    rows = [{"name": HOST, "kind": "cpu", "file": None, "description": "this machine, measured at run time"}]
    for name, path in profile_files().items():
        p = load_profile_file(path)
        rows.append({
            "name": name, "kind": p.kind, "file": str(path), "description": p.description,
            "memory_bytes": p.memory.total_bytes, "bandwidth_bytes_per_s": p.memory.bandwidth_bytes_per_s,
            "runtimes": [f"{r.name} ({r.backend})" for r in p.runtimes],
        })
    return rows


def show_profile(name: str) -> dict[str, Any]:
    from .hardware import load_profile

    return load_profile(name).model_dump(mode="json")


def validate_profiles(paths: list[str | Path]) -> dict[str, str]:
    """Validate profile files; returns {path: message} for the broken ones."""
    from .hardware import ProfileError, load_profile_file

    problems = {}
    for path in paths:
        try:
            load_profile_file(path)
        except ProfileError as exc:
            problems[str(path)] = str(exc)
    return problems


def gate(
    reports: list[str | Path | dict[str, Any]],
    policy: str | Path,
    *,
    baseline: list[str | Path | dict[str, Any]] | None = None,
    html: str | Path | None = None,
    markdown: str | Path | None = None,
):
    """Check profile reports against a policy file; write the Markdown and HTML reports if asked.

    Returns a :class:`quantkit.gate.GateResult` (``.passed``, ``.failed``). Bad input (a policy or
    report that cannot be read, a metric a report lacks) raises InputError."""
    from .gate import evaluate, load_policy, read_report
    from .report.gate_render import render_html, render_markdown
    from .report.render import write_text

    rules = load_policy(policy)

    def load(items):
        return [item if isinstance(item, dict) else read_report(item) for item in items]

    if rules.baseline and not baseline:
        from .errors import InputError

        raise InputError(f"{policy}: the policy has a baseline rule; pass --baseline OLD_REPORT.json")
    result = evaluate(load(reports), rules, load(baseline or []))
    if result.inconclusive and result.on_inconclusive == "warn":
        from .log import logger

        logger.warning(f"{len(result.inconclusive)} rule(s) inconclusive (the limit lies inside the 95 % interval): "
                       + ", ".join(f"{r.artifact} {r.rule}" for r in result.inconclusive))
    for path, text in ((markdown, render_markdown(result) if markdown else None), (html, render_html(result) if html else None)):
        if path:
            write_text(path, text)
    return result


def policy_profiles(policy: str | Path) -> list[str]:
    """The hardware profiles a policy needs estimates for (fits, compatible, PROFILE.metric rules)."""
    from .gate import TARGET_METRICS, load_policy
    from .hardware import profile_files

    rules = load_policy(policy)
    names = [*rules.fits, *rules.compatible]
    known = set(profile_files()) | {"host"}
    names += [name.rpartition(".")[0] for name in rules.rules if name.rpartition(".")[0] in known
              and name.rpartition(".")[2] in TARGET_METRICS]
    return list(dict.fromkeys(names))


def convert_and_gate(
    source: str | Path | None,
    to: Iterable[str | Recipe],
    out_dir: str | Path,
    policy: str | Path,
    *,
    html: str | Path | None = None,
    markdown: str | Path | None = None,
    reports_dir: str | Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    chunks: int | None = 4,
    **convert_options: Any,
):
    """convert -> profile (with the policy's hardware profiles; ``chunks`` windows per domain)
    -> gate, in one go. Returns (ConvertResult, GateResult); each report is written as
    ``<artifact>.profile.json`` beside the artifacts (or in ``reports_dir``)."""
    from .gate import load_policy
    from .report.render import write_json

    load_policy(policy)  # a broken policy fails before anything is converted
    profiles = policy_profiles(policy)
    converted = convert(source, to, out_dir, threads=threads, progress=progress, **convert_options)
    reports = []
    for artifact in converted.artifacts:
        report = profile(artifact.path, threads=threads, progress=progress, profiles=profiles, chunks=chunks)
        target = Path(reports_dir or out_dir) / f"{artifact.path.name}.profile.json"
        write_json(report, target)
        reports.append(report)
    return converted, gate(reports, policy, html=html, markdown=markdown)


def ship(artifact: str | Path, profile_name: str, out_dir: str | Path, *, report: str | Path | None = None) -> dict[str, Any]:
    """A deployment bundle of ``artifact`` for a hardware profile (see ``quantkit.ship``)."""
    from .ship import ship as run_ship

    return run_ship(artifact, profile_name, out_dir, report=report)


def plan(
    source: str | Path | None,
    profile_name: str,
    out_dir: str | Path = "quantkit-plan",
    *,
    max_kld: float = 0.05,
    min_decode_tps: float | None = None,
    ctx: int = 512,
    threads: int | None = None,
    progress: Progress | None = None,
    estimate_only: bool = False,
) -> dict[str, Any]:
    """Pick the best recipe for a hardware profile (see ``quantkit.plan``); resumable in ``out_dir``.
    ``estimate_only``: the estimates and fits alone, from the source's shape (config.json is enough)."""
    from .plan import plan as run_plan

    return run_plan(source, profile_name, Path(out_dir), max_kld=max_kld, min_decode_tps=min_decode_tps,
                    ctx=ctx, threads=threads, progress=progress, estimate_only=estimate_only, convert=convert, profile=profile)
