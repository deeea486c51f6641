"""Timing helpers shared by the benchmark scripts: a command in a fresh process, its wall time
and its own peak RSS, and the median/min/max of repeated runs."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

# runs a command and reports its exit code and peak RSS (ru_maxrss of the waited-for child)
_WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
         "stderr=subprocess.DEVNULL).returncode; print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def measure(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``cmd`` run once in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, check=True, cwd=cwd).stdout.split()
    elapsed = time.perf_counter() - start
    if out[0] != "0":
        raise SystemExit(f"failed ({out[0]}): {' '.join(cmd)}")
    return elapsed, int(out[1])


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
