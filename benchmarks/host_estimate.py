"""Host estimate against measurement: the decode/prefill speed quantkit estimates for one GGUF
artifact on this host, calibrated on another artifact's run, next to that artifact's own
measured speed (a check of the estimator that used to be a timed test).

    python benchmarks/host_estimate.py [--threads N]

Converts the embedded Gemma 3 270M to gguf:q8_0 and gguf:q4_k_m (cached under out/bench),
profiles q8_0 with --profile host, then estimates q4_k_m calibrated on q8_0's efficiencies and
measures q4_k_m. Prints a table; writes benchmarks/results/host_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import cached_embedded_artifact, markdown_table, write_results  # noqa: E402

from quantkit.api import convert, profile  # noqa: E402

NAME = "host_estimate"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    out = REPO / "out" / "bench"
    arts = {}
    for scheme in ("q8_0", "q4_k_m"):
        arts[scheme] = out / f"gemma-3-270m-{scheme}"
        if not cached_embedded_artifact(arts[scheme], f"gguf:{scheme}"):
            convert(None, [f"gguf:{scheme}"], out, verify=False)
    calibration = out / "host-estimate-q8_0.json"
    base = profile(arts["q8_0"], quality=False, profiles=["host"], threads=args.threads)
    calibration.write_text(json.dumps(base))
    report = profile(arts["q4_k_m"], quality=False, profiles=["host"], threads=args.threads, calibrate_from=calibration)
    target = report["targets"][0]
    rows = [{"metric": key, "estimated": target[key], "measured": measured, "ratio": target[key] / measured}
            for key, measured in target["measured"].items()]
    result = {"calibrated_on": "gguf:q8_0", "artifact": "gguf:q4_k_m", "threads": args.threads, "rows": rows}
    print(f"host estimate for Gemma 3 270M q4_k_m calibrated on q8_0's run ({args.threads} threads)\n{table(result)}")
    write_results(NAME, result)


def table(result: dict) -> str:
    return markdown_table(["metric", "estimated", "measured", "estimate / measured"], [
        [r["metric"], f"{r['estimated']:.1f}", f"{r['measured']:.1f}", f"{r['ratio']:.2f}"] for r in result["rows"]])


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
