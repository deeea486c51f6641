"""Profiler throughput: tokens scored per second by `quantkit profile` next to a bare
llama-cpp-python scoring loop (what a user would otherwise write), on the same GGUF and text.

    python benchmarks/profiler_throughput.py [--model ARTIFACT_DIR] [--chunks 8] [--threads N]

Without --model it converts the embedded Gemma 3 270M to gguf:q4_k_m (cached under out/bench).
The reference cache is warmed first, so quantkit's figure is what profiling a second artifact
of the same model costs: artifact logits, log-softmax over the full vocabulary, KLD against the
cached top-k reference, top-1 and NLL. The bare loop computes NLL (perplexity) only, like
llama.cpp's perplexity tool without --kl-divergence. Prints a table; writes
benchmarks/results/profiler_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import cached_embedded_artifact, markdown_table, spread, timing, write_results  # noqa: E402

from quantkit.api import convert, profile  # noqa: E402
from quantkit.profile.corpus import load_eval_data  # noqa: E402
from quantkit.profile.run import locate_artifact, make_windows  # noqa: E402

NAME = "profiler_throughput"


def bare_llama_cpp(model: Path, text: str, ctx: int, chunks: int, threads: int) -> tuple[int, float]:
    """The loop a llama-cpp-python user writes: eval each window, NLL of its second half."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          n_threads=threads, verbose=False)
    start = time.perf_counter()
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    windows = make_windows(tokens, llm.token_bos(), ctx, chunks)
    scored, nll = 0, 0.0
    for window in windows:
        llm.reset()
        llm.eval(window)
        half = len(window) // 2
        logits = np.asarray(llm.scores[half : len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(logp)), window[half + 1 :]].sum())
        scored += len(logp)
    elapsed = time.perf_counter() - start
    llm.close()
    return scored, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF artifact folder (default: embedded q4_k_m)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model_dir = args.model
    if model_dir is None:
        model_dir = REPO / "out" / "bench" / "gemma-3-270m-q4_k_m"
        if not cached_embedded_artifact(model_dir, "gguf:q4_k_m"):
            convert(None, ["gguf:q4_k_m"], model_dir.parent, verify=False)
    _fmt, gguf_file, _ = locate_artifact(model_dir)
    eval_data = ["code"]  # the stdlib code domain: long enough for many windows on every machine
    text = load_eval_data(eval_data)["code"]

    kwargs = dict(eval_data=eval_data, ctx=args.ctx, chunks=args.chunks, threads=args.threads, latency=False)
    profile(model_dir, **kwargs)  # warms the reference cache (and the page cache)
    ours, theirs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = profile(model_dir, **kwargs)
        ours.append((report["quality"]["tokens"], time.perf_counter() - start))
        theirs.append(bare_llama_cpp(gguf_file, text, args.ctx, args.chunks, args.threads))

    rows = []
    for tool, runs, what in (
        ("quantkit profile (warm reference cache)", ours, "KLD + top-1 + ppl; incl. load, tokenize, bandwidth probe"),
        ("bare llama-cpp-python loop", theirs, "ppl only; load excluded"),
    ):
        tokens = runs[0][0]
        rates = [n / s for n, s in runs]
        rows.append({"tool": tool, "tokens_scored": tokens, "tokens_per_s": spread(rates), "computes": what})
    result = {"model": gguf_file.name, "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
              "repeats": args.repeats, "rows": rows}
    print(f"profiler throughput: {gguf_file.name}, ctx {args.ctx}, {args.chunks} windows, {args.threads} threads, "
          f"median of {args.repeats}\n{table(result)}")
    write_results(NAME, result)


def table(result: dict) -> str:
    rows = result["rows"]
    body = markdown_table(["tool", "tokens scored", "tokens/s", "computes"], [
        [r["tool"], str(r["tokens_scored"]), timing(r["tokens_per_s"], "tok/s", digits=1),
         r["computes"]] for r in rows])
    return body + f"\nratio quantkit / bare loop: {rows[0]['tokens_per_s']['median'] / rows[1]['tokens_per_s']['median']:.2f}\n"


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
