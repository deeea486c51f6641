"""HF -> GGUF F16 conversion: quantkit's streaming writer against llama.cpp's own
`convert_hf_to_gguf.py` and against a plain copy of the weights (the disk's limit), on the same
checkpoint, side by side in one run: wall time and peak RSS, median and spread of fresh processes.

    python benchmarks/convert_f16.py [--repeats 3] [--quick]

The shared checkpoint is a Llama with random float16 weights (12 layers of width 1024, ~270 MB)
and a SentencePiece tokenizer trained on ../shared/data, which both converters accept. The
embedded Gemma 3 270M, which only quantkit converts (its tokenizer is rebuilt from a GGUF), is
timed as well. `convert_hf_to_gguf.py` comes from the llama-cpp-python source distribution of the
installed version (`pip download --no-binary :all: --no-deps`), unpacked under out/bench, never
committed. Prints a table; writes benchmarks/results/convert_f16.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import llama_cpp_sdist, markdown_table, measure, spread, timing, write_results  # noqa: E402
from _models import random_llama  # noqa: E402

NAME = "convert_f16"


def llama_cpp_converter(work: Path) -> Path:
    """convert_hf_to_gguf.py (and its gguf-py) from the installed llama-cpp-python's sdist."""
    root = work / f"llama-cpp-python-{version('llama-cpp-python')}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tarfile.open(llama_cpp_sdist(work)) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   (m.name.endswith("convert_hf_to_gguf.py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        tar.extractall(work / "extract", members=members, filter="data")
    shutil.move(str(next((work / "extract").iterdir())), root)
    return script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 layers (~100 MB), two repeats, no Gemma")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    args.out.mkdir(parents=True, exist_ok=True)
    quantkit = str(Path(sys.executable).with_name("quantkit"))
    script = llama_cpp_converter(args.out)
    source = random_llama(args.out, 4 if args.quick else 12)
    weights = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        tools = {
            "plain copy of the weights": lambda i: ["cp", *map(str, source.glob("*.safetensors")), f"{work}/copy{i}"],
            "quantkit convert --to gguf:f16": lambda i: [quantkit, "-q", "convert", str(source), "--to", "gguf:f16", "--no-verify", "-o", f"{work}/qk{i}"],
            "llama.cpp convert_hf_to_gguf.py": lambda i: [sys.executable, str(script), str(source), "--outtype", "f16", "--outfile", f"{work}/lc{i}.gguf"],
        }
        runs: dict[str, list[tuple[float, int]]] = {t: [] for t in tools}
        for i in range(repeats):  # interleaved: drift in the machine hits every tool alike
            os.makedirs(f"{work}/copy{i}")
            for tool, cmd in tools.items():
                runs[tool].append(measure(cmd(i), REPO))
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work, exist_ok=True)
        for tool, values in runs.items():
            rows.append({"model": source.name, "tool": tool, "wall_s": spread([v[0] for v in values]),
                         "peak_rss_bytes": spread([v[1] for v in values]), "weights_bytes": weights})
        if not args.quick:  # only quantkit converts the embedded Gemma (tokenizer rebuilt from GGUF)
            gemma = [measure([quantkit, "-q", "convert", "--to", "gguf:f16", "--no-verify", "-o", f"{work}/g{i}"], REPO) for i in range(repeats)]
            rows.append({"model": "gemma-3-270m (embedded, float32 checkpoint)", "tool": "quantkit convert --to gguf:f16",
                         "wall_s": spread([v[0] for v in gemma]), "peak_rss_bytes": spread([v[1] for v in gemma]),
                         "weights_bytes": None})
    result = {"repeats": repeats, "converter": str(script.relative_to(args.out)), "rows": rows}
    print(f"\nHF -> GGUF F16, median (min-max) of {repeats} fresh processes\n{table(result)}")
    write_results(NAME, result)


def table(result: dict) -> str:
    return markdown_table(["model", "tool", "wall", "peak RSS"], [
        [r["model"], r["tool"], timing(r["wall_s"]), f"{r['peak_rss_bytes']['median'] / 1e6:,.0f} MB"] for r in result["rows"]])


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
