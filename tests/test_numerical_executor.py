"""numerical_grad on executors (thread pools, remote workers whose buffers arrive unaligned), the
progress bar's count, the token structure's loss layouts and the randomized scalar route's in-place
check (from an audit; each test failed before its fix)."""

import copy
import pickle
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
import regrad._progress as progress_module  # noqa: E402
from regrad import NumericalError, numerical_grad  # noqa: E402


class _OutOfBandExecutor:
    """Each call and its result go through pickle protocol 5 with the buffers one byte off alignment."""

    @staticmethod
    def _roundtrip(obj):
        buffers = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        moved = []
        for b in buffers:
            raw = b.raw()
            block = bytearray(raw.nbytes + 1)
            block[1:] = raw
            moved.append(memoryview(block)[1:])
        return pickle.loads(data, buffers=moved)

    def map(self, fn, *iterables):
        return [self._roundtrip(fn(*self._roundtrip(args))) for args in zip(*iterables)]


def _scalar(data, lps):
    return float(sum(np.sum(np.sin(x) * x) for x in lps))


def _token(data, lps):
    return [np.sin(x) * x for x in lps]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kwargs",
    [{"method": "spsa", "num_samples": 6}, {"method": "gaussian", "num_samples": 6, "antithetic": False},
     {"method": "central"}, {"method": "spsa", "structure": "datum", "num_samples": 6},
     {"method": "central", "structure": "token"}, {"method": "richardson", "structure": "token"}],
)
def test_out_of_band_unaligned_executor_gives_sequential_bits(kwargs, dtype):
    rng = np.random.default_rng(5)
    lps = [rng.standard_normal(n).astype(dtype) for n in (5, 3, 7)]
    fn = {"token": _token, "datum": _datum}.get(kwargs.get("structure"), _scalar)
    ref = numerical_grad(fn, [0, 1, 2], lps, **kwargs)
    got = numerical_grad(fn, [0, 1, 2], lps, executor=_OutOfBandExecutor(), **kwargs)
    for a, b in zip(ref.grads + ref.error, got.grads + got.error):
        np.testing.assert_array_equal(a, b)


def _datum(d, x):
    return float(np.sum(np.sin(x) * x))


class _CopyingExecutor:
    """Each call on deep copies of its arguments, as a process or Dask executor would."""

    def map(self, fn, *iterables):
        return [copy.deepcopy(fn(*copy.deepcopy(args))) for args in zip(*iterables)]


@pytest.mark.parametrize("executor", ["threads", "copying"])
@pytest.mark.parametrize("method", ["central", "forward", "richardson"])
@pytest.mark.parametrize("dtypes", [(np.float64, np.float64, np.float32), (np.float32, np.float32, np.float16),
                                    (np.float64, np.float16, np.float32)])
