"""Memory and time of every conversion path on models of the size people ship: peak RSS against
parameter count, measured next to quantkit's own prediction (``quantkit convert --dry-run``).

    python benchmarks/scale.py [--full] [--shapes NAME,...] [--paths gguf,profile,...]

Checkpoints with the real shapes of Qwen2.5-0.5B, DeepSeek-R1-Distill-Qwen-1.5B and Qwen2.5-3B
(``--full``: Llama-3.1-8B too, 16 GB on disk) and random float16 weights, generated tensor by
tensor with a fixed seed under out/bench/scale (``_models.random_shaped``). For each, in fresh
processes: ``convert --to gguf:q4_k_m`` (verification on), ``profile --chunks 1`` of that GGUF,
``convert --to gptq:w4g128-rtn``, ``convert --to gptq:w4g128 --calib-samples 8 --calib-seqlen
256`` and ``convert --to onnx:int4`` (quantkit's streamed RTN checkpoint, then onnxruntime-genai's
builder on it): wall time, peak RSS (the largest process of the run) and the
predicted peak. Prints a table and the slope of each path (MB of peak per billion parameters,
over the dense shapes); writes benchmarks/results/scale.json and, from it,
benchmarks/results/scale_peak_rss.svg. Each shape's GGUF is kept under out/bench/scale/gguf for
``--repredict`` (the profile's prediction reads the file; 8.3 GB with ``--full``); ``--merge FILE`` puts the rows of
another run's results file in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import machine, markdown_table, measure, write_results  # noqa: E402
from _models import SHAPES, random_shaped, shaped_folder  # noqa: E402

NAME = "scale"
PLOT = "scale_peak_rss.svg"
DEFAULT_SHAPES = ("qwen2.5-0.5b", "deepseek-r1-distill-qwen-1.5b", "qwen2.5-3b")
# path -> (recipe, extra CLI arguments); "profile" profiles the gguf path's artifact
PATHS = {
    # the rows were measured before the importance matrix became q4_k_m's default: kept plain
    "gguf": ("gguf:q4_k_m+noimatrix", []),
    "profile": (None, ["--chunks", "1"]),
    "rtn": ("gptq:w4g128-rtn", []),
    "gptq": ("gptq:w4g128", ["--calib-samples", "8", "--calib-seqlen", "256"]),
    "onnx": ("onnx:int4", []),
}
LABELS = {"gguf": "convert gguf:q4_k_m+noimatrix (verified)", "profile": "profile --chunks 1", "rtn": "convert gptq:w4g128-rtn",
          "gptq": "convert gptq:w4g128 (8x256 calibration)", "onnx": "convert onnx:int4 (RTN checkpoint, builder)"}


def _artifact_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json")


def _predicted(path: str, source, gguf_file: Path | None) -> dict:
    """quantkit's predicted peak for ``path`` on ``source`` (the profile path: of ``gguf_file``)."""
    from quantkit.footprint import predict_convert_peak, predict_profile_peak
    from quantkit.recipe import parse_recipe

    if path == "profile":
        return predict_profile_peak(gguf_file, source, chunks=1)
    options = {"calib_samples": 8, "calib_seqlen": 256} if path == "gptq" else {}
    return predict_convert_peak(source, parse_recipe(PATHS[path][0], options))


