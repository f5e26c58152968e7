"""Randomized gradient estimators (SPSA with Rademacher directions, Gaussian smoothing).

Sample s perturbs every log-prob at once along direction u_s, whose components the C++ core
regenerates from (seed, s, element index) with Philox: nothing is stored, any order and any
executor give the same gradient for the same seed. With antithetic pairs (the default) sample s
costs f(x + c*u_s) and f(x - c*u_s) and estimates g_e = (f+ - f-) * u_e / (2 c_e); the result is
the mean over samples, with its variance (sample variance / num_samples) reported per element.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from . import _core
from ._evaluate import BufferPool, Problem, RandomWriter, Term, base_loss, block_chunk, fill_mapped
from ._progress import Progress
from .errors import InputError

DIRECTIONS = {"spsa": "rademacher", "gaussian": "gaussian"}
EXECUTOR_CHUNKS = 64
ESTIMATE_ELEMENTS = 1 << 18  # elements per random_estimate call (its results: 4 MiB)


def randomized_gradient(
    problem: Problem,
    terms: List[Term],
    method: str,
    scale: np.ndarray,
    seed: int,
    num_samples: int,
    antithetic: bool,
    vectorized: bool,
    max_batch_bytes: int,
    block_rows: Callable[[Problem, Term, int, int], int],
    executor: Any,
    progress: Optional[bool],
    taken: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, int, int, int, int]:
    """(grad, variance of the mean, nfev, ncalls, blocks, rows per block), packed float64 [n].
    `taken`: the perturbation scale the quotients divide by (SPSA: the half-width x +- scale actually
    spans in the working dtype); default `scale`."""
    taken = scale if taken is None else taken
    kind = DIRECTIONS[method]
    n = int(problem.offsets[-1])
    grad = np.zeros(n)
    variance = np.zeros(n)
    nq = num_samples * (2 if antithetic else 1)
    plan = [(t, block_rows(problem, t, nq, max_batch_bytes) if vectorized else 1) for t in terms]
    base_calls = not antithetic and problem.f0 is None  # fn at x once per term, unless the caller gave f0
    per_term_calls = [-(-nq // rows) + base_calls for _, rows in plan]  # calls to fn (rows is 1 with an executor)
    f = _losses(nq, num_samples, antithetic)  # one buffer for every term's losses, refused here if too large
    bar = Progress.for_run(sum(per_term_calls), progress, method, problem.structure)
    pool = BufferPool.shared()
    nfev = ncalls = blocks = max_rows = 0
    try:
        for term, rows in plan:
            f0 = 0.0
            if not antithetic:
                f0 = base_loss(problem, term, vectorized)
            if base_calls:
                nfev += 1
                ncalls += 1
                bar.update(1)
            writer = RandomWriter(scale, kind, seed, antithetic)
            if executor is None:
                block_chunk(problem, term, writer, 0, nq, rows, vectorized, pool, bar, f)
            else:
                spans = _chunks(nq)
                calls = [(problem, term, writer, q0, q1, 1, False) for q0, q1 in spans]
                fill_mapped(f, executor, block_chunk, calls, spans, problem, bar,
                            functools.partial(_span_where, writer, problem, term))
            _estimate(kind, seed, taken, term, f, num_samples, antithetic, f0, grad, variance)
            nfev += nq
            ncalls += -(-nq // rows)
            if vectorized:
                blocks += -(-nq // rows)
                max_rows = max(max_rows, rows)
    finally:
        bar.close()
        pool.release()
    return grad, variance, nfev, ncalls, blocks, max_rows


def _estimate(
    kind: str, seed: int, taken: np.ndarray, term: Term, f: np.ndarray, num_samples: int, antithetic: bool, f0: float,
    grad: np.ndarray, variance: np.ndarray,
) -> None:
    """The term's gradient and variance into grad and variance, by random_estimate calls of at most
    RandomWriter.PIECE direction components and ESTIMATE_ELEMENTS elements each: Ctrl-C, handled between
    calls, waited for the whole term before (5 s for 4M elements and 64 samples), and the call's two result
    arrays were as large as the term. An element's estimate reads only its own components and scale, so the
    bits are those of one call."""
    step = max(1, min(RandomWriter.PIECE // num_samples, ESTIMATE_ELEMENTS))
    for e0 in range(term.e0, term.e1, step):
        e1 = min(e0 + step, term.e1)
        grad[e0:e1], variance[e0:e1] = _core.random_estimate(kind, seed, taken[e0:e1], e0, f, antithetic, f0)


def _losses(nq: int, num_samples: int, antithetic: bool) -> np.ndarray:
    """The float64 buffer for one term's nq losses; a num_samples too large to hold them is named
    (numpy's own error says only "Maximum allowed dimension exceeded" or "Unable to allocate")."""
    try:
        return np.empty(nq)
    except (MemoryError, ValueError):
        raise InputError(
            f"num_samples={num_samples} needs {nq} loss evaluations{' (antithetic pairs)' if antithetic else ''}, "
            f"whose float64 losses ({nq * 8:.3g} bytes) cannot be allocated; use fewer samples"
        ) from None


def _span_where(writer: RandomWriter, problem: Problem, term: Term, q0: int, q1: int) -> str:
    """Perturbations [q0, q1) of a term, for errors about an executor's chunk of them."""
    return writer.describe(problem, term, q0, q1 - q0)


def _chunks(total: int) -> List[Tuple[int, int]]:
    size = max(1, -(-total // EXECUTOR_CHUNKS))
    return [(q, min(q + size, total)) for q in range(0, total, size)]
