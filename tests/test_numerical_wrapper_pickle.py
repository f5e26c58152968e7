"""regrad.numerical's wrapper across process boundaries and copies, and the automatic progress bar with an
executor (from an audit; each test failed before its fix)."""

import concurrent.futures as cf
import copy
import multiprocessing as mp
import pickle
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from _pickling import FORK, _CodedError, run_backward as _run, two_lps as _lps, without_tblib  # noqa: E402
import regrad._progress as progress_module  # noqa: E402
from regrad import NumericalError, RegularizerError, numerical_grad  # noqa: E402


@pytest.fixture(autouse=True)
def _without_tblib(monkeypatch):
    """Errors by their own rules, whatever an earlier test imported (see _pickling)."""
    without_tblib(monkeypatch, RegularizerError, NumericalError)


def _cubes(data, lps):
    return float(sum(np.sum(np.asarray(lp, np.float64) ** 3) for lp in lps)), {"n": 2.0}


def _cubes_failing_off_x(data, lps):
    if float(lps[0][0]) != -1.0:  # forward's call is fine, the backward's perturbed copies fail
        raise _CodedError(7, "bad batch")
    return float(sum(np.sum(np.asarray(lp) ** 3) for lp in lps))


def _wrapper():
    return regrad.numerical(_cubes, method="richardson", step=[np.full(3, 1e-3), np.full(2, 2e-3)])


def _failing_backward(_):
    regrad.numerical(_cubes_failing_off_x)([None, None], _lps()).backward()


# ---- regrad.numerical's wrapper through pickle and copy


def test_numerical_wrapper_pickles_after_use_and_gives_the_same_bits():
    wrapped = _wrapper()
    expected = _run(wrapped)
    assert wrapped.last_result is not None
    back = pickle.loads(pickle.dumps(wrapped))  # "Can't pickle <function _cubes ...>: it's not the same object as"
    assert repr(back) == repr(wrapped) and back.__name__ == "_cubes" and back.last_result is None
    assert back.options.keys() == wrapped.options.keys() and back.options["method"] == "richardson"
    assert all(np.array_equal(a, b) for a, b in zip(back.options["step"], wrapped.options["step"]))
    assert _run(back) == expected and back.last_result.method == "richardson"


def test_numerical_wrapper_copies_are_objects_of_their_own():
    wrapped = _wrapper()
    expected = _run(wrapped)
    shallow, deep = copy.copy(wrapped), copy.deepcopy(wrapped)  # (the same function before: one last_result)
    for other in (shallow, deep):
        assert other is not wrapped and other.last_result is None and repr(other) == repr(wrapped)
        assert _run(other) == expected and other.last_result is not wrapped.last_result
    assert shallow.options["step"] is wrapped.options["step"] and deep.options["step"] is not wrapped.options["step"]
    with cf.ThreadPoolExecutor(2) as pool:  # an executor is shared by a deep copy, not copied (its lock)
        threaded = regrad.numerical(_cubes, executor=pool)
        deep = copy.deepcopy(threaded)
        assert deep is not threaded and deep.options["executor"] is pool and _run(deep) == _run(threaded)


def test_composed_loss_with_a_numerical_term_pickles():
    loss_fn = regrad.compose(_wrapper(), [regrad.l1(0.1)])
    expected = _run(loss_fn)
    back = pickle.loads(pickle.dumps(loss_fn))
    assert repr(back) == repr(loss_fn) and _run(back) == expected
    for fn in (loss_fn, back):
        fn.close()


def test_numerical_wrapper_of_a_fn_that_does_not_pickle_names_fn():
    class LocalLoss:  # a callable object has no __qualname__ of its own: pickle named 'numerical.<locals>.wrapped'
        def __call__(self, data, lps):
            return 0.0

    def local_loss(data, lps):
        return 0.0

    # pickle's own errors (AttributeError for a local object on 3.11, PicklingError on later versions)
    for fn, name in ((LocalLoss(), "LocalLoss"), (local_loss, "local_loss"), (lambda data, lps: 0.0, "<lambda>")):
        with pytest.raises((pickle.PicklingError, AttributeError), match=name):
            pickle.dumps(regrad.numerical(fn))


@FORK[0]
@FORK[1]
def test_numerical_wrapper_shipped_to_a_process_worker_gives_the_same_bits():
    wrapped = _wrapper()
    expected = _run(wrapped)
    composed = regrad.compose(_wrapper(), [regrad.l1(0.1)])
    composed_expected = _run(composed)
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        assert pool.submit(_run, wrapped).result(timeout=60) == expected
        assert pool.submit(_run, composed).result(timeout=60) == composed_expected
        with pytest.raises(NumericalError, match=r"'_cubes_failing_off_x' raised _CodedError: code 7: bad batch"):
            pool.submit(_failing_backward, 0).result(timeout=60)
    composed.close()


# ---- the automatic progress bar with an executor (fake time: no wall-clock)


class _ClockedExecutor:
    """Runs each chunk in the caller's thread and hands it back `first` (fake) seconds after the start (a
    fresh pool's start-up), each later one `each` seconds after the one before."""

    def __init__(self, clock, first, each):
        self.clock, self.first, self.each = clock, first, each

    def map(self, fn, *iterables):
        for k, args in enumerate(zip(*iterables)):
            self.clock[0] += self.first if k == 0 else self.each
            yield fn(*args)


def _sines(data, lps):
    return float(sum(np.sum(np.sin(lp)) for lp in lps))


def _token_sines(data, lps):
    return [np.sin(lp) for lp in lps]


@pytest.mark.parametrize("kwargs", [{}, {"method": "spsa", "num_samples": 100}, {"structure": "datum"},
                                    {"structure": "token", "method": "richardson"}])
def test_auto_progress_with_an_executor_is_timed_after_its_start_up(kwargs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain stderr line
    clock = [0.0]
    monkeypatch.setattr(progress_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    fn = _token_sines if kwargs.get("structure") == "token" else _sines
    lps = [np.linspace(-1.0, -0.1, 100), np.linspace(-2.0, -0.5, 20)]
    # 1 s of start-up, then 1 ms per chunk: a short run (the first chunk predicted it at 4-64 s, and showed a bar)
    numerical_grad(fn, [0, 1], lps, executor=_ClockedExecutor(clock, 1.0, 0.001), **kwargs)
    assert capsys.readouterr().err == ""
    # a slow run still shows the bar, counting every call
    r = numerical_grad(fn, [0, 1], lps, executor=_ClockedExecutor(clock, 1.0, 2.0), **kwargs)
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert last.endswith(f": {r.ncalls}/{r.ncalls} calls"), last