def run_shape(name: str, paths: list[str], work: Path) -> list[dict]:
    from quantkit.profile.run import locate_artifact
    from quantkit.source import resolve_source

    quantkit = str(Path(sys.executable).with_name("quantkit"))
    source_dir = random_shaped(work, name)
    source = resolve_source(str(source_dir))
    params = sum(math.prod(t.shape) for t in source.tensors.values())
    weights = sum(f.stat().st_size for f in source_dir.glob("*.safetensors"))
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    rows, gguf_artifact, kept = [], None, _kept_gguf(work, name)
    for path in paths:
        recipe, extra = PATHS[path]
        if path == "profile":
            if "gguf" not in paths and (kept / "manifest.json").is_file():
                gguf_artifact = kept  # the gguf path's artifact of an earlier run of this shape
                print(f"{name}: profiling the GGUF kept by an earlier run, {kept}", flush=True)
            if gguf_artifact is None:
                raise SystemExit("the profile path needs the gguf path first (--paths gguf,profile,...) or its kept artifact")
            cmd = [quantkit, "-q", "profile", str(gguf_artifact), *extra, "--json", str(out / "profile.json")]
        else:
            cmd = [quantkit, "-q", "convert", str(source_dir), "--to", recipe, *extra, "-o", str(out)]
        predicted = _predicted(path, source, locate_artifact(gguf_artifact)[1] if path == "profile" else None)
        print(f"{name}: {LABELS[path]} ...", flush=True)
        before = set(out.iterdir()) if out.is_dir() else set()
        row = {"shape": name, "params": params, "weights_bytes": weights, "path": path, "machine": machine(),
               "date": time.strftime("%Y-%m-%d"), "predicted_peak_bytes": predicted["total_bytes"],
               "predicted_terms": predicted["terms"]}
        try:
            wall, peak = measure(cmd, REPO)
        except SystemExit as exc:  # recorded, and the other paths still run
            print(f"  failed: {exc}", flush=True)
            rows.append({**row, "failed": str(exc)[-400:]})
            continue
        folder = None
        if recipe:
            [folder] = [p for p in set(out.iterdir()) - before if (p / "manifest.json").is_file()]
            if path == "gguf":
                gguf_artifact = folder
        # what the path's runtime maps or holds of the artifact it runs (verification, profile)
        artifact = _artifact_bytes(folder or gguf_artifact)
        print(f"  {wall:.0f} s, peak {peak / 1e6:,.0f} MB, predicted {predicted['total_bytes'] / 1e6:,.0f} MB", flush=True)
        rows.append({**row, "wall_s": wall, "peak_rss_bytes": peak, "artifact_bytes": artifact})
        if folder is not None and path != "gguf":  # the disk is needed for the next paths
            shutil.rmtree(folder, ignore_errors=True)
    if gguf_artifact not in (None, kept):  # kept for --repredict: the profile's prediction reads the file
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        gguf_artifact.rename(kept)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def _kept_gguf(work: Path, shape: str) -> Path:
    """Where a shape's gguf path artifact is kept after its run."""
    return work / "gguf" / shape


