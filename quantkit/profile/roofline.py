"""The host: CPU, memory, measured memory bandwidth, and the decode roofline it implies.

Decoding one token reads (about) every weight once, so a model cannot decode faster than
``bandwidth / bytes_read_per_token``; the measured speed over that bound is the roofline fraction.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

__all__ = ["host_info", "measure_bandwidth_bytes_per_s"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth_bytes_per_s(size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Median copy bandwidth (bytes read + written per second) over a buffer larger than caches."""
    src = np.ones(size_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        rates.append(2 * size_bytes / (time.perf_counter() - start))
    return float(statistics.median(rates))


def host_info(threads: int) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_used": min(threads, os.cpu_count() or threads),
        "threads_used": threads,
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "memory_bandwidth_bytes_per_s": measure_bandwidth_bytes_per_s(),
        "measured": True,
    }
