"""The benchmark problem (a smooth loss on a ragged batch of N log-probs), the routes, and the runner.

The loss is the seed's `sparsity_penalty` (mean over data of the L1 norm) plus the entropy term
mean_i sum_t -exp(x) * x: smooth at the log-probs used (all <= -0.05), so torch autograd defines
the reference gradient and every route's error can be measured against it.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import peers as peer_runners
from .timing import fmt_time, peak_rss_extra_bytes, peak_traced_bytes, timed_runs

__all__ = ["ROUTES", "Problem", "Result", "make_problem", "run_suite", "LOSS_DESCRIPTION"]

LOSS_DESCRIPTION = ("seed sparsity_penalty + entropy: mean_i sum_t (|x| - exp(x) * x), "
                    "x = -(0.05 + Exp(mean 2)), B = clip(N // 1000, 4, N) data of ragged lengths")

# regrad route name -> label
ROUTES: Dict[str, str] = {
    "kernels": "regrad kernels (C++ analytic)",
    "token": "regrad token (central)",
    "token-richardson": "regrad token (richardson)",
    "datum": "regrad datum (vectorized)",
    "batch": "regrad batch (vectorized)",
    "spsa": "regrad spsa (batch, 64 samples)",
    "gaussian": "regrad gaussian (batch, 64 samples)",
}
AUTOGRAD_LABEL = "torch autograd"
RANDOMIZED_SAMPLES = 64


@dataclass
class Problem:
    """One benchmark size: the log-probs (torch), their flat copy, the layout and the reference gradient."""

    n: int
    dtype: str
    lengths: List[int]
    lps: List[Any]
    x0: np.ndarray
    reference: np.ndarray  # float64 autograd gradient (computed in float64 on the same values)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def shapes(self) -> List[Tuple[int, ...]]:
        return [(t,) for t in self.lengths]


@dataclass
class Result:
    """One (route, N) cell of the benchmark."""

    route: str
    label: str
    kind: str  # "reference" (autograd), "regrad" or "peer"
    n: int
    dtype: str
    status: str  # "ok", "est" (extrapolated from a prefix), "skipped", "failed"
    seconds: Optional[float] = None  # median over repeats, or the extrapolated time ("est")
    repeats: int = 0
    ratio_to_autograd: Optional[float] = None
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    error_coordinates: int = 0  # how many coordinates the errors cover (all n, or the timed prefix)
    peak_rss_extra_bytes: Optional[int] = None
    peak_traced_bytes: Optional[int] = None
    nfev: Optional[int] = None
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """The cell as plain JSON values (NaN / inf become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


# ---- the problem --------------------------------------------------------------------------------


def batch_size(n: int) -> int:
    """Data per batch for n log-probs: about 1000 tokens each, at least 4 data (never more than n)."""
    return max(1, min(n, max(4, n // 1000)))


def make_problem(n: int, dtype: str, seed: int = 0) -> Problem:
    """n log-probs -(0.05 + Exp(2)) in ragged data, and the float64 autograd reference gradient."""
    import torch

    rng = np.random.default_rng(seed)
    b = batch_size(n)
    weights = rng.uniform(0.75, 1.25, size=b)
    lengths = np.maximum(1, np.floor(weights / weights.sum() * n)).astype(int)
    lengths[np.argmax(lengths)] += n - int(lengths.sum())
    x0 = -(0.05 + rng.exponential(2.0, size=n)).astype(dtype)
    lps = [torch.from_numpy(part) for part in np.split(x0, np.cumsum(lengths)[:-1])]
    leaves = [lp.detach().to(torch.float64, copy=True).requires_grad_(True) for lp in lps]  # never lps themselves
    batch_loss(b)(None, leaves)[0].backward()
    reference = peer_runners.flat([leaf.grad for leaf in leaves])
    return Problem(n, dtype, [int(t) for t in lengths], lps, x0, reference)


def batch_loss(b: int) -> Callable[..., Any]:
    """The seed's sparsity_penalty plus the entropy term, as a plain batch loss (0-d tensor, metrics)."""
    import torch

    def loss(data: Any, logprobs_list: List[Any]) -> Tuple[Any, Dict[str, float]]:
        l1_norms = [torch.norm(lp, p=1) for lp in logprobs_list]
        mean_l1 = torch.sum(torch.stack(l1_norms)) / b
        entropy = torch.sum(torch.stack([-(lp.exp() * lp).sum() for lp in logprobs_list])) / b
        return mean_l1 + entropy, {}

    return loss


def _term(lp: Any) -> Any:
    return lp.abs() - lp.exp() * lp


def vectorized_batch_loss(b: int) -> Callable[..., Any]:
    """The same loss for [P, T_i] blocks of perturbed copies: returns [P]."""
    def loss(data: Any, logprobs_list: List[Any]) -> Any:
        total = _term(logprobs_list[0]).sum(-1)
        for lp in logprobs_list[1:]:
            total = total + _term(lp).sum(-1)
        return total / b

    return loss


def vectorized_datum_loss(b: int) -> Callable[..., Any]:
    """Datum i's term for a [P, T_i] block: returns [P]."""
    return lambda datum, lp: _term(lp).sum(-1) / b


def token_loss(b: int) -> Callable[..., Any]:
    """Per-token losses shaped like the log-probs (total = their sum)."""
    return lambda data, logprobs_list: [_term(lp) / b for lp in logprobs_list]


# ---- routes -------------------------------------------------------------------------------------


@dataclass
class Route:
    """How to run one route on a problem: `run(limit)` -> (flat gradient, nfev); limit=None is the full run."""

    name: str
    label: str
    kind: str
    run: Callable[[Optional[int]], Tuple[np.ndarray, Optional[int]]]
    prefixable: bool = False  # run(k) differentiates only the first k coordinates
    max_prefix: Optional[int] = None
    history: List[Tuple[int, float]] = field(default_factory=list)


def _autograd_run(problem: Problem) -> Callable[[Optional[int]], Tuple[np.ndarray, Optional[int]]]:
    loss = batch_loss(problem.batch)
    leaves = [lp.clone().requires_grad_(True) for lp in problem.lps]

    def run(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
        for leaf in leaves:
            leaf.grad = None
        loss(None, leaves)[0].backward()
        return peer_runners.flat([leaf.grad for leaf in leaves]), 1

    return run


def _kernels_run(problem: Problem) -> Callable[[Optional[int]], Tuple[np.ndarray, Optional[int]]]:
    from .. import kernels

    def run(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
        l1 = kernels.l1(problem.lps).grads
        entropy = kernels.entropy(problem.lps).grads
        return peer_runners.flat([a + e for a, e in zip(l1, entropy)]), 1

    return run


def _numerical_run(problem: Problem, name: str) -> Tuple[Callable[[Optional[int]], Tuple[np.ndarray, Optional[int]]], bool, Optional[int]]:
    """A regrad numerical route; batch and datum routes can be run on a prefix of the coordinates."""
    import torch

    from ..numerical import numerical_grad

    b = problem.batch
    if name in ("token", "token-richardson"):
        method = "richardson" if name == "token-richardson" else "central"
        fn = token_loss(b)

        def run_token(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
            result = numerical_grad(fn, None, problem.lps, structure="token", method=method, progress=False)
            return peer_runners.flat(result.grads), result.nfev

        return run_token, False, None
    if name in ("spsa", "gaussian"):
        fn = vectorized_batch_loss(b)

        def run_random(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
            result = numerical_grad(fn, None, problem.lps, method=name, vectorized=True, num_samples=RANDOMIZED_SAMPLES,
                                    seed=0, progress=False)
            return peer_runners.flat(result.grads), result.nfev

        return run_random, False, None
    if name == "batch":
        fn = vectorized_batch_loss(b)
        x0 = torch.from_numpy(problem.x0)

        def run_batch(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
            if limit is None:
                result = numerical_grad(fn, None, problem.lps, vectorized=True, progress=False)
                return peer_runners.flat(result.grads), result.nfev
            tail = x0[limit:]

            def prefix_fn(data: Any, heads: List[Any]) -> Any:  # heads[0]: [P, limit]
                head = heads[0]
                full = torch.cat([head, tail.expand(head.shape[0], -1)], dim=1)
                return fn(None, list(torch.split(full, problem.lengths, dim=1)))

            result = numerical_grad(prefix_fn, None, [x0[:limit].clone()], vectorized=True, progress=False)
            return peer_runners.flat(result.grads), result.nfev

        return run_batch, True, None
    if name == "datum":
        fn = vectorized_datum_loss(b)
        data = list(range(b))

        def run_datum(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
            if limit is None:
                result = numerical_grad(fn, data, problem.lps, structure="datum", vectorized=True, progress=False)
                return peer_runners.flat(result.grads), result.nfev
            lp0 = problem.lps[0]
            tail = lp0[limit:]

            def prefix_fn(datum: Any, head: Any) -> Any:  # datum 0's first `limit` tokens: [P, limit]
                return fn(datum, torch.cat([head, tail.expand(head.shape[0], -1)], dim=1))

            result = numerical_grad(prefix_fn, [0], [lp0[:limit].clone()], structure="datum", vectorized=True,
                                    progress=False)
            return peer_runners.flat(result.grads), result.nfev

        return run_datum, True, problem.lengths[0]
    raise KeyError(name)  # pragma: no cover - names are validated by the command line


def _peer_run(problem: Problem, name: str) -> Callable[[Optional[int]], Tuple[np.ndarray, Optional[int]]]:
    fn = batch_loss(problem.batch)
    if name == "loop":
        runner = peer_runners.loop_runner(fn, problem.lps)
    elif name == "scipy":
        runner = peer_runners.scipy_runner(fn, problem.x0, problem.shapes, True)
    elif name == "numdifftools":
        runner = peer_runners.numdifftools_runner(fn, problem.x0, problem.shapes, True)
    elif name == "gradcheck":
        runner = peer_runners.gradcheck_runner(fn, problem.lps)
    else:  # pragma: no cover - names are validated by the command line
        raise KeyError(name)

    def run(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
        grad = runner(limit)
        return grad, runner.nfev

    return run


# ---- measuring ----------------------------------------------------------------------------------


def _errors(grad: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    diff = np.abs(grad - reference[:grad.size])
    if diff.size == 0:
        return 0.0, 0.0
    rel = diff / np.maximum(np.abs(reference[:grad.size]), np.finfo(np.float64).tiny)
    return float(diff.max()), float(rel.max())


def _predict(history: List[Tuple[int, float]], n: int) -> Optional[float]:
    """Time at n from the last two measured sizes, as a fixed cost plus a cost per log-prob (both >= 0).

    None (measure, or probe 4 coordinates) with fewer than two sizes: scaling one small-N time by N
    counts its fixed overhead N times over (autograd at 1e2 predicted 3.9 s at 1e6, against ~60 ms
    measured).
    """
    if len(history) < 2:
        return None
    (n0, t0), (n1, t1) = history[-2], history[-1]
    per = max(0.0, (t1 - t0) / (n1 - n0)) if n1 != n0 else 0.0
    fixed = max(0.0, t1 - per * n1)
    return fixed + per * n


def measure(route: Route, problem: Problem, *, repeats: int, budget: float, memory: bool) -> Result:
    """Times one route at one size within `budget` seconds: full runs, a prefix extrapolation, or a skip."""
    n = problem.n
    result = Result(route.name, route.label, route.kind, n, problem.dtype, "ok")
    try:
        if route.prefixable:
            _measure_prefixable(route, problem, result, repeats, budget)
        else:
            predicted = None if route.name == "autograd" else _predict(route.history, n)  # the reference always runs
            if predicted is not None and predicted > budget:
                result.status = "skipped"
                result.note = f"skipped: predicted {fmt_time(predicted)} > budget {fmt_time(budget)}"
                return result
            _measure_full(route, problem, result, repeats, budget)
    except Exception as err:  # a route that fails is reported, the others still run
        result.status = "failed"
        result.note = f"failed: {type(err).__name__}: {err}"[:200]
        return result
    if result.status == "ok":
        route.history.append((n, result.seconds or 0.0))
        if memory and (result.seconds or 0.0) < budget / 4:
            result.peak_rss_extra_bytes = peak_rss_extra_bytes(lambda: route.run(None))
            result.peak_traced_bytes = peak_traced_bytes(lambda: route.run(None))
    return result


def _measure_full(route: Route, problem: Problem, result: Result, repeats: int, budget: float) -> None:
    t0 = time.perf_counter()
    grad, nfev = route.run(None)
    first = time.perf_counter() - t0
    if first > budget / 2:  # one run is all the budget allows: report it
        times = [first]
        result.note = "1 run (budget)"
    else:
        times = timed_runs(lambda: route.run(None), repeats=repeats, warmup=0, budget_s=budget, min_repeats=1)
    result.seconds = statistics.median(times)
    result.repeats = len(times)
    result.nfev = nfev
    result.max_abs_error, result.max_rel_error = _errors(grad, problem.reference)
    result.error_coordinates = grad.size


def _measure_prefixable(route: Route, problem: Problem, result: Result, repeats: int, budget: float) -> None:
    n = problem.n
    cap = n if route.max_prefix is None else min(n, route.max_prefix)
    probe_k = min(cap, 4)
    per_coordinate = _predict([(m, t / m) for m, t in route.history], n)  # a dense loss: cost per coordinate ~ N
    if per_coordinate is not None and per_coordinate * probe_k > budget:
        result.status = "skipped"
        result.note = (f"skipped: {probe_k} coordinates predicted {fmt_time(per_coordinate * probe_k)} "
                       f"> budget {fmt_time(budget)}")
        return
    t0 = time.perf_counter()
    grad, nfev = route.run(probe_k)
    probe = time.perf_counter() - t0
    if probe / probe_k * n <= budget / 2 and probe_k < n:
        _measure_full(route, problem, result, repeats, budget)
        return
    if probe_k == n:
        _measure_full(route, problem, result, repeats, budget)
        return
    k = int(min(cap, max(probe_k, (budget / 2) / max(probe / probe_k, 1e-9))))
    if k > probe_k:
        t0 = time.perf_counter()
        grad, nfev = route.run(k)
        probe = time.perf_counter() - t0
        if probe / k * n <= budget / 2:  # an upper bound (fixed costs scaled too): the full run fits after all
            _measure_full(route, problem, result, repeats, budget)
            return
    else:
        k = probe_k
    result.status = "est"
    result.seconds = probe / k * n
    result.repeats = 1
    result.nfev = int(round((nfev or 0) / k * n)) if nfev is not None else None
    result.max_abs_error, result.max_rel_error = _errors(grad, problem.reference)
    result.error_coordinates = grad.size
    result.note = f"est. from {k:,} of {n:,} coordinates"


def _failing_run(err: Exception) -> Callable[[Optional[int]], Tuple[np.ndarray, Optional[int]]]:
    """A route's run that re-raises the error that stopped its set-up (measure() reports it as failed)."""
    def run(limit: Optional[int]) -> Tuple[np.ndarray, Optional[int]]:
        raise err

    return run


def build_routes(problem: Problem, routes: Sequence[str], peers: Sequence[str], previous: Dict[str, Route]) -> List[Route]:
    """The autograd reference, the regrad routes and the peers for one problem (history carried over)."""
    out = [Route("autograd", AUTOGRAD_LABEL, "reference", _autograd_run(problem))]
    for name in routes:
        try:
            if name == "kernels":
                out.append(Route(name, ROUTES[name], "regrad", _kernels_run(problem)))
            else:
                run, prefixable, cap = _numerical_run(problem, name)
                out.append(Route(name, ROUTES[name], "regrad", run, prefixable, cap))
        except Exception as err:  # a route that cannot be set up is a failed cell, not a lost run
            out.append(Route(name, ROUTES[name], "regrad", _failing_run(err)))
    for name in peers:
        try:
            out.append(Route(name, peer_runners.PEERS[name][0], "peer", _peer_run(problem, name), True))
        except Exception as err:
            out.append(Route(name, peer_runners.PEERS[name][0], "peer", _failing_run(err)))
    for route in out:
        if route.name in previous:
            route.history = previous[route.name].history
    return out


def run_suite(sizes: Sequence[int], dtype: str, routes: Sequence[str], peers: Sequence[str], *, repeats: int,
              budget: float, memory: bool = True, log: Any = None) -> List[Result]:
    """Every route at every size, autograd first at each size (it is the ratio's denominator); progress to log."""
    log = sys.stderr if log is None else log
    results: List[Result] = []
    previous: Dict[str, Route] = {}
    for n in sizes:
        problem = make_problem(n, dtype)
        print(f"N = {n:,} ({problem.batch} data, {dtype})", file=log, flush=True)
        autograd_seconds: Optional[float] = None
        for route in build_routes(problem, routes, peers, previous):
            previous[route.name] = route
            res = measure(route, problem, repeats=repeats, budget=budget, memory=memory)
            if route.name == "autograd" and res.status == "ok":
                autograd_seconds = res.seconds
            if res.seconds is not None and autograd_seconds:
                res.ratio_to_autograd = res.seconds / autograd_seconds
            results.append(res)
            print(f"  {res.label:<38} {fmt_time(res.seconds):>10}  {res.note}", file=log, flush=True)
    return results


def crossovers(results: Sequence[Result]) -> Dict[str, Dict[str, Any]]:
    """Per route: ratio to autograd at each N, and the smallest N from which it is slower than autograd."""
    out: Dict[str, Dict[str, Any]] = {}
    for res in results:
        if res.kind == "reference" or res.ratio_to_autograd is None:
            continue
        entry = out.setdefault(res.route, {"label": res.label, "ratios": {}, "slower_from_n": None, "estimated": []})
        entry["ratios"][str(res.n)] = res.ratio_to_autograd
        if res.status == "est":
            entry["estimated"].append(res.n)
    for name, entry in out.items():
        ns = sorted(int(k) for k in entry["ratios"])
        slower = [n for n in ns if entry["ratios"][str(n)] > 1.0]
        # the first N from which every measured larger N is slower than autograd
        start = None
        for i, n in enumerate(ns):
            if all(entry["ratios"][str(m)] > 1.0 for m in ns[i:]):
                start = n
                break
        entry["slower_from_n"] = start
        entry["slower_at_every_n"] = bool(ns) and len(slower) == len(ns)
        entry["faster_at_every_n"] = not slower
    return out
