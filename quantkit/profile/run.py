"""The profiler: quality against the reference, latency and memory in a fresh process, the host.

It knows nothing format-specific: the artifact's runtime (from ``quantkit.runtimes``) tokenizes,
scores windows, generates and describes its sizes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import MANIFEST_NAME, check_artifact, model_bytes, read_manifest, tool_versions
from ..errors import ArtifactError, InputError, SourceError
from ..progress import Progress
from ..runtimes import get_runtime
from .latency import measure_latency
from .memory import kv_cache_bytes_per_token, predicted_terms
from .quality import score_windows, summarize
from .reference import reference_scores
from .roofline import host_info
from .stats import METHODS

__all__ = ["profile_artifact", "locate_artifact", "make_windows"]

REPORT_SCHEMA_VERSION = 1


def locate_artifact(path: Path, *, check: bool = False, hashes: bool = True) -> tuple[str, Path, dict | None]:
    """(format, file to load, manifest or None) for an artifact folder or a bare model file.

    The manifest is always validated; with ``check`` the folder must hold exactly its files at
    their recorded sizes (and sha256 unless ``hashes`` is False), and a GGUF's header and tensor
    extents are read. Damage is an ArtifactError (bad input)."""
    from ..formats.gguf.header import read_gguf_summary
    from ..runtimes import runtime_formats

    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise InputError(f"{path}: not a quantkit artifact (no {MANIFEST_NAME})")
        manifest = read_manifest(path)
        fmt = manifest["recipe"]["format"]
        if fmt not in runtime_formats():
            raise ArtifactError(f"{path / MANIFEST_NAME}: unknown artifact format {fmt!r}; known: {', '.join(runtime_formats())}")
        if check:
            check_artifact(path, manifest, hashes=hashes)
        main = path / manifest.get("main_file", manifest["files"][0]["path"])
    elif path.is_file() and path.suffix == ".gguf":
        fmt, main, manifest = "gguf", path, None
    else:
        raise InputError(f"{path}: no such artifact (an artifact folder or a .gguf file)")
    if fmt == "gguf" and (check or manifest is None):
        try:
            read_gguf_summary(main)
        except SourceError as exc:
            raise ArtifactError(str(exc)) from exc
    return fmt, main, manifest


def make_windows(tokens: list[int], bos: int | None, ctx: int, chunks: int | None) -> list[list[int]]:
    """Consecutive windows of ``ctx`` tokens (BOS first when the model adds one)."""
    step = ctx - (1 if bos is not None else 0)
    windows = []
    for start in range(0, len(tokens) - step + 1, step):
        windows.append(([bos] if bos is not None else []) + tokens[start : start + step])
        if chunks and len(windows) >= chunks:
            break
    if not windows and len(tokens) >= 8:  # a text shorter than one window is scored as one window
        windows.append(([bos] if bos is not None else []) + tokens[: step])
    return windows


def profile_artifact(
    artifact: Path,
    reference,  # quantkit.verify.Reference, or None to skip quality
    texts: dict[str, str],
    *,
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    latency: bool = True,
    prompt_tokens: int = 128,
    generate_tokens: int = 32,
    repeats: int = 3,
    cache_dir: Path | None = None,
    progress=None,
    targets: list | None = None,  # HardwareProfile objects, or "host" (measured here)
    calibration=None,  # quantkit.hardware.estimate.Calibration; default: this artifact's own run
) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 1
    fmt, main, manifest = locate_artifact(artifact)
    runtime_cls = get_runtime(fmt)
    desc = runtime_cls.describe(main)
    kind = desc.get("kind", "decoder")
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "artifact": {"path": str(artifact), "format": fmt, "kind": kind, "runtime": runtime_cls.name, "manifest": manifest},
        "reference": None,
        "settings": {"ctx": ctx, "chunks": chunks, "threads": threads, "scored": "second half of each window"},
        "tool_versions": tool_versions(),
    }
    if reference is not None:
        report["reference"] = {"source": reference.source.to_manifest(), "runtime": "transformers (float32)"}
        scorer = _quality if kind == "decoder" else _embedding_quality
        report["quality"] = scorer(runtime_cls, main, reference, texts, ctx, chunks, threads, cache_dir, progress)
    host = host_info(threads)
    report["host"] = host
    memory: dict[str, Any] = {
        "file_bytes": main.stat().st_size if manifest is None else model_bytes(manifest, main),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(desc),
        "ctx": ctx,
    }
    roofline = None
    if kind == "decoder":
        bytes_per_token = desc["bytes_read_per_token"] + kv_cache_bytes_per_token(desc) * (prompt_tokens + generate_tokens // 2)
        roofline = host["memory_bandwidth_bytes_per_s"] / bytes_per_token
        host["decode_roofline_tokens_per_s"] = roofline
        host["bytes_read_per_token"] = bytes_per_token
    if latency:
        lat = measure_latency(fmt, main, kind=kind, ctx=ctx, prompt_tokens=prompt_tokens,
                              generate_tokens=generate_tokens, repeats=repeats, threads=threads)
        measured_mem = lat.pop("_memory")
        lat["measured"] = True
        report["latency"] = lat
        memory["peak_rss_bytes"] = measured_mem["peak_rss_bytes"]
        terms = predicted_terms(desc, ctx, measured_mem["baseline_rss_bytes"], prompt_tokens=lat.get("prompt_tokens", 1))
        memory["predicted_peak_bytes"] = sum(terms.values())
        memory["predicted_terms"] = terms
        memory["predicted_error_pct"] = 100.0 * (memory["predicted_peak_bytes"] - memory["peak_rss_bytes"]) / memory["peak_rss_bytes"]
        if roofline:
            host["decode_roofline_fraction"] = lat["decode_tokens_per_s"]["median"] / roofline
    report["memory"] = memory
    if targets:
        report["targets"] = _targets(fmt, manifest, desc, report, targets, ctx, threads, calibration, main)
    return report


def _targets(fmt, manifest, desc, report, targets, ctx, threads, calibration, main) -> list[dict[str, Any]]:
    """Estimates for each hardware profile; the host's also carries its measurements; a GGUF's
    the split that fits there (``fit``: GPU layers, KV cache type, largest context)."""
    from ..hardware import HOST, host_profile
    from ..hardware.estimate import artifact_facts, calibrate, estimate_target

    scheme = manifest["recipe"]["scheme"] if manifest else None
    facts = artifact_facts(fmt, scheme, desc, kv_cache_bytes_per_token(desc))
    host = host_profile(threads, measured=report["host"])
    latency = report.get("latency")
    if latency:
        own = calibrate(facts, host, latency, ctx, source="this artifact, measured on this host")
        report["host"]["efficiency"] = {"decode": own.decode, "prefill": own.prefill, "measured": True}
        calibration = calibration or own
    out, layout = [], None
    for target in targets:
        profile = host if target == HOST else target
        estimate = estimate_target(facts, profile, ctx, calibration)
        if profile.measured and latency and "decode_tokens_per_s" in latency:
            measured = {"decode_tokens_per_s": latency["decode_tokens_per_s"]["median"],
                        "prefill_tokens_per_s": latency["prefill_tokens_per_s"]["median"]}
            estimate["measured"] = measured
            estimate["estimate_error_pct"] = {
                k: 100.0 * (estimate[k] - v) / v for k, v in measured.items()
            }
        if fmt == "gguf" and estimate["compatible"]:
            from ..hardware.fit import GGUFLayout, fit_gguf

            layout = layout or GGUFLayout.of(main)
            try:
                estimate["fit"] = fit_gguf(main, profile, estimate=estimate, layout=layout)
            except InputError as exc:
                estimate["fit"] = {"error": str(exc)}
        out.append(estimate)
    return out


def _embedding_quality(runtime_cls, main, reference, texts, ctx, chunks, threads, cache_dir, progress) -> dict[str, Any]:
    """Encoders: cosine similarity of pooled passage embeddings to the reference's."""
    import numpy as np

    from ..verify import cosine_rows
    from .corpus import segments

    runtime = runtime_cls(main, n_ctx=ctx, threads=threads)
    per_domain, everything = {}, []
    try:
        for domain, text in texts.items():
            passages = segments(text, limit=16 * (chunks or 4))
            if not passages:
                raise InputError(f"evaluation text {domain!r} has no passage of 16 characters or more")
            with (progress or Progress(False)).task(f"embedding {domain}", len(passages)):
                cos = cosine_rows(runtime.embed(passages), reference.embed(passages, max_length=ctx))
            per_domain[domain] = _cosine_figures(cos)
            everything.append(cos)
    finally:
        runtime.close()
    return {**_cosine_figures(np.concatenate(everything)), "domains": per_domain, "measured": True}


