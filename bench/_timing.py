"""Timing helpers shared by the bench scripts: medians over repeats, machine description."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict


def median_seconds(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 2, budget_s: float = 20.0) -> float:
    """Median wall time of fn() over `repeats` runs (fewer if the budget runs out)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def machine() -> Dict[str, str]:
    """CPU model, core count and library versions, for the benchmark record."""
    import os

    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    import regrad

    b = regrad.build_info()
    info["regrad"] = f"{b['version']} (openmp={b['openmp']}, threads={b['max_threads']}, {b['compiler']})"
    return info
