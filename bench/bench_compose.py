"""Composition overhead: regrad.compose(cross_entropy + l1 + l2 + entropy + a torch regularizer), with
telemetry and grad norms, vs the same total hand-written in torch with one backward().

Batch: 64 data × T tokens (T = 512 ... 4096), float32 log-probs as Tinker sends them. Prints median
milliseconds per forward+backward and the ratio composed / hand-written (target ≤ 1.3×).

    python bench/bench_compose.py [--repeats 30] [--lengths 512 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch

import regrad

BATCH = 64
W_L1, W_L2, W_ENTROPY, W_TORCH = 0.01, 0.001, 0.1, 0.5


def make_batch(length: int, seed: int = 0):
    """64 data of `length` tokens: log-probs in (-6, 0), random 0/1 weights (prompt tokens masked)."""
    gen = np.random.default_rng(seed)
    lps = [torch.from_numpy(-gen.exponential(1.0, length).clip(1e-4, 6.0).astype(np.float32)) for _ in range(BATCH)]
    data = [
        regrad.Datum(list(range(length)), {"target_tokens": gen.integers(0, 255, length), "weights": (gen.random(length) > 0.2).astype(np.float32)})
        for _ in range(BATCH)
    ]
    return data, lps


def confidence_penalty(data, logprobs_list):
    """The torch regularizer: mean over data of softplus(lp + 1) per token, as a user would write it."""
    x = torch.cat(logprobs_list)
    value = torch.nn.functional.softplus(x + 1.0).sum() / len(logprobs_list)
    return value, {"mean_softplus": value.item()}


def hand_written(data, logprobs_list):
    """The same total in plain torch: one graph, one backward()."""
    x = torch.cat(logprobs_list)
    w = torch.cat([torch.as_tensor(d.loss_fn_inputs["weights"]) for d in data])
    n = len(logprobs_list)
    ce = -(w * x).sum() / w.sum()
    l1 = x.abs().sum() / n
    l2 = (x * x).sum() / n
    entropy = -(x.exp() * x).sum() / n
    return ce + W_L1 * l1 + W_L2 * l2 + W_ENTROPY * entropy + W_TORCH * confidence_penalty(data, logprobs_list)[0]


def composed_loss(**options):
    return regrad.compose(
        regrad.losses.cross_entropy,
        [
            regrad.l1(W_L1),
            regrad.l2(W_L2),
            regrad.entropy(W_ENTROPY),
            {"fn": confidence_penalty, "weight": W_TORCH, "name": "confidence"},
        ],
        **options,
    )


def median_ms(steps: Dict[str, Callable[[List[torch.Tensor]], None]], lps: List[torch.Tensor], repeats: int) -> Dict[str, float]:
    """Median ms of each step; the steps take turns within every repeat, so machine load hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for i in range(repeats + 3):
        for name, step in steps.items():
            leaves = [x.clone().requires_grad_(True) for x in lps]
            start = time.perf_counter()
            step(leaves)
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    args = parser.parse_args()
    info = regrad.build_info()
    print(f"# {platform.processor() or platform.machine()}, {info['max_threads']} threads, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, regrad {info['version']}")
    print("| tokens (64 × T) | hand-written torch (ms) | compose (ms) | ratio | compose, parallel=False (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    parallel, sequential = composed_loss(), composed_loss(parallel=False)
    for length in args.lengths:
        data, lps = make_batch(length)
        check_same(data, lps, parallel)

        def hand(leaves):
            hand_written(data, leaves).backward()

        def run(loss_fn):
            def step(leaves):
                loss, _ = loss_fn(data, leaves)
                loss.backward()

            return step

        t = median_ms({"hand": hand, "parallel": run(parallel), "sequential": run(sequential)}, lps, args.repeats)
        t_hand, t_par, t_seq = t["hand"], t["parallel"], t["sequential"]
        print(f"| 64 × {length} = {64 * length} | {t_hand:.2f} | {t_par:.2f} | {t_par / t_hand:.2f}× | {t_seq:.2f} | {t_seq / t_hand:.2f}× |")


def check_same(data, lps, loss_fn) -> None:
    """The two must compute the same gradient (float32 tolerance) before their times mean anything."""
    a = [x.clone().requires_grad_(True) for x in lps]
    b = [x.clone().requires_grad_(True) for x in lps]
    loss_fn(data, a)[0].backward()
    hand_written(data, b).backward()
    worst = max(float((x.grad - y.grad).abs().max()) for x, y in zip(a, b))
    assert worst < 1e-5, f"composed and hand-written gradients differ by {worst}"


if __name__ == "__main__":
    main()
