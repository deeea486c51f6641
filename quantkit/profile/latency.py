"""Latency and peak memory, measured in a fresh child process that loads the artifact and generates.

A fresh process makes ``peak_rss_bytes`` the footprint a user would see for this model alone,
and keeps the profiler's own reference model and logits out of the figure. The child is
quantkit's isolated worker (``quantkit.isolate``), so a runtime that aborts is an error here.
"""

from __future__ import annotations

import resource
import statistics
from pathlib import Path

__all__ = ["measure_latency", "spread"]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _proc_status_bytes(key: str) -> int:
    # VmHWM is this address space's own high-water mark; getrusage's ru_maxrss would carry the
    # parent's peak across fork+exec and report the profiler's memory, not the model's
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_latency(
    fmt: str, path: Path, *, ctx: int, prompt_tokens: int, generate_tokens: int, repeats: int, threads: int,
    kind: str = "decoder",
) -> dict:
    """Decoders: time to first token, prefill and decode speed. Encoders: passages embedded one
    at a time (``encode_texts_per_s``, ``encode_tokens_per_s``)."""
    args = dict(fmt=fmt, kind=kind, path=str(path), ctx=ctx, prompt_tokens=prompt_tokens,
                generate_tokens=generate_tokens, repeats=repeats, threads=threads)
    from ..isolate import run_isolated

    raw = run_isolated("quantkit.profile.latency:latency_in_child", args, what=f"latency worker for {path.name}",
                       timeout=1800)
    runs = raw["runs"]
    memory = {"peak_rss_bytes": raw["peak_rss_bytes"], "baseline_rss_bytes": raw["baseline_rss_bytes"]}
    if kind == "encoder":
        return {
            "threads": threads,
            "repeats": repeats,
            "texts": raw["texts"],
            "tokens": raw["tokens"],
            "encode_s": spread([r["encode_s"] for r in runs]),
            "encode_texts_per_s": spread([raw["texts"] / r["encode_s"] for r in runs]),
            "encode_tokens_per_s": spread([raw["tokens"] / r["encode_s"] for r in runs]),
            "_memory": memory,
        }
    p, g = raw["prompt_tokens"], generate_tokens
    return {
        "threads": threads,
        "prompt_tokens": p,
        "generated_tokens": g,
        "repeats": repeats,
        "ttft_s": spread([r["prefill_s"] for r in runs]),
        "prefill_tokens_per_s": spread([p / r["prefill_s"] for r in runs]),
        "decode_tokens_per_s": spread([g / r["decode_s"] for r in runs]),
        "_memory": memory,
    }


def latency_in_child(args: dict, reporter) -> dict:
    from ..profile.corpus import default_texts
    from ..runtimes import get_runtime

    runtime_cls = get_runtime(args["fmt"])
    runtime_cls.import_library()  # the runtime library's own footprint belongs to the baseline
    baseline = _proc_status_bytes("VmRSS")
    runtime = runtime_cls(Path(args["path"]), n_ctx=args["ctx"], threads=args["threads"], logits_all=False)
    text = default_texts()["en"]
    if args.get("kind") == "encoder":
        from .corpus import segments

        passages = segments(text, limit=32)
        tokens = sum(len(runtime.tokenize(p)) for p in passages)
        runs = [runtime.encode_timed(passages) for _ in range(args["repeats"] + 1)][1:]
        return {"runs": runs, "texts": len(passages), "tokens": tokens, "peak_rss_bytes": _proc_status_bytes("VmHWM"),
                "baseline_rss_bytes": baseline}
    tokens = runtime.tokenize(text)
    while len(tokens) < args["prompt_tokens"]:
        tokens += tokens
    room = min(args["ctx"], getattr(runtime, "max_window", args["ctx"])) - args["generate_tokens"] - 1
    prompt = tokens[: max(1, min(args["prompt_tokens"], room))]
    runs = [runtime.generate_timed(prompt, args["generate_tokens"]) for _ in range(args["repeats"] + 1)][1:]
    peak = _proc_status_bytes("VmHWM")
    return {"runs": runs, "prompt_tokens": len(prompt), "peak_rss_bytes": peak, "baseline_rss_bytes": baseline}
