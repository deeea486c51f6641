"""HF -> GGUF F16 conversion: quantkit's streaming writer against llama.cpp's own
`convert_hf_to_gguf.py` and against a plain copy of the weights (the disk's limit), on the same
checkpoint, side by side in one run: wall time and peak RSS, median and spread of fresh processes.

    python benchmarks/convert_f16.py [--repeats 3] [--quick]

The shared checkpoint is a Llama with random float16 weights (12 layers of width 1024, ~310 MB)
and a SentencePiece tokenizer trained on ../shared/data, which both converters accept. The
embedded Gemma 3 270M, which only quantkit converts (its tokenizer is rebuilt from a GGUF), is
timed as well. `convert_hf_to_gguf.py` comes from the llama-cpp-python source distribution of the
installed version (`pip download --no-binary :all: --no-deps`), unpacked under out/bench, never
committed. Prints a table; writes benchmarks/results/convert_f16.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from _measure import measure, spread  # noqa: E402

from quantkit.profile.roofline import cpu_model  # noqa: E402


def llama_cpp_converter(work: Path) -> Path:
    """convert_hf_to_gguf.py (and its gguf-py) from the installed llama-cpp-python's sdist."""
    root = work / f"llama-cpp-python-{version('llama-cpp-python')}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dl = work / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"llama-cpp-python=={version('llama-cpp-python')}", "-d", str(dl)], check=True)
    with tarfile.open(next(dl.glob("*.tar.gz"))) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   (m.name.endswith("convert_hf_to_gguf.py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        tar.extractall(work / "extract", members=members, filter="data")
    shutil.move(str(next((work / "extract").iterdir())), root)
    return script


def shared_llama(work: Path, layers: int) -> Path:
    import torch
    from tiny_models import train_spm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = work / f"llama-{layers}x1024-f16"
    if (out / "model.safetensors").is_file():
        return out
    tok_dir = train_spm(work / "spm")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tok.save_pretrained(out)
    return out


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
    source = shared_llama(args.out, 4 if args.quick else 12)
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
    print(f"\nHF -> GGUF F16, median (min-max) of {repeats} fresh processes, {cpu_model()}")
    print(f"{'model':34} {'tool':34} {'wall s':>22} {'peak RSS MB':>12}")
    for r in rows:
        w = r["wall_s"]
        print(f"{r['model'][:34]:34} {r['tool']:34} {w['median']:8.2f} ({w['min']:.2f}-{w['max']:.2f}) {r['peak_rss_bytes']['median'] / 1e6:12.0f}")
    result = Path(os.environ.get("QUANTKIT_BENCH_RESULTS", REPO / "benchmarks" / "results")) / "convert_f16.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({
        "benchmark": "convert_f16", "repeats": repeats, "converter": str(script.relative_to(args.out)),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
