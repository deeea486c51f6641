"""GGUF quantization time: `quantkit convert` against calling llama.cpp's quantizer directly
(`llama_model_quantize` through llama-cpp-python, what `llama-quantize` runs), same input, same
threads, side by side in one run: wall time and peak RSS of each, median and spread.

    python benchmarks/quantize_gguf.py [--types q4_k_m,q8_0] [--repeats 3] [--threads N] [--quick]

The input is the embedded Gemma 3 270M written once to an F32 GGUF by quantkit (cached under
out/bench). quantkit's figure is the whole command: process start, reading the source, the same
llama.cpp call, and hashing the output for the manifest (verification off, as llama-quantize
does none). Each run is a fresh subprocess; peak RSS is the child's own high-water mark. Prints a
table; writes benchmarks/results/quantize_gguf.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import markdown_table, measure, spread, timing, write_results  # noqa: E402

NAME = "quantize_gguf"
QK, DIRECT = "quantkit convert", "llama.cpp llama_model_quantize"

_DIRECT = """
import ctypes, sys, llama_cpp
from quantkit.formats.gguf.quantize import QUANT_SCHEMES
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(QUANT_SCHEMES[sys.argv[3]])
params.nthread = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q4_k_m,q8_0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="one type (q8_0), two repeats")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    args = ap.parse_args()
    types = ["q8_0"] if args.quick else args.types.split(",")
    repeats = 2 if args.quick else args.repeats
    quantkit = str(Path(sys.executable).with_name("quantkit"))

    f32_dir = args.out / "gemma-3-270m-f32"
    if not (f32_dir / "manifest.json").is_file():
        subprocess.run([quantkit, "-q", "convert", "--to", "gguf:f32", "--no-verify", "-o", str(args.out)], check=True)
    source = next(f32_dir.glob("*.gguf"))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        for qtype in types:
            runs: dict[str, list[tuple[float, int]]] = {QK: [], DIRECT: []}
            for i in range(repeats):  # interleaved, so drift in the machine hits both alike
                runs[QK].append(measure([quantkit, "-q", "convert", str(source), "--to", f"gguf:{qtype}",
                                                         "--no-verify", "--threads", str(args.threads), "-o", f"{work}/qk{i}"], REPO))
                runs[DIRECT].append(measure([sys.executable, "-c", _DIRECT, str(source),
                                                                       f"{work}/direct-{qtype}-{i}.gguf", qtype, str(args.threads)], REPO))
            for tool, values in runs.items():
                rows.append({"type": qtype, "tool": tool, "wall_s": spread([v[0] for v in values]),
                             "peak_rss_bytes": spread([v[1] for v in values])})
    result = {"source": source.name, "source_bytes": source.stat().st_size, "threads": args.threads, "repeats": repeats, "rows": rows}
    print(f"\nGGUF quantization, median (min-max) of {repeats} fresh processes\n{table(result)}")
    write_results(NAME, result)


def table(result: dict) -> str:
    rows = []
    for qtype in dict.fromkeys(r["type"] for r in result["rows"]):
        qk, direct = (next(r for r in result["rows"] if r["type"] == qtype and r["tool"] == t) for t in (QK, DIRECT))
        rows.append([qtype, timing(qk["wall_s"]), timing(direct["wall_s"]), f"{qk['wall_s']['median'] / direct['wall_s']['median']:.2f}x",
                     f"{qk['peak_rss_bytes']['median'] / 1e6:,.0f} / {direct['peak_rss_bytes']['median'] / 1e6:,.0f} MB"])
    return markdown_table(["type", "quantkit convert", "llama.cpp quantizer", "ratio", "peak RSS (both)"], rows)


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
