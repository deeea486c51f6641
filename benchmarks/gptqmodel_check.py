"""Benchmark 9: quantkit's GPTQ checkpoint loaded by GPTQModel, and GPTQModel's own CPU GPTQ of
the same model on the same calibration windows, side by side.

    python benchmarks/gptqmodel_check.py [--env DIR] [--samples 32] [--seqlen 256] [--eval-windows 4]

GPTQModel (7.7) needs torch >= 2.14.1, newer than quantkit's CPU torch, so it lives in an
environment of its own: ``--env`` (default .bench-envs/gptqmodel), made on first use with
``pip install torch==2.14.1 gptqmodel==7.7.0`` (the time it took is recorded). Only ``make bench``
runs this; CI's ``make bench-quick`` never does.

Steps, each in a fresh process with its wall time and peak RSS: quantkit ``convert --to
gptq:w4g128`` of the embedded Gemma 3 270M on ``--samples`` windows of ``--seqlen`` tokens (quantkit's
calibration mix); GPTQModel ``quantize`` of the same float checkpoint on exactly those token windows;
GPTQModel loading quantkit's checkpoint on the CPU and computing logits on ``--eval-windows``
windows of the evaluation text. Compared: GPTQModel's logits for quantkit's checkpoint against
quantkit's own GPTQ runtime (mean KLD, which should be ~0), and each GPTQ against the float model.

Mixtures of experts (``--only-moe`` runs just this part): tiny random Qwen3-MoE, Mixtral and
DeepSeek-V3 checkpoints (tests/tiny_models.py, widths GPTQModel's CPU kernel accepts), quantkit's
``gptq:w4g32`` of each, loaded by GPTQModel and compared with quantkit's GPTQ runtime: does the
per-expert layout load in the consumer, and compute the same model?
Writes benchmarks/results/gptqmodel_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _measure import markdown_table, measure, write_results  # noqa: E402

NAME = "gptqmodel_check"
TORCH = "torch==2.14.1"
GPTQMODEL = "gptqmodel==7.7.0"
WORKER = Path(__file__).with_name("_gptqmodel_worker.py")


def ensure_env(env: Path) -> dict:
    """The GPTQModel environment; returns how long making it took (0 when it existed)."""
    python, record = env / "bin" / "python", env / "quantkit-install.json"
    if python.is_file() and subprocess.run([str(python), "-c", "import gptqmodel"], capture_output=True).returncode == 0:
        made = json.loads(record.read_text()) if record.is_file() else {}
        return {"created": False, **made}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    for spec in (TORCH, GPTQMODEL):
        print(f"installing {spec} into {env} ...", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
    made = {"install_s": time.perf_counter() - start, "packages": [TORCH, GPTQMODEL], "made_on": time.strftime("%Y-%m-%d")}
    record.write_text(json.dumps(made))
    return {"created": True, **made}


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kld(p_logits, q_logits) -> dict:
    import numpy as np

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    per_token = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"kld_mean": float(per_token.mean()), "kld_p99": float(np.quantile(per_token, 0.99)),
            "top1_agreement": float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean()), "tokens": int(len(per_token))}


def runtime_logits(runtime, windows):
    import numpy as np

    return np.concatenate([runtime.logits(w) for w in windows]).astype(np.float32)


MOE_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")


def moe_cross_check(python: str, work: Path) -> list[dict]:
    """quantkit's GPTQ of tiny MoE checkpoints, loaded by GPTQModel, against quantkit's runtime."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import TOKENIZER_FOR, build_tiny_model, shared_text, train_byte_bpe, train_spm

    from quantkit.formats import ConvertOptions, get_format
    from quantkit.recipe import parse_recipe
    from quantkit.runtimes import get_runtime
    from quantkit.source import resolve_source

    root = work / "moe"
    tokenizers = {"spm": lambda: train_spm(root / "spm"), "qwen2": lambda: train_byte_bpe(root, "qwen2")}
    rows = []
    for arch in MOE_ARCHS:
        folder = root / arch
        if not (folder / "config.json").is_file():
            build_tiny_model(arch, tokenizers[TOKENIZER_FOR[arch]](), folder)
        recipe = parse_recipe("gptq:w4g32", {"calib_samples": 8, "calib_seqlen": 64})
        [art] = get_format("gptq").convert(resolve_source(folder), [recipe], root / "gptq", ConvertOptions(verify=None))
        ids = AutoTokenizer.from_pretrained(folder)(shared_text("tinyshakespeare-en.txt", 4000))["input_ids"]
        windows = [ids[:128], ids[128:256]]
        (root / f"{arch}-windows.json").write_text(json.dumps(windows))
        out = root / f"{arch}-gptqmodel.npy"
        run = subprocess.run([python, str(WORKER), "logits", str(art.path), str(root / f"{arch}-windows.json"), str(out)],
                             capture_output=True, text=True, cwd=work)
        row = {"arch": arch, "experts": [layer.get("experts") is not None for layer in art.manifest["details"]["layers"]].count(True)}
        if run.returncode:
            rows.append({**row, "failed": (run.stderr or run.stdout).strip().splitlines()[-1][-300:]})
            continue
        runtime = get_runtime("gptq")(art.main_file, n_ctx=256, threads=1)
        ours = runtime_logits(runtime, windows)
        runtime.close()
        theirs = np.load(out).astype(np.float32)
        lp, lq = log_softmax(ours), log_softmax(theirs)
        per_token = (np.exp(lp) * (lp - lq)).sum(-1)
        kernels = json.loads(run.stdout.strip().splitlines()[-1])["kernels"]
        rows.append({**row, **kld(ours, theirs), "kld_median": float(np.median(per_token)),
                     "tokens_over_1e-2": int((per_token > 1e-2).sum()), "kernels": kernels})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", type=Path, default=REPO / ".bench-envs" / "gptqmodel")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-gptqmodel")
    parser.add_argument("--only-moe", action="store_true", help="run only the mixture-of-experts cross-check and merge it "
                        "into the existing results")
    args = parser.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    from quantkit.calibration import calibration_texts, calibration_windows
    from quantkit.embedded import default_model_dir
    from quantkit.profile.corpus import default_texts
    from quantkit.runtimes import get_runtime
    from quantkit.runtimes.torch import TorchReference
    from quantkit.source import resolve_source

    env_info = ensure_env(args.env)
    python = str(args.env / "bin" / "python")
    versions = subprocess.run([python, "-c", "import torch, gptqmodel, transformers; print(torch.__version__, "
                               "gptqmodel.__version__, transformers.__version__)"], capture_output=True, text=True, check=True)
    torch_v, gptqmodel_v, transformers_v = versions.stdout.strip().splitlines()[-1].split()  # after GPTQModel's banner
    work = args.work.resolve()  # the GPTQModel worker runs inside it
    work.mkdir(parents=True, exist_ok=True)
    if args.only_moe:
        existing = REPO / "benchmarks" / "results" / f"{NAME}.json"
        payload = json.loads(existing.read_text()) if existing.is_file() else {}
        for key in ("benchmark", "machine", "date"):  # written again by write_results
            payload.pop(key, None)
        payload["moe"] = moe_cross_check(python, work)
        print(table(payload))
        write_results(NAME, payload)
        return
    source = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)

    # the same calibration windows for both: quantkit's mix, as quantkit's GPTQ draws them
    windows, _ = calibration_windows(tokenizer, calibration_texts(None), n_samples=args.samples, seqlen=args.seqlen, seed=0)
    (work / "calibration.json").write_text(json.dumps(windows))
    text = "\n\n".join(default_texts().values())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eval_windows = [[tokenizer.bos_token_id, *ids[i * 255:(i + 1) * 255]] for i in range(args.eval_windows)]
    (work / "eval.json").write_text(json.dumps(eval_windows))

    quantkit = str(Path(sys.executable).with_name("quantkit"))
    ours_dir = work / "quantkit"
    print("quantkit: gptq:w4g128 ...", flush=True)
    ours = measure([quantkit, "-q", "convert", "--to", "gptq:w4g128", "--calib-samples", str(args.samples),
                    "--calib-seqlen", str(args.seqlen), "--no-verify", "-o", str(ours_dir)], REPO)
    [ours_ckpt] = [p.parent for p in ours_dir.glob("*/manifest.json")]
    print(f"  {ours[0]:.0f} s, {ours[1] / 1e6:,.0f} MB", flush=True)

    theirs_dir = work / "gptqmodel-w4g128"
    # GPTQModel writes logs/ into its working directory: the work folder, not the repository
    print("GPTQModel: quantize w4g128 ...", flush=True)
    theirs = measure([python, str(WORKER), "quantize", str(source), str(work / "calibration.json"), str(theirs_dir)], work)
    print(f"  {theirs[0]:.0f} s, {theirs[1] / 1e6:,.0f} MB", flush=True)

    print("GPTQModel: loading both checkpoints ...", flush=True)
    loaded = {}
    for label, ckpt in (("quantkit", ours_ckpt), ("gptqmodel", theirs_dir)):
        out = work / f"logits-{label}.npy"
        wall, peak = measure([python, str(WORKER), "logits", str(ckpt), str(work / "eval.json"), str(out)], work)
        loaded[label] = {"wall_s": wall, "peak_rss_bytes": peak, "logits": np.load(out).astype(np.float32)}

    float_logits = np.concatenate(list(TorchReference(resolve_source(str(source))).logits(eval_windows)))
    our_runtime = get_runtime("gptq")(ours_ckpt / "model.safetensors", n_ctx=args.seqlen)
    our_logits = runtime_logits(our_runtime, eval_windows)
    our_runtime.close()

    payload = {
        "environment": {**env_info, "torch": torch_v, "gptqmodel": gptqmodel_v, "transformers": transformers_v},
        "calibration": {"samples": args.samples, "seqlen": args.seqlen, "seed": 0},
        "cross_check": {"what": "GPTQModel's logits for quantkit's checkpoint vs quantkit's GPTQ runtime",
                        **kld(our_logits, loaded["quantkit"]["logits"]),
                        "load_wall_s": loaded["quantkit"]["wall_s"], "load_peak_rss_bytes": loaded["quantkit"]["peak_rss_bytes"]},
        "rows": [
            {"tool": "quantkit", "convert_wall_s": ours[0], "convert_peak_rss_bytes": ours[1],
             **kld(float_logits, our_logits)},
            {"tool": f"GPTQModel {gptqmodel_v}", "convert_wall_s": theirs[0], "convert_peak_rss_bytes": theirs[1],
             **kld(float_logits, loaded["gptqmodel"]["logits"])},
        ],
        "moe": moe_cross_check(python, work),
    }
    print(table(payload))
    write_results(NAME, payload)


