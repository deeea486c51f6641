"""Every recipe on Gemma 3 270M, converted and profiled the way a user would: benchmarks 3 (GPTQ
against its RTN baseline and bitsandbytes nf4: time, peak memory, KLD), 4 (ONNX int8/int4
against fp32 ONNX and GGUF q8_0/q4_k_m/q4_0: decode, prefill, memory, KLD) and 5 (decode speed as a
fraction of the host's memory-bandwidth roofline), and the size-against-KLD plot of all recipes.

    python benchmarks/gemma_recipes.py [--chunks 1] [--threads N] [--recipes R,R...] [--quick]

Each conversion group (`GROUPS`) runs as one `quantkit convert --no-verify` in a fresh process
(wall time and the process's peak RSS); recipes that share an intermediate (all GGUF types share
one F32 file, all ONNX types one float32 export) are converted together, so their time is the
group's. GPTQ, its RTN baseline and each bitsandbytes scheme are converted alone, so their times
are their own (bitsandbytes writes only a config: it quantizes when the model is loaded, which the
profile's peak RSS includes). Each artifact is then profiled by `quantkit profile --chunks N` in
a fresh process: KLD/top-1/perplexity against the float32 source on the en/zh/code texts, latency
(128-token prompt, 32 generated tokens), peak RSS and the roofline. The reference is the embedded
checkpoint, itself a dequantised Q4_K_M, which flatters q4_k_m and q8_0.

--recipes runs a subset and merges it into the existing results file. --quick runs a few recipes
on a random Llama (2 layers of width 256) instead of Gemma, in a few minutes.
Prints tables; writes benchmarks/results/gemma_recipes.json and gemma_size_vs_kld.svg.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import cold_cache, markdown_table, measure, results_dir, write_results  # noqa: E402
from _models import random_llama  # noqa: E402

NAME = "gemma_recipes"
PLOT = "gemma_size_vs_kld.svg"
PLOT_LEFT_OUT = ("onnx:fp32",)
# conversion groups, converted in this order (a group is one `quantkit convert` process)
GROUPS: tuple[tuple[str, ...], ...] = (
    # below 5 bits GGUF types carry quantkit's importance matrix by default, but q4_0 (llama.cpp's plain round
    # to nearest, the like of onnx:int4; q4_0+imatrix beside it)
    ("gguf:f16", "gguf:q8_0", "gguf:q6_k", "gguf:q5_k_m", "gguf:q4_k_m", "gguf:q4_0", "gguf:q4_0+imatrix", "gguf:q3_k_m",
     "gguf:q2_k"),
    # ONNX decoders: each built by onnxruntime-genai's builder on its own (no shared export)
    ("onnx:fp32",), ("onnx:int8",), ("onnx:int4",), ("onnx:int4-kquant",), ("onnx:int4-gptq",),
    ("gptq:w4g128",),
    ("gptq:w4g128-rtn",),
    ("bnb:int8",),
    ("bnb:nf4",),
)
QUICK_GROUPS: tuple[tuple[str, ...], ...] = (
    ("gguf:q8_0", "gguf:q4_k_m"), ("onnx:fp32", "onnx:int8", "onnx:int4"), ("gptq:w4g128",), ("gptq:w4g128-rtn",), ("bnb:nf4",),
)
GPTQ_SET = ("gptq:w4g128", "gptq:w4g128-rtn", "bnb:nf4")
ONNX_SET = ("onnx:fp32", "onnx:int8", "onnx:int4", "onnx:int4-kquant", "onnx:int4-gptq", "gguf:q8_0", "gguf:q4_k_m", "gguf:q4_0",
            "gguf:q4_0+imatrix")


def _artifacts(folder: Path) -> dict[str, Path]:
    """recipe label -> artifact folder, read from the manifests under ``folder``."""
    found = {}
    for manifest in folder.glob("*/manifest.json"):
        recipe = json.loads(manifest.read_text())["recipe"]
        found[f"{recipe['format']}:{recipe['scheme']}"] = manifest.parent
    return found


def _row(recipe: str, group: tuple[str, ...], convert: tuple[float, int], report: dict, report_path: Path) -> dict:
    q, lat, mem, host = report["quality"], report["latency"], report["memory"], report["host"]
    weights = mem["file_bytes"] if report["artifact"]["format"] != "bnb" else mem["predicted_terms"]["tensor_bytes"]
    return {
        "recipe": recipe,
        "runtime": report["artifact"]["runtime"],
        "file_bytes": mem["file_bytes"],
        "weights_bytes": weights,
        "weights_in": "memory (quantized at load)" if report["artifact"]["format"] == "bnb" else "file",
        "convert": {"wall_s": convert[0], "peak_rss_bytes": convert[1], "group": list(group)},
        "kld_mean": q["kld_mean"], "kld_p99": q["kld_p99"], "top1_agreement": q["top1_agreement"],
        "ppl_delta_pct": q["ppl_delta_pct"], "tokens": q["tokens"],
        "domains_kld_mean": {d: v["kld_mean"] for d, v in q["domains"].items()},
        "decode_tokens_per_s": lat["decode_tokens_per_s"]["median"],
        "prefill_tokens_per_s": lat["prefill_tokens_per_s"]["median"],
        "ttft_s": lat["ttft_s"]["median"],
        "peak_rss_bytes": mem["peak_rss_bytes"], "predicted_peak_bytes": mem["predicted_peak_bytes"],
        "bytes_read_per_token": host["bytes_read_per_token"],
        "roofline_tokens_per_s": host["decode_roofline_tokens_per_s"],
        "roofline_fraction": host["decode_roofline_fraction"],
        "report": str(report_path.relative_to(REPO)) if report_path.is_relative_to(REPO) else str(report_path),
    }


def run_group(group: tuple[str, ...], source: list[str], work: Path, chunks: int, threads: int) -> list[dict]:
    quantkit = str(Path(sys.executable).with_name("quantkit"))
    folder = work / "-".join(r.replace(":", "_") for r in group)[:80]
    shutil.rmtree(folder, ignore_errors=True)
    print(f"converting {', '.join(group)} ...", flush=True)
    with cold_cache(("imatrix",), work):  # a conversion's time includes its importance matrix, as a first run's
        converted = measure([quantkit, "-q", "convert", *source, *(a for r in group for a in ("--to", r)), "--no-verify",
                             "--threads", str(threads), "-o", str(folder)], REPO)
    print(f"  {converted[0]:.1f} s, peak RSS {converted[1] / 1e6:,.0f} MB", flush=True)
    paths = _artifacts(folder)
    rows = []
    for recipe in group:
        report_path = work / "reports" / f"{recipe.replace(':', '_')}.json"
        report_path.parent.mkdir(parents=True, exist_ok=True)
        wall, _ = measure([quantkit, "-q", "profile", str(paths[recipe]), "--chunks", str(chunks), "--threads", str(threads),
                           "--json", str(report_path)], REPO)
        rows.append(_row(recipe, group, converted, json.loads(report_path.read_text()), report_path))
        r = rows[-1]
        print(f"  profiled {recipe} in {wall:.0f} s: kld {r['kld_mean']:.4f}, decode {r['decode_tokens_per_s']:.1f} tok/s", flush=True)
    return rows


# ---------------------------------------------------------------- tables (printed and put in the README)

def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _kld(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}"


def _rows(result: dict, recipes: tuple[str, ...] | None = None) -> list[dict]:
    by = {r["recipe"]: r for r in result["rows"]}
    return [by[r] for r in recipes if r in by] if recipes else sorted(by.values(), key=lambda r: r["weights_bytes"])


def gptq_table(result: dict) -> str:
    rows = []
    for r in _rows(result, GPTQ_SET):
        c = r["convert"]
        rows.append([f"`{r['recipe']}`", f"{c['wall_s']:.1f} s", _mb(c["peak_rss_bytes"]), _mb(r["weights_bytes"]),
                     _kld(r["kld_mean"]), f"{r['top1_agreement']:.3f}", f"{r['ppl_delta_pct']:+.1f}%",
                     f"{r['decode_tokens_per_s']:.1f}", _mb(r["peak_rss_bytes"])])
    table = markdown_table(["recipe", "convert wall", "convert peak RSS", "weights", "KLD mean", "top-1", "ppl Δ",
                            "decode tok/s", "runtime peak RSS"], rows)
    by = {r["recipe"]: r for r in result["rows"]}
    if all(r in by for r in GPTQ_SET):
        g, rtn, nf4 = (by[r] for r in GPTQ_SET)
        table += (f"\nGPTQ's KLD is {g['kld_mean'] / rtn['kld_mean']:.2f}x RTN's on the same grid, for "
                  f"{g['convert']['wall_s'] / rtn['convert']['wall_s']:.0f}x its conversion time; bitsandbytes nf4's KLD is "
                  f"{nf4['kld_mean'] / g['kld_mean']:.2f}x GPTQ's, with {nf4['weights_bytes'] / g['weights_bytes']:.2f}x the weight bytes.\n")
    return table


def onnx_table(result: dict) -> str:
    rows = [[f"`{r['recipe']}`", r["runtime"], _mb(r["file_bytes"]), f"{r['decode_tokens_per_s']:.1f}",
             f"{r['prefill_tokens_per_s']:,.0f}", f"{r['ttft_s'] * 1000:.0f} ms", _mb(r["peak_rss_bytes"]),
             _kld(r["kld_mean"]), f"{r['top1_agreement']:.3f}"] for r in _rows(result, ONNX_SET)]
    table = markdown_table(["recipe", "runtime", "file", "decode tok/s", "prefill tok/s", "TTFT", "peak RSS", "KLD mean", "top-1"], rows)
    by = {r["recipe"]: r for r in result["rows"]}
    groups = {tuple(r["convert"]["group"]): r["convert"] for r in _rows(result, ONNX_SET) if len(r["convert"]["group"]) > 1}
    for group, c in groups.items():
        table += (f"\nConverting {', '.join(f'`{g}`' for g in group)} together (one process): "
                  f"{c['wall_s']:.0f} s, peak RSS {c['peak_rss_bytes'] / 1e6:,.0f} MB.\n")
    onnx = [r for r in _rows(result, ONNX_SET) if r["recipe"].startswith("onnx:")]
    if onnx:
        table += "\nConverting (one process each): " + "; ".join(
            f"`{r['recipe']}` {r['convert']['wall_s']:.0f} s, peak RSS {r['convert']['peak_rss_bytes'] / 1e6:,.0f} MB"
            for r in onnx) + ".\n"
    # like for like: 8-bit against Q8_0, 4-bit round-to-nearest blocks of 32 against Q4_0
    if "onnx:int4-gptq" in by and "onnx:int4" in by:
        table += (f"\n`onnx:int4-gptq` (quantkit's GPTQ checkpoint in `MatMulNBits`) has {by['onnx:int4-gptq']['kld_mean'] / by['onnx:int4']['kld_mean']:.2f}x "
                  "the KLD of the round-to-nearest `onnx:int4` (quantkit's RTN checkpoint in the same operators).\n")
    for onnx, gguf in (("onnx:int8", "gguf:q8_0"), ("onnx:int4", "gguf:q4_0")):
        if onnx in by and gguf in by:
            a, b = by[onnx], by[gguf]
            table += (f"\n`{onnx}` against `{gguf}`: decode {a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x, "
                      f"prefill {a['prefill_tokens_per_s'] / b['prefill_tokens_per_s']:.2f}x, peak RSS "
                      f"{a['peak_rss_bytes'] / b['peak_rss_bytes']:.1f}x, KLD {a['kld_mean'] / b['kld_mean']:.3g}x.\n")
    return table


def roofline_table(result: dict) -> str:
    rows = [[f"`{r['recipe']}`", r["runtime"], _mb(r["bytes_read_per_token"]), f"{r['roofline_tokens_per_s']:.1f}",
             f"{r['decode_tokens_per_s']:.1f}", f"{r['roofline_fraction']:.2f}"]
            for r in sorted(result["rows"], key=lambda r: -r["roofline_fraction"])]
    return markdown_table(["recipe", "runtime", "bytes read per token", "roofline tok/s", "decode tok/s", "fraction"], rows)


def profile_table(result: dict) -> str:
    """What `quantkit profile` reports for each artifact, with the memory prediction's error."""
    rows = []
    for r in result["rows"]:
        err = (r["predicted_peak_bytes"] - r["peak_rss_bytes"]) / r["peak_rss_bytes"] * 100
        files = _mb(r["file_bytes"]) if r["weights_in"] == "file" else "(config)"
        rows.append([f"`{r['recipe']}`", files, _kld(r["kld_mean"]), f"{r['top1_agreement']:.3f}",
                     f"{r['ppl_delta_pct']:+.1f}%", f"{r['decode_tokens_per_s']:.1f} ({r['roofline_fraction']:.2f})",
                     f"{r['peak_rss_bytes'] / 1e6:,.0f} MB", f"{r['predicted_peak_bytes'] / 1e6:,.0f} MB ({err:+.1f}%)"])
    return markdown_table(["artifact", "files", "KLD mean", "top-1", "ppl Δ", "decode tok/s (roofline fraction)", "peak RSS",
                           "predicted"], rows)


