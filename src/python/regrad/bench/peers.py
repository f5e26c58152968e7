"""The established tools regrad is measured against, each as `run(limit) -> flat gradient`.

Every runner differentiates a batch loss `fn(data, logprobs_list) -> loss or (loss, metrics)` with
respect to all log-probs, flattened in datum order. `run(None)` returns the whole gradient (float64,
[n]); `run(k)` only the first k coordinates (the rest held fixed), so a slow peer can be timed on
a prefix and extrapolated. Runners count their loss evaluations in `run.nfev` (the last call's).
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PEERS", "missing_module", "flat", "split_flat", "per_element_loop", "loop_runner", "scipy_runner",
           "numdifftools_runner", "gradcheck_runner", "timed_or_estimated", "Runner"]

# peer name -> (label, the module it needs)
PEERS: Dict[str, Tuple[str, str]] = {
    "loop": ("per-element loop (seed Option A)", "torch"),
    "scipy": ("scipy approx_derivative 3-point", "scipy"),
    "numdifftools": ("numdifftools Gradient", "numdifftools"),
    "gradcheck": ("torch gradcheck numerical Jacobian", "torch"),
}


def missing_module(peer: str) -> Optional[str]:
    """The module `peer` needs when it cannot be imported (not installed, or a module it imports in
    turn is missing: numdifftools without scipy), else None."""
    module = PEERS[peer][1]
    if importlib.util.find_spec(module) is None:
        return module
    try:
        importlib.import_module(module)
    except ImportError as err:
        return err.name or module
    return None


def flat(grads: Sequence[Any]) -> np.ndarray:
    """One float64 vector of a list of arrays / tensors, in order."""
    parts = [np.asarray(g.detach() if hasattr(g, "detach") else g, dtype=np.float64).reshape(-1) for g in grads]
    return np.concatenate(parts) if parts else np.zeros(0)


def split_flat(x: Any, shapes: Sequence[Tuple[int, ...]], as_torch: bool, dtype: Any = None) -> List[Any]:
    """The inverse of `flat`: views of x shaped like `shapes` (torch tensors if as_torch), cast to dtype."""
    if as_torch:
        import torch

        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if dtype is not None:
            t = t.to(dtype)
        parts = torch.split(t, [int(np.prod(s)) for s in shapes])
        return [part.reshape(s) for part, s in zip(parts, shapes)]
    a = np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    out, start = [], 0
    for s in shapes:
        size = int(np.prod(s))
        out.append(a[start:start + size].reshape(s))
        start += size
    return out


def _scalar(value: Any) -> Any:
    """The loss of `fn`'s return value (a scalar, or the first item of a (loss, metrics) pair)."""
    return value[0] if isinstance(value, tuple) else value


class Runner:
    """A callable `run(limit) -> flat gradient` that counts its loss evaluations in `nfev`."""

    def __init__(self, body: Callable[[Optional[int]], np.ndarray]) -> None:
        self.body = body
        self.nfev = 0

    def __call__(self, limit: Optional[int] = None) -> np.ndarray:
        self.nfev = 0
        with warnings.catch_warnings():  # a peer's own deprecation noise is not the benchmark's concern
            warnings.simplefilter("ignore")
            return self.body(limit)


def per_element_loop(fn: Callable[..., Any], lps: List[Any], limit: Optional[int] = None, eps: float = 1e-3,
                     counter: Optional[Runner] = None) -> np.ndarray:
    """The seed's Option A: perturb one element by +-eps, call the loss twice, repeat (torch log-probs)."""
    grads: List[Any] = []
    done = 0
    import torch

    for i, lp in enumerate(lps):
        g = torch.zeros(lp.numel(), dtype=torch.float64)
        for e in range(lp.numel()):
            if limit is not None and done >= limit:
                return flat(grads + [g])[:limit]
            plus = lp.clone().reshape(-1)
            plus[e] += eps
            minus = lp.clone().reshape(-1)
            minus[e] -= eps
            loss_plus = float(_scalar(fn(None, lps[:i] + [plus.reshape(lp.shape)] + lps[i + 1:])))
            loss_minus = float(_scalar(fn(None, lps[:i] + [minus.reshape(lp.shape)] + lps[i + 1:])))
            g[e] = (loss_plus - loss_minus) / (2 * eps)
            done += 1
            if counter is not None:
                counter.nfev += 2
        grads.append(g)
    out = flat(grads)
    return out if limit is None else out[:limit]


