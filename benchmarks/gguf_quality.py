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

from _measure import cold_cache, llama_cpp_sdist, markdown_table, write_results  # noqa: E402

NAME = "gguf_quality"
SAMPLES, SEQLEN = 32, 512
LLAMA, LLAMA_IMATRIX, QUANTKIT, AUTO = "llama.cpp", "llama.cpp + llama-imatrix", "quantkit +imatrix", "quantkit gguf:auto"
EMBEDDED, OFFGRID = "gemma-3-270m", "gemma-3-270m-offgrid"


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


OFFGRID_NOISE = 0.12  # Gaussian noise per weight, as a fraction of its row's root mean square


def offgrid_checkpoint(source: Path, out: Path) -> Path:
    """The embedded Gemma with every matrix moved off the Q4_K_M grid it was dequantised from:
    w + N(0, (OFFGRID_NOISE * rms of w's row)^2), seeded, norms and biases untouched. A float
    model with Gemma's structure on which no llama.cpp type is a lossless round trip."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    done = out / "quantkit-offgrid-done"
    if done.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, out / f.name)
    rng = np.random.default_rng(0)
    tensors = {}
    with safe_open(source / "model.safetensors", "np") as reader:
        for name in sorted(reader.keys()):
            w = reader.get_tensor(name)
            if w.ndim == 2:
                rms = np.sqrt((w.astype(np.float64) ** 2).mean(axis=1, keepdims=True))
                w = (w + rng.standard_normal(w.shape) * OFFGRID_NOISE * rms).astype(w.dtype)
            tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    done.write_text("ok")
    return out


def _profile_row(path: Path, reference: Path, qtype: str, how: str, seconds: float, params: int, chunks: int,
                 threads: int, model: str, extra: dict | None = None) -> dict:
    from quantkit.api import profile

    report = profile(path, reference=reference, latency=False, chunks=chunks, threads=threads)
    q = report["quality"]
    print(f"{model} {qtype} {how}: {path.stat().st_size / 1e6:.1f} MB, kld_mean {q['kld_mean']:.4f}", flush=True)
    return {"model": model, "type": qtype, "how": how, "file_bytes": path.stat().st_size, "seconds": seconds,
            "bits_per_weight": path.stat().st_size * 8 / params,
            "kld_mean": q["kld_mean"], "kld_mean_interval": q["intervals"]["kld_mean"], "kld_p99": q["kld_p99"],
            "top1_agreement": q["top1_agreement"], **(extra or {}),
            "domains": {d: {"kld_mean": f["kld_mean"], "ppl_delta_pct": f.get("ppl_delta_pct"),
                            "top1_agreement": f["top1_agreement"], "tokens": f["tokens"]}
                        for d, f in q["domains"].items()}}


def run_model(model: str, hf_dir: Path, types: list[str], auto_at: list[str], tools: dict[str, Path], work: Path,
              calib: Path, args) -> tuple[list[dict], dict[str, bool]]:
    """Every row of one model: each type three ways, then gguf:auto at the sizes of llama.cpp's
    plain ``auto_at`` types (one conversion: the analysis is shared)."""
    from quantkit.api import convert

    work.mkdir(parents=True, exist_ok=True)
    f32_dir = work / "f32"
    if not (f32_dir / "manifest.json").is_file():
        shutil.rmtree(f32_dir, ignore_errors=True)
        [art] = convert(str(hf_dir), ["gguf:f32"], work / "tmp", verify=False).artifacts
        shutil.move(str(art.path), f32_dir)
    f32 = next(f32_dir.glob("*.gguf"))
    params = sum(int(t.n_elements) for t in gguf.GGUFReader(f32).tensors)
    llama_imatrix = work / "llama-imatrix.gguf"
    imatrix_s = _timed([str(tools["imatrix"]), "-m", str(f32), "-f", str(calib), "-o", str(llama_imatrix), "-c", str(SEQLEN),
                        "--chunks", str(SAMPLES), "-t", str(args.threads)])
    calibration = {"calib": str(calib), "calib_samples": SAMPLES, "calib_seqlen": SEQLEN}
    rows, checks, plain_sizes = [], {}, {}
    for qtype in dict.fromkeys(types + auto_at):
        files: dict[str, tuple[Path, float]] = {}
        iquant = qtype.startswith("iq") and qtype not in ("iq4_nl", "iq4_xs")
        if not iquant:  # llama.cpp refuses most i-quants without an importance matrix
            plain = work / f"{qtype}-llama.gguf"
            files[LLAMA] = plain, _timed([str(tools["quantize"]), str(f32), str(plain), qtype.upper(), str(args.threads)])
            plain_sizes[qtype] = plain.stat().st_size
        theirs = work / f"{qtype}-llama-imatrix.gguf"
        files[LLAMA_IMATRIX] = theirs, imatrix_s + _timed([str(tools["quantize"]), "--imatrix", str(llama_imatrix), str(f32),
                                                            str(theirs), qtype.upper(), str(args.threads)])
        if qtype in types:
            start = time.perf_counter()
            recipe = qtype if iquant else qtype + "+imatrix"
            shutil.rmtree(work / "quantkit", ignore_errors=True)
            with cold_cache(("imatrix",), work):  # every row pays for its matrix, as llama.cpp's rows do
                [art] = convert(str(hf_dir), [f"gguf:{recipe}"], work / "quantkit", verify=False, threads=args.threads,
                                recipe_options=calibration).artifacts
            ours = work / f"{qtype}-quantkit.gguf"
            shutil.copyfile(art.main_file, ours)
            files[QUANTKIT] = ours, time.perf_counter() - start
            # llama-quantize with quantkit's imatrix file: the tensors quantkit's own call wrote
            again = work / f"{qtype}-llama-with-quantkit-imatrix.gguf"
            _timed([str(tools["quantize"]), "--imatrix", str(art.path / "imatrix.gguf"), str(f32), str(again), qtype.upper(),
                    str(args.threads)])
            checks[qtype] = _tensor_bytes(again) == _tensor_bytes(ours)
        for label, (path, seconds) in files.items():
            rows.append(_profile_row(path, hf_dir, qtype, label, seconds, params, args.chunks, args.threads, model))
    if auto_at:
        start = time.perf_counter()
        shutil.rmtree(work / "auto", ignore_errors=True)
        with cold_cache(("imatrix",), work):
            arts = convert(str(hf_dir), [f"gguf:auto-{plain_sizes[t]}" for t in auto_at], work / "auto", verify=False,
                           threads=args.threads, recipe_options=calibration).artifacts
        seconds = time.perf_counter() - start
        for qtype, art in zip(auto_at, arts, strict=True):
            info = art.manifest["details"]["auto"]
            extra = {"target_bytes": plain_sizes[qtype], "shared_seconds": True, "type_counts": info["type_counts"],
                     "predicted_kld": info["predicted_kld"], "probe_kld": info["measured_kld"]}
            rows.append(_profile_row(art.main_file, hf_dir, qtype, AUTO, seconds, params, args.chunks, args.threads, model,
                                     extra))
    return rows, checks


def main() -> None:
    from quantkit.source import resolve_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q2_k,q3_k_m,iq3_xxs,iq2_xs")
    ap.add_argument("--auto-at", default="q2_k,q3_k_m", help="gguf:auto at the file sizes of these plain llama.cpp types")
    ap.add_argument("--models", default=f"{EMBEDDED},{OFFGRID}")
    ap.add_argument("--chunks", type=int, default=8, help="evaluation windows of 512 per domain")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    out = REPO / "out" / "bench"
    work = out / NAME
    work.mkdir(parents=True, exist_ok=True)
    tools, build_s = llama_cpp_tools(out, args.threads)
    calib = work / "calib.txt"
    calib_tokens = calibration_file(calib)
    embedded = resolve_source(None).path
    rows, checks = [], {}
    auto_at = [t for t in args.auto_at.split(",") if t]
    for model in args.models.split(","):
        if model == EMBEDDED:
            got, checks = run_model(model, embedded, args.types.split(","), auto_at, tools, work / "embedded", calib, args)
        else:  # the comparison at equal size that the embedded model's grid cannot give: fewer types
            hf_dir = offgrid_checkpoint(embedded, out / "gemma-3-270m-offgrid")
            got, _ = run_model(model, hf_dir, [], auto_at, tools, work / "offgrid", calib, args)
        rows += got
    result = {"model": "Gemma 3 270M (embedded) and its off-grid variant", "threads": args.threads, "chunks": args.chunks,
              "build_s": build_s, "offgrid_noise": OFFGRID_NOISE, "calibration_tokens": calib_tokens,
              "imatrix_file_accepted_same_tensors": checks, "rows": rows}
    write_results(NAME, result)
    print(f"\n{table(result)}")


def table(result: dict) -> str:
    out = []
    for model in dict.fromkeys(r.get("model", EMBEDDED) for r in result["rows"]):
        rows = [r for r in result["rows"] if r.get("model", EMBEDDED) == model]
        domains = list(rows[0]["domains"])
        body = []
        for r in rows:
            ratios = []
            for how in (LLAMA, LLAMA_IMATRIX):
                base = next((x for x in rows if x["type"] == r["type"] and x["how"] == how), None)
                ratios.append(f"{r['kld_mean'] / base['kld_mean']:.2f}x" if base and r["how"] not in (LLAMA, how) else "-")
            low, high = r["kld_mean_interval"]
            how = r["how"] + (f" at {r['type']}'s size" if r["how"] == AUTO else "")
            seconds = f"{r['seconds']:.0f} s" + (" (both sizes)" if r.get("shared_seconds") else "")
            body.append([f"`{r['type']}`", how, f"{r['file_bytes'] / 1e6:.1f} MB ({r['bits_per_weight']:.2f} bpw)",
                         f"{r['kld_mean']:.4f} ({low:.4f}–{high:.4f})", *ratios, f"{r['kld_p99']:.3f}", f"{r['top1_agreement']:.3f}",
                         *[f"{r['domains'][d]['kld_mean']:.4f} / {r['domains'][d]['ppl_delta_pct']:+.1f}%" for d in domains],
                         seconds])
        label = ("Gemma 3 270M (embedded: dequantised Q4_K_M)" if model == EMBEDDED else
                 f"Gemma 3 270M off the grid (every matrix + {result.get('offgrid_noise', 0):.0%} of its row RMS in Gaussian noise)")
        out.append(f"**{label}**\n\n" + markdown_table(
            ["type", "quantized by", "file", "KLD mean (95 %)", "vs plain", "vs llama.cpp imatrix", "KLD p99", "top-1",
             *[f"{d}: KLD / ppl Δ" for d in domains], "time"], body))
        mixes = [r for r in rows if r["how"] == AUTO]
        if mixes:
            out.append("gguf:auto's mixes: " + "; ".join(
                f"at {r['type']}'s size " + ", ".join(f"{n} {t}" for t, n in r["type_counts"].items())
                + f" (predicted KLD {r['predicted_kld']:.4f}, measured on its probe windows {r['probe_kld']:.4f})"
                for r in mixes) + ".\n")
    return "\n".join(out)


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