def test_token_executor_mixed_loss_dtypes_same_as_sequential(dtypes, method, executor):
    rng = np.random.default_rng(3)
    lps = [rng.standard_normal(n).astype(dtypes[0]) for n in (5, 3, 7)]

    def fn(data, xs):
        return [(np.sin(x) * x).astype(dtypes[min(j, 2)]) for j, x in enumerate(xs)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seq = numerical_grad(fn, None, lps, structure="token", method=method)
        with ThreadPoolExecutor(2) as pool:
            ex = {"threads": pool, "copying": _CopyingExecutor()}[executor]
            got = numerical_grad(fn, None, lps, structure="token", method=method, executor=ex)
    for a, b in zip(seq.grads + seq.error, got.grads + got.error):
        np.testing.assert_array_equal(a, b)
    assert got.info == seq.info


@pytest.mark.parametrize("kwargs", [{}, {"method": "forward", "structure": "datum"},
                                    {"method": "spsa", "num_samples": 100}, {"method": "gaussian", "antithetic": False}])
def test_progress_counts_calls_with_an_executor(kwargs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain stderr line
    lps = [np.linspace(0.1, 1.0, 150), np.linspace(0.2, 1.0, 40)]
    with ThreadPoolExecutor(2) as pool:
        r = numerical_grad(lambda d, x: float(np.sum(np.sin(np.concatenate([np.ravel(v) for v in (x if isinstance(x, list) else [x])])))),
                           [0, 1], lps, progress=True, executor=pool, **kwargs)
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert last.endswith(f": {r.ncalls}/{r.ncalls} calls"), last


@pytest.mark.parametrize("vectorized", [False, True])
def test_token_structure_shows_progress_when_asked(vectorized, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    lps = [np.linspace(0.1, 1.0, 5)]
    numerical_grad(lambda d, xs: [np.sin(x) for x in xs], None, lps, structure="token", vectorized=vectorized,
                   method="richardson", progress=True)
    calls = 1 if vectorized else 4
    assert capsys.readouterr().err.strip().split("\r")[-1] == f"regrad numerical_grad (richardson, token): {calls}/{calls} calls"
    numerical_grad(lambda d, xs: [np.sin(x) for x in xs], None, lps, structure="token", vectorized=vectorized, progress=False)
    assert capsys.readouterr().err == ""


def test_token_structure_auto_progress(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(progress_module, "AUTO_SECONDS", 0.0)  # every run is predicted "long"
    numerical_grad(lambda d, xs: [np.sin(x) for x in xs], None, [np.linspace(0.1, 1.0, 5)], structure="token")
    assert "token): 2/2 calls" in capsys.readouterr().err


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("method", ["central", "forward", "richardson"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_token_float32_losses_same_bits_whatever_their_layout(kind, method, vectorized):
    rng = np.random.default_rng(0)
    lps = [rng.standard_normal(n).astype(np.float32) for n in (5, 3, 7)]
    if kind == "torch":
        lps = [torch.from_numpy(a) for a in lps]
    mod = torch if kind == "torch" else np

    def contiguous(data, xs):
        return [mod.sin(x) * x for x in xs]

    def strided(data, xs):  # the same values in non-contiguous memory
        out = []
        for x in xs:
            y = mod.sin(x) * x
            if x.ndim == 2:  # vectorized: [R, T]
                out.append(y.t().contiguous().t() if kind == "torch" else np.asfortranarray(y))
            else:
                out.append(mod.stack([y, y], -1)[..., 0])
        return out

    a = numerical_grad(contiguous, None, lps, structure="token", method=method, vectorized=vectorized)
    b = numerical_grad(strided, None, lps, structure="token", method=method, vectorized=vectorized)
    for x, y in zip(a.grads + a.error, b.grads + b.error):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "mode, kwargs",
    [("in_place", {}), ("in_place", {"structure": "datum"}), ("raises", {}), ("raises", {"structure": "datum"}),
     ("raises", {"method": "spsa", "num_samples": 64}), ("raises", {"structure": "token"})],
)
def test_thread_executor_stops_before_numerical_grad_returns(mode, kwargs):
    original = [torch.linspace(-1.0, 1.0, 40, dtype=torch.float64), torch.linspace(0.5, 1.5, 40, dtype=torch.float64)]
    lps = [t.clone() for t in original]
    returned = threading.Event()
    late = []
    calls = []

    def fn(*args):
        xs = args[1] if isinstance(args[1], list) else [args[1]]
        token = kwargs.get("structure") == "token"
        time.sleep(0.002)
        if returned.is_set():
            late.append(1)
        calls.append(1)
        if mode == "in_place":
            for x in xs:
                x.sub_(torch.logsumexp(x, 0))
        elif len(calls) == 1 if token else len(calls) == 3:
            raise ZeroDivisionError("boom")
        return [x * 1 for x in xs] if token else float(sum(x.sum() for x in xs))

    pool = ThreadPoolExecutor(2)
    try:
        with pytest.raises(NumericalError):
            numerical_grad(fn, [0, 1], lps, executor=pool, **kwargs)
        returned.set()
    finally:
        pool.shutdown(wait=True)
    assert not late, f"fn was called {len(late)} times after numerical_grad raised"
    for a, b in zip(lps, original):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["spsa", "gaussian"])
@pytest.mark.parametrize("structure", ["batch", "datum"])
def test_randomized_scalar_route_refuses_in_place_fn(method, structure):
    lps = [torch.linspace(-1, 1, 6, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64)]

    def fn(data, xs):
        x = xs[0] if isinstance(xs, list) else xs
        x.mul_(2.0)
        return float((x ** 2).sum())

    with pytest.raises(NumericalError, match="modified its input log-probs in place"):
        numerical_grad(fn, [0, 1], lps, method=method, structure=structure, num_samples=4)


# ---- process pickling (torch's ForkingPickler), without starting processes --------------------------

from multiprocessing.reduction import ForkingPickler  # noqa: E402


def _roundtrip(obj):
    return pickle.loads(ForkingPickler.dumps(obj))


class _ForkingPicklerExecutor:
    """Each call and its result through multiprocessing's ForkingPickler (torch's tensor reductions
    included, which move a CPU tensor's storage into shared memory in place), as
    concurrent.futures.ProcessPoolExecutor does, without starting processes."""

    def map(self, fn, *iterables):
        return [_roundtrip(_roundtrip(fn)(*_roundtrip(args))) for args in zip(*iterables)]


def _squares_and_sines(data, lps):  # top level: picklable, as process executors need
    return sum((lp ** 2).sum() + lp.sin().sum() for lp in lps)


def _token_squares(data, lps):
    return [lp ** 2 for lp in lps]


def _datum_squares(d, lp):
    return (lp ** 2).sum()


@pytest.mark.parametrize("structure", ["batch", "token", "datum"])
def test_process_pickler_moving_the_callers_tensors_leaves_the_run_exact(structure):
    """data holding the log-prob tensors themselves: pickling them for a process pool moves their storage
    into shared memory; the engine reads its own copies (it read the freed memory: a false "modified in
    place" error, wrong values or heap corruption)."""
    fn = {"batch": _squares_and_sines, "token": _token_squares, "datum": _datum_squares}[structure]

    def batch():
        return [torch.linspace(-1, 1, 6, dtype=torch.float64), torch.linspace(0, 2, 4, dtype=torch.float64)]

    ref = numerical_grad(fn, batch() if structure == "datum" else None, batch(), structure=structure)
    lps = batch()
    data = list(lps) if structure == "datum" else {"held": lps}
    got = numerical_grad(fn, data, lps, structure=structure, executor=_ForkingPicklerExecutor())
    for a, b in zip(ref.grads, got.grads):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(lps, batch()))  # the caller's values, wherever they live now


@pytest.mark.parametrize("requires", [(True, True, True), (True, False, True), (False, True, False)])
@pytest.mark.parametrize("method", ["central", "spsa"])
def test_numerical_wrapper_with_a_pickling_executor_same_bits_as_sequential(requires, method):
    """regrad.numerical with some tensors held fixed: backward's fn of the differentiated ones pickles by
    value (it was a closure carrying fn's name, a PicklingError for a process pool)."""
    def grads(executor):
        xs = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64).requires_grad_(r) for n, r in zip((4, 3, 5), requires)]
        options = {"method": method, "num_samples": 6} if method == "spsa" else {}
        if executor is not None:
            options["executor"] = executor
        wrapped = regrad.numerical(_squares_and_sines, **options)
        wrapped(None, xs).backward()
        return [x.grad for x in xs], wrapped.last_result

    ref, ref_result = grads(None)
    got, got_result = grads(_ForkingPicklerExecutor())
    assert got_result.info.get("wrt") == ref_result.info.get("wrt")
    for a, b in zip(ref, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_numerical_wrapper_process_executor_leaves_the_callers_fixed_tensors_in_place():
    """The tensors held fixed go to the workers as copies: the caller's (here a view sharing memory with
    the differentiated tensor) are not moved into shared memory by the process pickler."""
    base = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    x = base[:3].clone().requires_grad_(True)
    fixed = base[3:]
    address = fixed.data_ptr()
    regrad.numerical(_squares_and_sines, executor=_ForkingPicklerExecutor())(None, [x, fixed]).backward()
    assert fixed.data_ptr() == address and not fixed.is_shared()
    torch.testing.assert_close(x.grad, 2 * x.detach() + x.detach().cos(), rtol=1e-7, atol=1e-9)


def test_numerical_wrapper_errors_name_fn_when_some_tensors_require_grad():
    """fn of the differentiated tensors carries fn's name into the engine's errors."""
    def bad_later(data, lps):
        if lps[0].abs().max() > 0:
            raise ValueError("boom")
        return sum(lp.sum() for lp in lps)

    ok = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    loss = regrad.numerical(bad_later)(None, [ok, torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(regrad.NumericalError, match=r"fn '.*bad_later' raised ValueError: boom"):
        loss.backward()