def loop_runner(fn: Callable[..., Any], lps: List[Any], eps: float = 1e-3) -> Runner:
    """The per-element loop as a Runner."""
    runner = Runner(lambda limit: per_element_loop(fn, lps, limit, eps, runner))
    return runner


def _flat_loss(fn: Callable[..., Any], x0: np.ndarray, shapes: Sequence[Tuple[int, ...]], as_torch: bool,
               limit: Optional[int], runner: Runner) -> Tuple[Callable[[np.ndarray], Any], np.ndarray]:
    """f(head) = fn on x0 with its first `limit` coordinates replaced by head, and that head's start."""
    head0 = x0 if limit is None else x0[:limit]
    rest = None if limit is None else x0[limit:]
    dtype = None
    if as_torch:
        import torch

        dtype = torch.from_numpy(x0[:0]).dtype

    def f(head: np.ndarray) -> Any:
        runner.nfev += 1
        x = head if rest is None else np.concatenate([np.asarray(head, dtype=x0.dtype), rest])
        loss = _scalar(fn(None, split_flat(x, shapes, as_torch, dtype)))
        loss = loss.detach().numpy() if hasattr(loss, "detach") else np.asarray(loss)
        return loss.reshape(())

    return f, head0


def scipy_runner(fn: Callable[..., Any], x0: np.ndarray, shapes: Sequence[Tuple[int, ...]], as_torch: bool) -> Runner:
    """scipy's `approx_derivative(method="3-point")`, in x0's dtype (its step follows that dtype's eps)."""
    from scipy.optimize._numdiff import approx_derivative

    def body(limit: Optional[int]) -> np.ndarray:
        f, head = _flat_loss(fn, x0, shapes, as_torch, limit, runner)
        return np.asarray(approx_derivative(f, head, method="3-point"), dtype=np.float64).reshape(-1)

    runner = Runner(body)
    return runner


def numdifftools_runner(fn: Callable[..., Any], x0: np.ndarray, shapes: Sequence[Tuple[int, ...]], as_torch: bool) -> Runner:
    """numdifftools' `Gradient` (adaptive central differences with Richardson extrapolation)."""
    import numdifftools as nd

    def body(limit: Optional[int]) -> np.ndarray:
        f, head = _flat_loss(fn, x0, shapes, as_torch, limit, runner)
        return np.asarray(nd.Gradient(lambda h: float(f(h)))(head.astype(np.float64)), dtype=np.float64).reshape(-1)

    runner = Runner(body)
    return runner


def gradcheck_runner(fn: Callable[..., Any], lps: List[Any], dtype: Any = None, eps: float = 1e-6) -> Runner:
    """The numerical Jacobian of `torch.autograd.gradcheck` (central differences, eps=1e-6), in dtype
    (default: the log-probs' own)."""
    import torch
    from torch.autograd.gradcheck import _get_numerical_jacobian

    shapes = [tuple(lp.shape) for lp in lps]
    x0 = torch.cat([lp.detach().reshape(-1) for lp in lps])
    if dtype is not None:
        x0 = x0.to(dtype)

    def body(limit: Optional[int]) -> np.ndarray:
        k = x0.numel() if limit is None else limit
        tail = x0[k:]

        def g(head: Any) -> Any:
            runner.nfev += 1
            loss = _scalar(fn(None, split_flat(torch.cat([head, tail]), shapes, True)))
            return torch.as_tensor(loss).reshape(1)

        head = x0[:k].clone().requires_grad_(True)
        jac = _get_numerical_jacobian(g, (head,), eps=eps)  # jac[input][output]: [k, 1]
        return jac[0][0].detach().double().numpy().reshape(-1)

    runner = Runner(body)
    return runner


def timed_or_estimated(run_prefix: Callable[[Optional[int]], Any], n: int, budget: float, est_prefix: int,
                       repeats: int = 5) -> Tuple[float, Any, str]:
    """Runs fully when a prefix probe says it fits the budget (median of up to `repeats` runs after a
    first one, within the budget), else extrapolates the probe's time."""
    import time

    from .timing import timed_runs

    t0 = time.perf_counter()
    run_prefix(est_prefix)
    probe = time.perf_counter() - t0
    if probe / est_prefix * n <= budget:
        t0 = time.perf_counter()
        grad = run_prefix(None)
        first = time.perf_counter() - t0
        if first > budget / 2:  # one run is all the budget allows
            return first, grad, "1 run (budget)"
        times = timed_runs(lambda: run_prefix(None), repeats=repeats, warmup=0, budget_s=budget, min_repeats=1)
        return statistics.median(times), grad, ""
    return probe / est_prefix * n, None, f"est. from {est_prefix} of {n} coordinates"
