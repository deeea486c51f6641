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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", type=Path, default=REPO / ".bench-envs" / "gptqmodel")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-gptqmodel")
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
    return out + "\n"


def sections(result: dict) -> dict[str, str]:
    return {"table": table(result)}


if __name__ == "__main__":
    main()
