"""Quality with error bars on the default evaluation text: Gemma 3 270M q4_k_m, q5_k_m and q6_k
profiled with `quantkit profile`'s defaults (en, zh, code; every window of the shipped text),
KLD with its 95 % interval per domain, whether neighbouring types are separated (intervals
apart, and the paired per-window difference), and how long the default profile takes.

    python benchmarks/quality_intervals.py [--threads N] [--quick]

Converts (cached under out/bench) without verification, profiles each artifact with latency
off (quality only); the first profile also computes the float32 reference (then cached).
Prints tables; writes benchmarks/results/quality_intervals.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import cached_embedded_artifact, cold_cache, markdown_table, write_results  # noqa: E402

from quantkit.api import convert, profile  # noqa: E402

NAME = "quality_intervals"
SCHEMES = ("q4_k_m", "q5_k_m", "q6_k")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="2 windows per domain (checks the script, not the claim)")
    args = ap.parse_args()
    out = REPO / "out" / "bench"
    rows, reports = [], {}
    for scheme in SCHEMES:  # converted first: the profiles then run back to back
        if not cached_embedded_artifact(out / f"gemma-3-270m-{scheme}", f"gguf:{scheme}"):
            convert(None, [f"gguf:{scheme}"], out, verify=False)
    with cold_cache(("reference",), out):  # the first profile's time is what a first run takes
        _profiles(args, out, rows, reports)
    pairs = []
    for a, b in zip(SCHEMES, SCHEMES[1:], strict=False):
        qa, qb = reports[a]["quality"], reports[b]["quality"]
        wa = np.asarray(qa["window_stats"]["kld_mean"])
        wb = np.asarray(qb["window_stats"]["kld_mean"])
        diff = wa - wb
        se = float(diff.std(ddof=1) / math.sqrt(diff.size))
        pairs.append({"a": f"gguf:{a}", "b": f"gguf:{b}", "paired_difference": float(diff.mean()), "paired_stderr": se,
                      "paired_z": float(diff.mean() / se) if se else math.inf})
    result = {"model": "Gemma 3 270M (embedded)", "threads": args.threads, "quick": args.quick, "rows": rows, "pairs": pairs}
    print(f"default profile on Gemma 3 270M ({args.threads} threads)\n{table(result)}\n{pairs_table(result)}")
    write_results(NAME, result)


def _profiles(args, out: Path, rows: list, reports: dict) -> None:
    for scheme in SCHEMES:
        start = time.perf_counter()
        report = profile(out / f"gemma-3-270m-{scheme}", latency=False, threads=args.threads, chunks=2 if args.quick else None)
        elapsed = time.perf_counter() - start
        reports[scheme] = report
        q = report["quality"]
        rows.append({"recipe": f"gguf:{scheme}", "profile_s": elapsed, "file_bytes": report["memory"]["file_bytes"],
                     "tokens": {d: f["tokens"] for d, f in q["domains"].items()},
                     "kld_mean": {**{d: _figure(f) for d, f in q["domains"].items()}, "overall": _figure(q)}})


def _figure(f: dict) -> dict:
    return {"value": f["kld_mean"], "interval": f["intervals"]["kld_mean"], "tokens": f["tokens"]}


def table(result: dict) -> str:
    domains = list(result["rows"][0]["tokens"])
    head = ["recipe", "size"] + [f"{d} kld_mean (95 %)" for d in domains] + ["overall (95 %)", "tokens per domain", "profile time"]
    body = []
    for r in result["rows"]:
        cells = [f"{r['kld_mean'][d]['value']:.4f} ({r['kld_mean'][d]['interval'][0]:.4f}–{r['kld_mean'][d]['interval'][1]:.4f})"
                 for d in [*domains, "overall"]]
        body.append([r["recipe"], f"{r['file_bytes'] / 1e6:.0f} MB", *cells,
                     ", ".join(str(r["tokens"][d]) for d in domains), f"{r['profile_s']:.0f} s"])
    return markdown_table(head, body)


def pairs_table(result: dict) -> str:
    """Neighbouring types: which has the lower overall kld_mean, whether the 95 % intervals are
    apart, and the paired per-window difference (a - b) with its standard error."""
    overall = {r["recipe"]: r["kld_mean"]["overall"] for r in result["rows"]}
    body = []
    for p in result["pairs"]:
        a, b = overall[p["a"]], overall[p["b"]]
        low, high = (p["a"], p["b"]) if a["value"] < b["value"] else (p["b"], p["a"])
        apart = a["interval"][1] < b["interval"][0] or b["interval"][1] < a["interval"][0]
        separated = apart or abs(p["paired_z"]) > 1.96
        body.append([f"{p['a']} vs {p['b']}", f"{low} lower", "yes" if apart else "no",
                     f"{p['paired_difference']:+.4f} ± {p['paired_stderr']:.4f} (z = {p['paired_z']:+.1f})",
                     "separated" if separated else "not separated"])
    return markdown_table(["pair (kld_mean)", "order", "intervals apart", "paired per-window difference (a - b)", "verdict"], body)


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result), "pairs": pairs_table(result)}


if __name__ == "__main__":
    main()
