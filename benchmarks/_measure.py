"""Helpers shared by the benchmark scripts: a command in a fresh process with its wall time and
its own peak RSS, the median/min/max of repeated runs, the machine line, writing a results file,
and Markdown tables (the same text is printed and, through benchmarks/readme.py, put in the README)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# runs a command and reports its exit code and peak RSS (ru_maxrss of the waited-for child); the
# command's stderr passes through, to be shown if it fails
_WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
         "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def measure(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``cmd`` run once in a fresh process."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, check=True, cwd=cwd)
    elapsed = time.perf_counter() - start
    rc, peak = run.stdout.split()
    if rc != "0":
        tail = "\n".join(run.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{tail}")
    return elapsed, int(peak)


@functools.cache
def _embedded_fingerprint() -> str:
    from quantkit.source import resolve_source

    return resolve_source(None).fingerprint  # hashes the checkpoint's files: once per process


@contextlib.contextmanager
def cold_cache(drop: tuple[str, ...], work: Path):
    """quantkit's cache without the ``drop`` entries (reference logits, importance matrices), so
    a timing includes computing them as a first run does; the rest (the embedded model's files)
    is reused. Set through $QUANTKIT_CACHE, so child processes see it too."""
    import shutil
    import tempfile

    from quantkit.embedded import cache_dir

    real = cache_dir()
    work.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix="quantkit-cache-", dir=work))
    for entry in real.iterdir() if real.is_dir() else ():
        if entry.name not in drop:
            (fresh / entry.name).symlink_to(entry)
    previous, os.environ["QUANTKIT_CACHE"] = os.environ.get("QUANTKIT_CACHE"), str(fresh)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("QUANTKIT_CACHE")
        else:
            os.environ["QUANTKIT_CACHE"] = previous
        shutil.rmtree(fresh, ignore_errors=True)


def cached_embedded_artifact(folder: Path, recipe: str) -> bool:
    """Whether a cached artifact of the embedded model under out/bench can be reused: False (and
    the folder removed) when it was built from an older embedded checkpoint or by another recipe
    than ``recipe`` means now (a default that changed, such as the importance matrix below 5 bits)."""
    import json
    import shutil

    from quantkit.recipe import parse_recipe

    if not folder.is_dir():
        return False
    manifest = folder / "manifest.json"
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if recorded.get("source", {}).get("fingerprint") == _embedded_fingerprint() and parse_recipe(recipe).matches(recorded.get("recipe")):
        return True
    shutil.rmtree(folder)
    return False


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> str:
    from quantkit.profile.roofline import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"


def results_dir() -> Path:
    """benchmarks/results, or $QUANTKIT_BENCH_RESULTS (make bench-quick writes to results/quick)."""
    return Path(os.environ.get("QUANTKIT_BENCH_RESULTS", REPO / "benchmarks" / "results"))


def write_results(name: str, payload: dict) -> Path:
    """Write ``<results>/<name>.json`` (atomically) with the benchmark name, machine and date added."""
    from quantkit.report.render import write_json

    path = results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}, path)
    print(f"wrote {path}")
    return path


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def timing(s: dict[str, float], unit: str = "s", digits: int = 2) -> str:
    """'3.81 s (3.76–3.98)' from a spread; the range is left out when there was one run."""
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f} {unit}"
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def llama_cpp_sdist(work: Path) -> Path:
    """The installed llama-cpp-python's source distribution (llama.cpp's source under
    vendor/llama.cpp), downloaded once into ``work``/sdist."""
    from importlib.metadata import version

    dl = work / "sdist"
    wanted = f"llama_cpp_python-{version('llama-cpp-python')}.tar.gz"
    if not (dl / wanted).is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        f"llama-cpp-python=={version('llama-cpp-python')}", "-d", str(dl)], check=True)
    return next(dl.glob("llama_cpp_python-*.tar.gz"))
