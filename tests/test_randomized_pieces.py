"""Ctrl-C granularity and peak memory of the randomized estimators (from an audit, 2026-11-25): the core's RNG
loops ran as one call per term (random_estimate: 5 s for 4M log-probs with 64 samples; random_block: 0.6 s for
a 16M-element Gaussian copy), and Python handles Ctrl-C only between calls. They now run in pieces of bounded
work with the same bits. The peak-memory test failed before its fix too (20x the float32 input, now 10x)."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest

from regrad import _core, numerical_grad
from regrad._evaluate import RandomWriter

_randomized = importlib.import_module("regrad._randomized")


def _fn(data, lps):  # scalar: the loss of one perturbed copy
    return float(sum(np.sum(np.sin(np.asarray(x, np.float64))) for x in lps))


def _vfn(data, lps):  # vectorized: one loss per perturbed copy
    return sum(np.sin(np.asarray(x, np.float64)).reshape(x.shape[0], -1).sum(1) for x in lps)


def _lps(dtype, width=None):
    rng = np.random.default_rng(5)
    return [rng.normal(size=(t,) if width is None else (t, width)).astype(dtype) for t in (40, 0, 130, 7)]


def _run(dtype, method, antithetic, vectorized, structure="batch", width=None):
    fn = _vfn if vectorized else _fn
    if structure == "datum":
        fn = (lambda d, x: _vfn(None, [x])) if vectorized else (lambda d, x: _fn(None, [x]))
    r = numerical_grad(fn, [0] * 4, _lps(dtype, width), method=method, antithetic=antithetic, vectorized=vectorized,
                       structure=structure, num_samples=5, seed=9)
    return np.concatenate([g.reshape(-1) for g in r.grads]), np.concatenate([v.reshape(-1) for v in r.variance])


class _Counting:
    """Wraps a _core function: counts its calls and raises KeyboardInterrupt (Ctrl-C) at call `interrupt_at`."""

    def __init__(self, real, interrupt_at=None):
        self.real, self.interrupt_at, self.calls = real, interrupt_at, []

    def __call__(self, *args):
        self.calls.append(args)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return self.real(*args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["spsa", "gaussian"])
@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("vectorized", [False, True])
def test_randomized_pieces_give_the_bits_of_one_call(monkeypatch, dtype, method, antithetic, vectorized):
    # huge pieces: one random_block per block and one random_estimate per term, as before; tiny ones split every
    # copy inside data and across them, and the estimate into 3-element ranges: the same bits
    monkeypatch.setattr(RandomWriter, "PIECE", 1 << 62, raising=False)
    monkeypatch.setattr(_randomized, "ESTIMATE_ELEMENTS", 1 << 62, raising=False)
    whole = _run(dtype, method, antithetic, vectorized)
    monkeypatch.setattr(RandomWriter, "PIECE", 11, raising=False)
    monkeypatch.setattr(_randomized, "ESTIMATE_ELEMENTS", 3, raising=False)
    estimates = _Counting(_core.random_estimate)
    monkeypatch.setattr(_core, "random_estimate", estimates)
    pieces = _run(dtype, method, antithetic, vectorized)
    assert len(estimates.calls) == -(-177 // 2)  # 177 elements in one term, 2 per piece (11 // 5 samples)
    assert np.array_equal(whole[0], pieces[0]) and np.array_equal(whole[1], pieces[1])


@pytest.mark.parametrize("structure,width", [("datum", None), ("batch", 3), ("datum", 3)])
def test_randomized_pieces_give_the_bits_of_one_call_per_datum_and_for_columns(monkeypatch, structure, width):
    monkeypatch.setattr(RandomWriter, "PIECE", 1 << 62, raising=False)
    monkeypatch.setattr(_randomized, "ESTIMATE_ELEMENTS", 1 << 62, raising=False)
    whole = [_run(np.float32, m, True, v, structure, width) for m in ("spsa", "gaussian") for v in (False, True)]
    monkeypatch.setattr(RandomWriter, "PIECE", 4, raising=False)
    monkeypatch.setattr(_randomized, "ESTIMATE_ELEMENTS", 2, raising=False)
    pieces = [_run(np.float32, m, True, v, structure, width) for m in ("spsa", "gaussian") for v in (False, True)]
    for (g0, v0), (g1, v1) in zip(whole, pieces):
        assert np.array_equal(g0, g1) and np.array_equal(v0, v1)


def test_ctrl_c_during_the_estimate_stops_before_its_next_piece(monkeypatch):
    # before: one random_estimate call for the whole term (5 s for 4M log-probs and 64 samples), with Ctrl-C
    # handled only after it; now Ctrl-C (here raised at the second piece) ends the run there
    monkeypatch.setattr(RandomWriter, "PIECE", 64, raising=False)
    estimates = _Counting(_core.random_estimate, interrupt_at=2)
    monkeypatch.setattr(_core, "random_estimate", estimates)
    with pytest.raises(KeyboardInterrupt):
        numerical_grad(_vfn, None, [np.linspace(-3, -1, 1000)], method="spsa", num_samples=4, vectorized=True)
    assert len(estimates.calls) == 2  # no piece after the interrupted one
    assert estimates.calls[0][2].size == 16  # (64 components per piece: 16 elements of 4 samples each)


def test_ctrl_c_while_writing_a_large_copy_stops_before_fn_is_called(monkeypatch):
    # a perturbed copy past PIECE elements is written in pieces: Ctrl-C lands inside the first copy (fn never
    # called), not after it; the next run gets its buffers back and the same bits
    monkeypatch.setattr(RandomWriter, "PIECE", 100, raising=False)
    x = [np.linspace(-3, -1, 700), np.linspace(-2, 0, 300)]
    calls = []

    def fn(data, lps):
        calls.append(1)
        return _fn(data, lps)

    ref = numerical_grad(fn, None, x, method="gaussian", num_samples=3, seed=1)
    calls.clear()
    blocks = _Counting(_core.random_block, interrupt_at=2)
    monkeypatch.setattr(_core, "random_block", blocks)
    with pytest.raises(KeyboardInterrupt):
        numerical_grad(fn, None, x, method="gaussian", num_samples=3, seed=1)
    assert calls == [] and len(blocks.calls) == 2
    monkeypatch.setattr(_core, "random_block", blocks.real)
    again = numerical_grad(fn, None, x, method="gaussian", num_samples=3, seed=1)
    for a, b in zip(ref.grads + ref.variance, again.grads + again.variance):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("method", ["spsa", "gaussian"])
def test_randomized_peak_memory_is_about_ten_times_a_float32_input(method):
    # x as float64, sigma, the taken half-widths, the [2, n] central points and steps, and the estimate's two
    # result arrays were all held at once: 80 bytes per float32 log-prob (20x the input) for spsa, 72 for gaussian.
    # The points and steps now die once the half-widths are taken and the estimate runs in pieces: 40 (10x).
    x = [np.linspace(-4.0, -0.5, 1 << 18, dtype=np.float32)]
    run = lambda: numerical_grad(lambda d, l: float(l[0][0]), None, x, method=method, num_samples=2, progress=False)
    run()  # this thread's block buffer (kept between runs) is not what is measured
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        run()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()
    assert peak < 14 * x[0].nbytes, f"peak {peak / x[0].nbytes:.1f}x the input"

