"""regrad's CUDA kernels on one GPU: fraction of measured memory bandwidth, vs torch autograd, and
the vectorized numerical route on the GPU vs the CPU. Needs a CUDA GPU, a CUDA build of torch and
regrad built with REGRAD_CUDA=ON (see docs/cuda.md). Exits 2 with a message when any is missing.

(a) Bandwidth: a device-to-device copy of --tokens float32 values (read + write) is the reference.
(b) Each kernel (l1, l2, entropy, l2_norm) on --tokens float32 tokens in 16 sequences (default 16M):
    "queued" = back-to-back launches of regrad._cuda.regularizer (GPU time only, CUDA events),
    "call" = regrad.kernels.regularizer end to end (allocation, launch, status read-back).
    Bytes per token: read 4 + write 4 (l2_norm reads twice: 12). Goal: queued >= 70% of the copy.
(c) l1 + l2 + entropy (value + gradient) fused by regrad vs torch autograd, same GPU, same data.
(d) Central differences of a black-box loss with vectorized=True: regrad.numerical_grad on the CPU
    (CPU tensors) vs the same route on the GPU (points, blocks and quotients by regrad._cuda, the
    loss evaluated by torch on the device). Both gradients are compared.
Run: python bench/bench_cuda.py [--tokens N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import date

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine, median_seconds  # noqa: E402
from bench_kernels import torch_autograd_all  # noqa: E402  (the same autograd reference as on the CPU)

import regrad  # noqa: E402
from regrad import _gpu, kernels  # noqa: E402
from regrad.numerical import numerical_grad  # noqa: E402


def gpu_seconds(fn, repeats: int = 20, warmup: int = 3, inner: int = 1) -> float:
    """Median GPU time of fn() (per inner call) between CUDA events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth(n: int) -> float:
    """Bytes per second of a device-to-device float32 copy of n values (read + write)."""
    import torch

    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / gpu_seconds(lambda: dst.copy_(src), inner=5)


def queued_kernel(kind: str, tensors) -> float:
    """GPU seconds per launch of regrad._cuda.regularizer, outputs preallocated, no read-back."""
    import torch

    cuda = _gpu.cuda_module()
    batch = _gpu.cuda_batch(tensors)
    per_datum = torch.empty(len(tensors), dtype=torch.float64, device="cuda")
    grad = torch.empty(batch.size, dtype=batch.dtype, device="cuda")
    value = torch.empty((), dtype=torch.float64, device="cuda")
    status = torch.empty(3, dtype=torch.int64, device="cuda")
    args = (kind, batch.dtype_name, batch.pointers, batch.offsets, batch.width, 0, "mean", per_datum.data_ptr(),
            grad.data_ptr(), value.data_ptr(), status.data_ptr(), batch.stream())
    return gpu_seconds(lambda: cuda.regularizer(*args), inner=5)


def regrad_all(tensors):
    for k in ("l1", "l2", "entropy"):
        kernels.regularizer(k, tensors)


def black_box(data, logprobs_list):
    """One loss per perturbed copy ([P, T_i] inputs): sum over data of logsumexp(x) + 0.1 max(x)."""
    import torch

    return sum(torch.logsumexp(x, dim=-1) + 0.1 * x.max(dim=-1).values for x in logprobs_list)