def pareto(result: dict) -> list[str]:
    from quantkit.report.gate_render import pareto_front

    return pareto_front([(r["recipe"], r["weights_bytes"], r["kld_mean"]) for r in result["rows"]])


def all_table(result: dict) -> str:
    front = set(pareto(result))
    rows = [[f"`{r['recipe']}`" + (" ★" if r["recipe"] in front else ""), _mb(r["weights_bytes"]) + (" (in memory)" if r["weights_in"] != "file" else ""),
             _kld(r["kld_mean"]), _kld(r["kld_p99"]), f"{r['top1_agreement']:.3f}", f"{r['ppl_delta_pct']:+.1f}%",
             " / ".join(_kld(r["domains_kld_mean"][d]) for d in sorted(r["domains_kld_mean"]))]
            for r in _rows(result)]
    domains = "/".join(sorted(result["rows"][0]["domains_kld_mean"])) if result["rows"] else ""
    return markdown_table(["recipe (★ Pareto front)", "weights", "KLD mean", "KLD p99", "top-1", "ppl Δ", f"KLD {domains}"], rows)


def plot(result: dict) -> str:
    from quantkit.report.svg import scatter

    # the float32 ONNX export is the unquantized baseline, several times larger than the rest: left
    # out so the quantized recipes are not squeezed into the left edge (it is in the table)
    points = [(r["recipe"], r["weights_bytes"] / 1e6, r["kld_mean"]) for r in result["rows"] if r["recipe"] not in PLOT_LEFT_OUT]
    svg = scatter(points, [p for p in pareto(result) if p not in PLOT_LEFT_OUT], svg_id="gemma-size-vs-kld", title=f"{result['model']}: size against KLD (Pareto front in red)",
                  xlabel="weights (MB; bitsandbytes: in memory)", ylabel="KLD mean vs float32 (log)")
    # a white background so the chart reads on dark pages too
    return svg.replace('role="img">', 'role="img"><rect width="100%" height="100%" fill="white"/>', 1) + "\n"