def table(result: dict) -> str:
    rows = [[r["tool"], f"{r['convert_wall_s']:.0f} s", f"{r['convert_peak_rss_bytes'] / 1e6:,.0f} MB",
             f"{r['kld_mean']:.4f}", f"{r['top1_agreement']:.3f}"] for r in result["rows"]]
    out = markdown_table(["w4g128 GPTQ by", "quantize wall", "peak RSS", "KLD vs float", "top-1"], rows)
    c = result["cross_check"]
    env = result["environment"]
    out += (f"\nGPTQModel {env['gptqmodel']} (torch {env['torch']}, transformers {env['transformers']}) loaded quantkit's "
            f"checkpoint on the CPU: mean KLD {c['kld_mean']:.1e} against quantkit's GPTQ runtime over {c['tokens']} tokens "
            f"(top-1 {c['top1_agreement']:.3f}). Calibration: the same {result['calibration']['samples']} windows of "
            f"{result['calibration']['seqlen']} tokens for both.")
    if env.get("install_s"):
        out += f" Making GPTQModel's environment (`pip install {' '.join(env['packages'])}`) took {env['install_s']:.0f} s."
    out += "\n"
    if result.get("moe"):
        rows = [[r["arch"], "failed: " + r["failed"], "-", "-", "-"] if "failed" in r else
                [r["arch"], f"{r['kld_mean']:.1e}", f"{r['kld_median']:.1e}", f"{r['top1_agreement']:.3f}",
                 f"{r['tokens_over_1e-2']} of {r['tokens']}"] for r in result["moe"]]
        out += ("\nMixtures of experts: quantkit's `gptq:w4g32` of tiny random checkpoints (per-expert packed Linears), "
                "loaded by GPTQModel on the CPU, against quantkit's GPTQ runtime:\n\n"
                + markdown_table(["model", "mean KLD", "median KLD", "top-1", "tokens with KLD > 1e-2"], rows))
    return out


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