def gpu_vectorized_central(fn, tensors, max_batch_bytes: int = 256 << 20):
    """The vectorized central-difference route on the GPU, built on regrad._gpu's engine helpers."""
    import torch

    from regrad import _core

    batch = _gpu.cuda_batch(tensors)
    scale = _core.difference_step_scale("central", batch.dtype_name)
    points, spacing = _gpu.difference_points(tensors, "central", scale)
    npoints, n = points.shape
    total = n * npoints
    itemsize = tensors[0].element_size()
    rows = max(1, min(total, max_batch_bytes // max(1, n * itemsize)))
    buffers = [torch.empty((rows,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in tensors]
    f = torch.empty(total, dtype=torch.float64, device=tensors[0].device)
    prev = None
    for q in range(0, total, rows):
        count = min(rows, total - q)
        if prev is None:
            _gpu.difference_block(tensors, buffers, points, 0, npoints, q, count, True)
        else:
            _gpu.difference_block(tensors, buffers, points, 0, npoints, q, count, False, *prev)
        f[q : q + count] = fn(None, [b[:count] for b in buffers]).to(torch.float64)
        prev = (q, count)
    eps = float(torch.finfo(tensors[0].dtype).eps)
    grad, _ = _gpu.difference_quotients("central", spacing, f, npoints, 1, None, 0, eps)
    return grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16 << 20, help="tokens for (a)-(c), default 16M")
    parser.add_argument("--numerical-tokens", type=int, default=2048, help="log-probs differentiated in (d)")
    parser.add_argument("--quick", action="store_true", help="1M tokens, fewer repeats (a smoke run, not a figure)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_cuda needs torch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_cuda needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if regrad._cuda is None:
        print("bench_cuda needs regrad._cuda: " + _gpu.BUILD_HINT, file=sys.stderr)
        return 2
    tokens = (1 << 20) if args.quick else args.tokens
    props = torch.cuda.get_device_properties(0)
    print(f"date: {date.today().isoformat()}")
    print("machine:", ", ".join(f"{k}={v}" for k, v in machine().items()))
    print(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"torch cuda {torch.version.cuda}, regrad._cuda {regrad._cuda.build_info()}")

    bw = copy_bandwidth(tokens)
    print(f"\n(a) device copy bandwidth ({tokens:,} float32, read + write): {bw / 1e9:.0f} GB/s")

    gen = torch.Generator(device="cuda").manual_seed(0)
    per_seq = tokens // 16
    tensors = [-torch.rand(per_seq, device="cuda", generator=gen) * 5 for _ in range(16)]
    n = per_seq * 16
    print(f"\n(b) kernels on {n:,} float32 tokens in 16 sequences (value + per-datum + gradient)")
    print(f"{'kernel':<10}{'queued ms':>11}{'GB/s':>8}{'of copy':>9}{'call ms':>10}")
    fractions = []
    for kind in ("l1", "l2", "entropy", "l2_norm"):
        t_q = queued_kernel(kind, tensors)
        t_call = median_seconds(lambda: kernels.regularizer(kind, tensors), repeats=10 if args.quick else 30)
        moved = n * (12 if kind == "l2_norm" else 8)
        frac = moved / t_q / bw
        fractions.append(frac)
        print(f"{kind:<10}{t_q * 1e3:>11.3f}{moved / t_q / 1e9:>8.0f}{frac:>8.0%}{t_call * 1e3:>10.3f}")
    print(f"lowest fraction of the copy bandwidth: {min(fractions):.0%} (goal >= 70% at 16M+ tokens)")

    print(f"\n(c) l1 + l2 + entropy, value + gradient, {n:,} tokens: regrad vs torch autograd (same GPU)")
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    t_reg = gpu_seconds(lambda: regrad_all(tensors), repeats=10)
    t_torch = gpu_seconds(lambda: torch_autograd_all(leaves), repeats=10)
    print(f"regrad {t_reg * 1e3:.3f} ms, torch autograd {t_torch * 1e3:.3f} ms: torch / regrad = {t_torch / t_reg:.1f}x")

    m = args.numerical_tokens
    rng = np.random.default_rng(0)
    lengths = [m // 4] * 4
    cpu_lp = [torch.from_numpy(-np.abs(rng.normal(size=k)).astype(np.float32)) for k in lengths]
    gpu_lp = [t.cuda() for t in cpu_lp]
    print(f"\n(d) central differences, vectorized=True, black-box loss, {m:,} float32 log-probs ({2 * m:,} evaluations)")
    t_cpu = median_seconds(
        lambda: numerical_grad(black_box, None, cpu_lp, vectorized=True), repeats=3 if args.quick else 5
    )
    t_gpu = median_seconds(lambda: (gpu_vectorized_central(black_box, gpu_lp), torch.cuda.synchronize()), repeats=5)
    g_cpu = np.concatenate([g.numpy().ravel() for g in numerical_grad(black_box, None, cpu_lp, vectorized=True).grads])
    g_gpu = gpu_vectorized_central(black_box, gpu_lp).cpu().numpy()
    diff = float(np.max(np.abs(g_cpu - g_gpu)))
    print(f"CPU {t_cpu * 1e3:.1f} ms, GPU {t_gpu * 1e3:.1f} ms: CPU / GPU = {t_cpu / t_gpu:.1f}x; "
          f"max |grad CPU - grad GPU| = {diff:.2e} (float32 losses; same points on both)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
