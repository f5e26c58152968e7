"""Regularizer kernels vs torch autograd and numpy, side by side in one run (medians, ratios).

(a) 64 sequences of 512-4096 float32 tokens (~150k): fused value + gradient of l1, l2 and entropy.
(b) 16M float32 tokens in 16 sequences, against the memory-copy bandwidth floor.
Run: python bench/bench_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, median_seconds  # noqa: E402

import regrad  # noqa: E402


def regrad_all(arrays):
    for k in ("l1", "l2", "entropy"):
        regrad.kernels.regularizer(k, arrays)


def numpy_all(arrays):
    b = len(arrays)
    for a in arrays:
        _ = np.abs(a).sum(), np.sign(a) / b
        _ = (a * a).sum(), 2 * a / b
        e = np.exp(a)
        _ = -(e * a).sum(), -e * (1 + a) / b


def torch_autograd_all(tensors):
    import torch

    for t in tensors:
        t.grad = None
    l1 = torch.stack([t.abs().sum() for t in tensors]).mean()
    l2 = torch.stack([(t * t).sum() for t in tensors]).mean()
    ent = torch.stack([-(t.exp() * t).sum() for t in tensors]).mean()
    (l1 + l2 + ent).backward()


def copy_bandwidth(n: int) -> float:
    """Bytes per second of a large float32 copy (read + write), median of repeats."""
    src = np.random.default_rng(0).normal(size=n).astype(np.float32)
    dst = np.empty_like(src)
    t = median_seconds(lambda: np.copyto(dst, src), repeats=10)
    return 2 * src.nbytes / t


def run_case(name, arrays, repeats):
    import torch

    tensors = [torch.from_numpy(a.copy()).requires_grad_(True) for a in arrays]
    t_regrad = median_seconds(lambda: regrad_all(arrays), repeats=repeats)
    t_torch = median_seconds(lambda: torch_autograd_all(tensors), repeats=repeats)
    t_numpy = median_seconds(lambda: numpy_all(arrays), repeats=repeats)
    n = sum(a.size for a in arrays)
    print(f"\n{name}: {len(arrays)} sequences, {n:,} float32 tokens; l1 + l2 + entropy, value + gradient")
    print(f"{'route':<24}{'median ms':>12}{'vs regrad':>12}")
    for label, t in (("regrad (C++ fused)", t_regrad), ("torch autograd", t_torch), ("numpy", t_numpy)):
        print(f"{label:<24}{t * 1e3:>12.3f}{t / t_regrad:>11.1f}x")
    return n, t_regrad, t_torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller (b) case, fewer repeats")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print("machine:", ", ".join(f"{k}={v}" for k, v in machine().items()))
    lengths = rng.integers(512, 4097, size=64)
    a = [-np.abs(rng.normal(size=n)).astype(np.float32) for n in lengths]
    _, t_reg, t_torch = run_case("(a)", a, 30)
    print(f"ratio torch autograd / regrad on (a): {t_torch / t_reg:.1f}x (goal >= 10x)")

    total = (1 << 20) if args.quick else (16 << 20)
    b = [-np.abs(rng.normal(size=total // 16)).astype(np.float32) for _ in range(16)]
    n, t_reg, _ = run_case("(b)", b, 5 if args.quick else 10)
    bw = copy_bandwidth(total)
    floor = 3 * (4 + 4) * n / bw  # three kernels, each reads 4 B and writes 4 B per token
    print(f"copy bandwidth {bw / 1e9:.2f} GB/s; floor for 3 x (read + write) = {floor * 1e3:.2f} ms")
    print(f"regrad / bandwidth floor on (b): {t_reg / floor:.2f}x (goal <= 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
