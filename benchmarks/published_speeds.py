"""Hardware estimates against published measurements: every llama.cpp speed collected in
`profiles/*.yaml` (`measurements:`, each with its source), next to quantkit's estimate for that
model on that profile — calibrated on all of the profile's points (what `quantkit profile
--profile NAME` uses), and leave-one-out (calibrated on the others only).

    python benchmarks/published_speeds.py

No model is run: the estimates need only the points' sizes and the profiles. Prints tables;
writes benchmarks/results/published_speeds.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import markdown_table, write_results  # noqa: E402

from quantkit.hardware import load_profile_file, profile_files  # noqa: E402
from quantkit.hardware.published import (  # noqa: E402
    compute_dtype_of,
    leave_one_out,
    point_work,
    published_models,
)

NAME = "published_speeds"


def main() -> None:
    profiles = [load_profile_file(p) for p in profile_files().values()]
    points = []
    for profile in profiles:
        for m in profile.measurements:
            models = published_models(profile, m.runtime, m.backend, compute_dtype_of(m.quant, profile), m.quant)
            work = point_work(m, profile)
            row = {"profile": profile.name, "model": m.model, "quant": m.quant, "backend": m.backend, "source": m.source,
                   "date": m.date, "note": m.note}
            for metric, published in (("decode", m.gen_tokens_per_s), ("prefill", m.prompt_tokens_per_s)):
                if published and metric in models:
                    row[metric] = {"published": published, "estimated": models[metric].tokens_per_s(work[metric]),
                                   "efficiency": models[metric].efficiency, "overhead_s": models[metric].overhead_s}
            points.append(row)
    loo = leave_one_out(profiles)
    result = {"points": points, "leave_one_out": loo,
              "uncalibrated": [p.name for p in profiles if not p.measurements]}
    print(f"published measurements and estimates\n{table(result)}\nleave-one-out\n{loo_table(result)}")
    write_results(NAME, result)


def _pair(cell: dict | None) -> str:
    return "-" if not cell else f"{cell['published']:,.1f} / {cell['estimated']:,.1f}"


def table(result: dict) -> str:
    body = [[r["profile"], r["model"], r["quant"], r["backend"], _pair(r.get("prefill")), _pair(r.get("decode")),
             f"[source]({r['source']})"] for r in result["points"]]
    text = markdown_table(["profile", "model", "quant", "backend", "prompt tok/s published / estimated",
                           "generation tok/s published / estimated", "source"], body)
    return text + f"\nno published measurement collected (estimates calibrated on this host): {', '.join(result['uncalibrated'])}\n"


def loo_table(result: dict) -> str:
    rows = result["leave_one_out"]
    body = [[r["profile"], r["model"], r["quant"], r["metric"], f"{r['published']:,.1f}", f"{r['estimated']:,.1f}",
             f"{r['ratio']:.2f}", f"{r['calibrated_on']} ({r['points']})"] for r in rows]
    inside = sum(0.5 <= r["ratio"] <= 2.0 for r in rows)
    return markdown_table(["profile", "model", "quant", "speed", "published", "estimated", "ratio", "calibrated on"], body) + \
        f"\n{inside} of {len(rows)} within 2x\n"


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result), "loo": loo_table(result)}


if __name__ == "__main__":
    main()