def _fit(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def repredict(work: Path) -> None:
    from quantkit.profile.run import locate_artifact
    from quantkit.source import resolve_source

    path = Path(os.environ.get("QUANTKIT_BENCH_RESULTS", REPO / "benchmarks" / "results")) / f"{NAME}.json"
    result = json.loads(path.read_text())
    for r in result["rows"]:
        folder, kept = shaped_folder(work, r["shape"]), _kept_gguf(work, r["shape"])
        if not (folder / "config.json").is_file():
            print(f"{r['shape']}: no checkpoint under {work}; its predictions are left as they were")
            continue
        if r["path"] == "profile" and not (kept / "manifest.json").is_file():
            print(f"{r['shape']}: no GGUF kept under {kept}; its profile prediction is left as it was")
            continue
        predicted = _predicted(r["path"], resolve_source(str(folder)), locate_artifact(kept)[1] if r["path"] == "profile" else None)
        r["predicted_peak_bytes"], r["predicted_terms"] = predicted["total_bytes"], predicted["terms"]
    result = {k: v for k, v in result.items() if k not in ("benchmark", "machine", "date")}
    write_results(NAME, result)
    print(table(result))


def slopes(result: dict) -> dict[str, dict[str, float]]:
    """Least-squares slope of peak RSS (and of peak minus the artifact a path maps) against
    parameters, MB per billion parameters, per path, over the dense shapes (a mixture of
    experts' block is far larger for its parameter count: its rows are read on their own)."""
    out = {}
    for path in PATHS:
        rows = [r for r in result["rows"] if r["path"] == path and "failed" not in r
                and "num_experts" not in SHAPES[r["shape"]]]
        if len(rows) < 2:
            continue
        xs = [r["params"] / 1e9 for r in rows]
        beyond = [(r["peak_rss_bytes"] - (r["artifact_bytes"] or 0)) / 1e6 for r in rows]
        out[path] = {"mb_per_billion": _fit(xs, [r["peak_rss_bytes"] / 1e6 for r in rows]),
                     "beyond_artifact_mb_per_billion": _fit(xs, beyond)}
    return out


def table(result: dict) -> str:
    lines = []
    for r in result["rows"]:
        if "failed" in r:
            lines.append([r["shape"], f"{r['params'] / 1e9:.2f}B", LABELS[r["path"]], "failed", "-",
                          f"{r['predicted_peak_bytes'] / 1e6:,.0f} MB", r["failed"].splitlines()[-1][:110], _host(r)])
            continue
        error = 100 * (r["predicted_peak_bytes"] - r["peak_rss_bytes"]) / r["peak_rss_bytes"]
        lines.append([r["shape"], f"{r['params'] / 1e9:.2f}B", LABELS[r["path"]], f"{r['wall_s']:,.0f} s",
                      f"{r['peak_rss_bytes'] / 1e6:,.0f} MB", f"{r['predicted_peak_bytes'] / 1e6:,.0f} MB ({error:+.0f} %)",
                      f"{r['artifact_bytes'] / 1e6:,.0f} MB" if r.get("artifact_bytes") else "-", _host(r)])
    return markdown_table(["model shape", "parameters", "path", "wall", "peak RSS", "predicted peak", "artifact", "host, date"], lines)


def _host(row: dict) -> str:
    """Which machine measured a row (rows are merged across runs): its CPU's name, the date."""
    return f"{row.get('machine', '?').split(',')[0].replace('(R)', '')}, {row.get('date', '?')}"


def slope_table(result: dict) -> str:
    return markdown_table(["path", "peak MB per billion parameters", "beyond the artifact it runs"], [
        [LABELS[p], f"{s['mb_per_billion']:,.0f}", f"{s['beyond_artifact_mb_per_billion']:,.0f}"] for p, s in slopes(result).items()])


def plot(result: dict) -> str:
    from quantkit.report.svg import grouped_bars

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    params = {r["shape"]: r["params"] for r in result["rows"]}
    series = {LABELS[p]: [next((r["peak_rss_bytes"] / 1e9 for r in result["rows"]
                                if r["shape"] == s and r["path"] == p and "failed" not in r), None)
                          for s in shapes] for p in PATHS if any(r["path"] == p for r in result["rows"])}
    groups = [f"{s} ({params[s] / 1e9:.1f}B)" for s in shapes]
    svg = grouped_bars(groups, series, svg_id="scale-peak-rss", title="Peak RSS of each path against model size",
                       ylabel="peak RSS (GB)")
    return svg.replace('role="img">', 'role="img"><rect width="100%" height="100%" fill="white"/>', 1) + "\n"


def _merge(kept: list[dict], new: list[dict], results_dir: Path) -> dict:
    """``kept`` rows with those of ``new`` put in (a shape's path replaced), written with the
    slopes and the plot."""
    done = {(r["shape"], r["path"]) for r in new}
    rows = sorted([r for r in kept if (r["shape"], r["path"]) not in done] + new,
                  key=lambda r: (list(SHAPES).index(r["shape"]), list(PATHS).index(r["path"])))
    result = {"rows": rows, "cpu_count": os.cpu_count()}
    result["slopes"] = slopes(result)
    write_results(NAME, result)
    (results_dir / PLOT).write_text(plot(result), encoding="utf-8")
    return result


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result), "slopes": slope_table(result)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="add Llama-3.1-8B's shape (16 GB on disk)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {', '.join(SHAPES)}; merged into the "
                    "existing results (their rows replaced)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)} (profile without gguf profiles the GGUF an earlier "
                    "run of the shape kept)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "scale")
    ap.add_argument("--merge", type=Path, default=None, help="merge the rows of another results file of this "
                    "benchmark into the existing results (their shape's path replaced); measure nothing")
    ap.add_argument("--repredict", action="store_true", help="recompute the predicted peaks of the existing results "
                    "with the current memory model (the checkpoints must still be under --out); measure nothing")
    args = ap.parse_args()
    if args.merge and not args.merge.is_file():
        raise SystemExit(f"{args.merge}: no such results file")
    if args.repredict:
        return repredict(args.out)
    shapes = args.shapes.split(",") if args.shapes else [*DEFAULT_SHAPES, *(["llama-3.1-8b"] if args.full else [])]
    paths = args.paths.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results_dir = Path(os.environ.get("QUANTKIT_BENCH_RESULTS", REPO / "benchmarks" / "results"))
    existing = results_dir / f"{NAME}.json"
    # with --shapes, the other shapes' rows are kept; the results are written after each shape,
    # so a run cut short keeps what it measured
    kept = json.loads(existing.read_text())["rows"] if (args.shapes or args.merge) and existing.is_file() else []
    if args.merge:  # rows measured by another run of this script (e.g. with $QUANTKIT_BENCH_RESULTS elsewhere)
        result = _merge(kept, json.loads(args.merge.read_text())["rows"], results_dir)
    else:
        for name in shapes:
            result = _merge(kept, run_shape(name, paths, args.out), results_dir)
            kept = result["rows"]
    print(f"\n{table(result)}\n\n{slope_table(result)}")
    print(json.dumps(result["slopes"], indent=1))


if __name__ == "__main__":
    main()
