"""GGUF quality with an importance matrix: llama.cpp's plain types, llama.cpp with its own
importance matrix (`llama-imatrix`), and quantkit's (`gguf:TYPE+imatrix`), side by side on
Gemma 3 270M: file size, bits per weight, KLD mean and p99, top-1 agreement and perplexity
change per domain (en, zh, code), and the time each took.

    python benchmarks/gguf_quality.py [--types q2_k,q3_k_m,iq3_xxs,iq2_xs] [--chunks 8] [--threads N]

llama.cpp's `llama-imatrix` and `llama-quantize` are built from the installed llama-cpp-python's
source distribution (`pip download --no-binary`, under out/bench, never committed; build time
reported). Both importance matrices come from one calibration file: quantkit's default
calibration mix (en, code, zh in its proportions, disjoint from the evaluation text), cut to
32 windows of 512 tokens' worth; `llama-imatrix` reads it in 32 chunks of 512, quantkit samples
32 windows of 512 from it (`--calib FILE`). Also checks that `llama-quantize --imatrix` accepts
the file quantkit wrote and gives the tensors quantkit's own call gave. The embedded Gemma is a
dequantised Q4_K_M, so types on that grid look nearly lossless against it: the types below 4
bits are the ones that tell. Writes benchmarks/results/gguf_quality.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

import gguf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import cached_embedded_artifact, llama_cpp_sdist, markdown_table, write_results  # noqa: E402

NAME = "gguf_quality"
SAMPLES, SEQLEN = 32, 512
LLAMA, LLAMA_IMATRIX, QUANTKIT = "llama.cpp", "llama.cpp + llama-imatrix", "quantkit +imatrix"


def llama_cpp_tools(work: Path, threads: int) -> tuple[dict[str, Path], float]:
    """llama-imatrix and llama-quantize built from the installed llama-cpp-python's sdist, and
    the seconds the build took (download, configure, compile; recorded beside a cached build)."""
    root = work / f"llama.cpp-{version('llama-cpp-python')}"
    tools = {name: root / "build" / "bin" / f"llama-{name}" for name in ("imatrix", "quantize")}
    took = root / "build" / "quantkit-build-seconds"
    if all(p.is_file() for p in tools.values()):
        return tools, float(took.read_text()) if took.is_file() else float("nan")
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(llama_cpp_sdist(work)) as tar:
        prefix = tar.getmembers()[0].name.split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(root, members=[m for m in members if m.name], filter="data")
    if (root / ".git").is_file():  # a submodule pointer into llama-cpp-python's repository, absent here
        (root / ".git").unlink()
    # the portable x86-64 flags of the Makefile's llama-cpp-python build
    flags = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"] if os.uname().machine == "x86_64" else []
    subprocess.run(["cmake", "-S", str(root), "-B", str(root / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-imatrix", "llama-quantize", "-j", str(threads)],
                   check=True, stdout=subprocess.DEVNULL)
    took.write_text(f"{time.perf_counter() - start:.1f}")
    return tools, float(took.read_text())


def calibration_file(path: Path) -> dict[str, int]:
    """quantkit's default calibration texts, each domain's opening in the mix's proportions of
    SAMPLES x SEQLEN tokens, one after another; returns the tokens per domain."""
    from transformers import AutoTokenizer

    from quantkit.calibration import DEFAULT_MIX, calibration_texts
    from quantkit.source import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(None).path)
    texts, parts, counts = calibration_texts(None), [], {}
    for domain, share in DEFAULT_MIX.items():
        want = round(share * SAMPLES * SEQLEN)
        ids = tokenizer(texts[domain], add_special_tokens=False)["input_ids"][:want]
        parts.append(tokenizer.decode(ids))
        counts[domain] = len(ids)
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return counts


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    from quantkit.api import convert, profile
    from quantkit.source import resolve_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q2_k,q3_k_m,iq3_xxs,iq2_xs")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation windows of 512 per domain")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    out = REPO / "out" / "bench"
    work = out / NAME
    work.mkdir(parents=True, exist_ok=True)
    tools, build_s = llama_cpp_tools(out, args.threads)
    f32_dir = out / "gemma-3-270m-f32"
    if not cached_embedded_artifact(f32_dir):
        convert(None, ["gguf:f32"], out, verify=False)
    f32 = next(f32_dir.glob("*.gguf"))
    params = sum(int(t.n_elements) for t in gguf.GGUFReader(f32).tensors)
    calib = work / "calib.txt"
    calib_tokens = calibration_file(calib)
    llama_imatrix = work / "llama-imatrix.gguf"
    imatrix_s = _timed([str(tools["imatrix"]), "-m", str(f32), "-f", str(calib), "-o", str(llama_imatrix), "-c", str(SEQLEN),
                        "--chunks", str(SAMPLES), "-t", str(args.threads)])
    reference = resolve_source(None).path
    rows, checks = [], {}
    for qtype in args.types.split(","):
        files: dict[str, tuple[Path, float]] = {}
        iquant = qtype.startswith("iq") and qtype not in ("iq4_nl", "iq4_xs")
        if not iquant:  # llama.cpp refuses most i-quants without an importance matrix
            plain = work / f"{qtype}-llama.gguf"
            files[LLAMA] = plain, _timed([str(tools["quantize"]), str(f32), str(plain), qtype.upper(), str(args.threads)])
        theirs = work / f"{qtype}-llama-imatrix.gguf"
        files[LLAMA_IMATRIX] = theirs, imatrix_s + _timed([str(tools["quantize"]), "--imatrix", str(llama_imatrix), str(f32),
                                                            str(theirs), qtype.upper(), str(args.threads)])
        start = time.perf_counter()
        recipe = qtype if iquant else qtype + "+imatrix"
        shutil.rmtree(work / "quantkit", ignore_errors=True)
        [art] = convert(None, [f"gguf:{recipe}"], work / "quantkit", verify=False, threads=args.threads,
                        recipe_options={"calib": str(calib), "calib_samples": SAMPLES, "calib_seqlen": SEQLEN}).artifacts
        ours = work / f"{qtype}-quantkit.gguf"
        shutil.copyfile(art.main_file, ours)
        files[QUANTKIT] = ours, time.perf_counter() - start
        # llama-quantize with quantkit's imatrix file: the tensors quantkit's own call wrote
        again = work / f"{qtype}-llama-with-quantkit-imatrix.gguf"
        _timed([str(tools["quantize"]), "--imatrix", str(art.path / "imatrix.gguf"), str(f32), str(again), qtype.upper(),
                str(args.threads)])
        checks[qtype] = _tensor_bytes(again) == _tensor_bytes(ours)
        for label, (path, seconds) in files.items():
            report = profile(path, reference=reference, latency=False, chunks=args.chunks, threads=args.threads)
            q = report["quality"]
            rows.append({"type": qtype, "how": label, "file_bytes": path.stat().st_size, "seconds": seconds,
                         "bits_per_weight": path.stat().st_size * 8 / params,
                         "kld_mean": q["kld_mean"], "kld_mean_interval": q["intervals"]["kld_mean"], "kld_p99": q["kld_p99"],
                         "top1_agreement": q["top1_agreement"],
                         "domains": {d: {"kld_mean": f["kld_mean"], "ppl_delta_pct": f.get("ppl_delta_pct"),
                                         "top1_agreement": f["top1_agreement"], "tokens": f["tokens"]}
                                     for d, f in q["domains"].items()}})
            print(f"{qtype} {label}: {path.stat().st_size / 1e6:.1f} MB, kld_mean {q['kld_mean']:.4f}", flush=True)
    result = {"model": "Gemma 3 270M (embedded)", "threads": args.threads, "chunks": args.chunks, "build_s": build_s,
              "calibration_tokens": calib_tokens, "imatrix_file_accepted_same_tensors": checks, "rows": rows}
    write_results(NAME, result)
    print(f"\n{table(result)}")


def table(result: dict) -> str:
    domains = list(result["rows"][0]["domains"]) if result["rows"] else []
    body = []
    for r in result["rows"]:
        base = next((x for x in result["rows"] if x["type"] == r["type"] and x["how"] == LLAMA), None)
        ratio = f"{r['kld_mean'] / base['kld_mean']:.2f}x" if base else "-"
        low, high = r["kld_mean_interval"]
        body.append([f"`{r['type']}`", r["how"], f"{r['file_bytes'] / 1e6:.1f} MB ({r['bits_per_weight']:.2f} bpw)",
                     f"{r['kld_mean']:.4f} ({low:.4f}–{high:.4f})", ratio, f"{r['kld_p99']:.3f}", f"{r['top1_agreement']:.3f}",
                     *[f"{r['domains'][d]['kld_mean']:.4f} / {r['domains'][d]['ppl_delta_pct']:+.1f}%" for d in domains],
                     f"{r['seconds']:.0f} s"])
    return markdown_table(["type", "quantized by", "file", "KLD mean (95 %)", "vs plain", "KLD p99", "top-1",
                           *[f"{d}: KLD / ppl Δ" for d in domains], "time"], body)


def checks(result: dict) -> str:
    same = [t for t, ok in result["imatrix_file_accepted_same_tensors"].items() if ok]
    other = [t for t, ok in result["imatrix_file_accepted_same_tensors"].items() if not ok]
    text = (f"\n`llama-quantize --imatrix` on the `imatrix.gguf` quantkit wrote: the same tensors as quantkit's own call for "
            f"{', '.join(f'`{t}`' for t in same) or 'no type'}")
    text += f"; different for {', '.join(f'`{t}`' for t in other)}.\n" if other else ".\n"
    return text + (f"Calibration tokens per domain: {', '.join(f'{d} {n}' for d, n in result['calibration_tokens'].items())}; "
                   f"building `llama-imatrix` and `llama-quantize` took {result['build_s']:.0f} s.\n")


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result) + checks(result)}


if __name__ == "__main__":
    main()
