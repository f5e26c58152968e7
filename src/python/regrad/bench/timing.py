"""Timing and memory helpers shared by `regrad bench` and the bench/ scripts."""

from __future__ import annotations

import os
import platform
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["pin_malloc", "timed_runs", "median_seconds", "peak_traced_bytes", "peak_rss_extra_bytes", "machine",
           "fmt_time", "fmt_bytes"]


def pin_malloc(threshold_bytes: int = 64 << 20) -> bool:
    """Fixes glibc's mmap and trim thresholds for this process; returns False where that is not glibc.

    By default glibc moves its mmap threshold and trims the heap top as memory comes and goes, so a
    fresh tensor of a few MiB page-faults on some calls and not on others: a loss's own time then
    swings 2-5x with whatever ran before it. Benchmarks pin both so they time the code, not that.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, threshold_bytes)) and bool(mallopt(m_trim_threshold, 2 * threshold_bytes))


def timed_runs(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 2, budget_s: float = 20.0,
               min_repeats: int = 3) -> List[float]:
    """Wall times (s) of `repeats` calls of fn() after `warmup` calls; stops early past budget_s."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= min_repeats:
            break
    return times


def median_seconds(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 2, budget_s: float = 20.0,
                   min_repeats: int = 3) -> float:
    """Median wall time (s) of fn() over `repeats` runs (fewer if the budget runs out)."""
    return statistics.median(timed_runs(fn, repeats=repeats, warmup=warmup, budget_s=budget_s, min_repeats=min_repeats))


def peak_traced_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through Python's allocators (Python objects, numpy) during fn()."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn()
        return max(0, tracemalloc.get_traced_memory()[1] - base)
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory during fn() above the resident memory before it (all allocators, torch's too).

    Linux only: resets the kernel's high-water mark (/proc/self/clear_refs, "5") and reads VmHWM.
    Memory reused from the allocator's free lists is not counted. None where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "?"))


def machine(extra_modules: Tuple[str, ...] = ()) -> Dict[str, str]:
    """CPU model, core count, thread counts and library versions, for the benchmark record."""
    import numpy

    info = {"cpu": _cpu_model(), "cores": str(os.cpu_count()), "python": platform.python_version(),
            "numpy": numpy.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    for name in extra_modules:
        version = _version(name)
        if version is not None:
            info[name] = version
    import regrad

    b = regrad.build_info()
    info["regrad"] = f"{b['version']} (openmp={b['openmp']}, threads={b['max_threads']}, {b['compiler']})"
    return info


def fmt_time(s: Optional[float]) -> str:
    """Seconds as a short human string (s, ms or µs)."""
    if s is None or s != s:
        return "–"
    # the unit is chosen after rounding: 999.6 µs is "1.00 ms", not "1000 µs"
    if abs(s) >= 1 or abs(float(f"{s * 1e3:.2f}")) >= 1000:
        return f"{s:.2f} s"
    if abs(s) >= 1e-3 or abs(float(f"{s * 1e6:.0f}")) >= 1000:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_bytes(b: Optional[float]) -> str:
    """Bytes as B / KiB / MiB / GiB (the unit chosen after rounding: 1 MiB - 1 B is "1.0 MiB")."""
    if b is None:
        return "–"
    if b >= 2**30 or float(f"{b / 2**20:.1f}") >= 1024:
        return f"{b / 2**30:.2f} GiB"
    if b >= 2**20 or float(f"{b / 2**10:.0f}") >= 1024:
        return f"{b / 2**20:.1f} MiB"
    if b >= 2**10:
        return f"{b / 2**10:.0f} KiB"
    return f"{b:.0f} B"