def sections(result: dict) -> dict[str, str]:
    return {"gptq": gptq_table(result), "onnx": onnx_table(result), "roofline": roofline_table(result), "all": all_table(result),
            "profile": profile_table(result)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1, help="windows of 512 tokens per domain (en, zh, code)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--recipes", default=None, help="comma-separated subset, merged into the existing results")
    ap.add_argument("--quick", action="store_true", help="a random 2-layer Llama and 8 recipes")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "recipes")
    args = ap.parse_args()

    if args.quick:
        source_dir = random_llama(args.out.parent, layers=2, hidden=256)
        source, model, groups = [str(source_dir)], source_dir.name, QUICK_GROUPS
    else:
        source, model, groups = [], "gemma-3-270m (embedded)", GROUPS
    if args.recipes:
        wanted = set(args.recipes.split(","))
        unknown = wanted - {r for g in groups for r in g}
        if unknown:
            raise SystemExit(f"unknown recipes {sorted(unknown)}; this benchmark runs {[r for g in groups for r in g]}")
        groups = tuple(tuple(r for r in g if r in wanted) for g in groups if wanted & set(g))
    work = args.out / ("quick" if args.quick else "gemma")
    work.mkdir(parents=True, exist_ok=True)

    settings = {"model": model, "chunks": args.chunks, "ctx": 512, "threads": args.threads}
    previous = results_dir() / f"{NAME}.json"
    rows: dict[str, dict] = {}
    order = [r for g in (QUICK_GROUPS if args.quick else GROUPS) for r in g]
    if args.recipes and previous.is_file():
        old = json.loads(previous.read_text())
        differing = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if differing:
            raise SystemExit(f"{previous} was measured with other settings {differing}: run every recipe (no --recipes)")
        rows = {r["recipe"]: r for r in old["rows"] if r["recipe"] in order}
    start = time.perf_counter()
    for group in groups:
        for row in run_group(group, source, work, args.chunks, args.threads):
            rows[row["recipe"]] = row
        # written after every group, so an interrupted run keeps what it measured
        result = {**settings, "rows": sorted(rows.values(), key=lambda r: order.index(r["recipe"])), "wall_s": time.perf_counter() - start}
        write_results(NAME, result)
    (results_dir() / PLOT).write_text(plot(result))
    print(f"\n{model}, {args.chunks} window(s) of 512 per domain, {args.threads} threads; {time.perf_counter() - start:.0f} s in all")
    titles = {"gptq": "3. GPTQ vs RTN vs bitsandbytes nf4", "onnx": "4. ONNX vs GGUF", "roofline": "5. decode vs the roofline",
              "all": "every recipe, by size", "profile": "what quantkit profile reports, memory prediction included"}
    for key, text in sections(result).items():
        print(f"\n{titles[key]}\n{text}")


if __name__ == "__main__":
    main()