def _cosine_figures(cos) -> dict[str, Any]:
    return {"passages": int(cos.size), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def _quality(runtime_cls, main, reference, texts, ctx, chunks, threads, cache_dir, progress) -> dict[str, Any]:
    runtime = runtime_cls(main, n_ctx=ctx, threads=threads)
    per_domain, all_parts = {}, []
    try:
        if getattr(runtime, "max_window", ctx) < ctx:
            raise InputError(f"{main}: this static-shape model takes windows of {runtime.max_window} tokens; pass --ctx {runtime.max_window}")
        bos = runtime.bos_id if runtime.add_bos else None
        by_domain = {domain: make_windows(runtime.tokenize(text), bos, ctx, chunks) for domain, text in texts.items()}
        for domain, windows in by_domain.items():
            if not windows:
                raise InputError(f"evaluation text {domain!r} has fewer than 8 tokens")
        task = (progress or Progress(False)).task
        references = reference_scores(
            lambda windows: reference.model.logits(windows, task=task), by_domain,
            fingerprint=reference.source.fingerprint, cache_dir=cache_dir,
        )
        for domain, windows in by_domain.items():
            with (progress or Progress(False)).task(f"scoring {domain}", len(windows)) as advance:
                parts = score_windows(runtime, windows, references[domain], advance)
            per_domain[domain] = {**summarize(parts), "windows_sha256": _windows_digest(windows)}
            all_parts += parts
    finally:
        runtime.close()
    overall = hashlib.sha256("".join(d["windows_sha256"] for d in per_domain.values()).encode()).hexdigest()
    return {**summarize(all_parts), "windows_sha256": overall, "domains": per_domain, "measured": True,
            "interval_methods": dict(METHODS)}


def _windows_digest(windows: list[list[int]]) -> str:
    """Identifies the scored windows: two reports with the same digest scored the same tokens."""
    digest = hashlib.sha256()
    for window in windows:
        digest.update(np.asarray(window, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()
