"""numerical_grad on executors: the first failing chunk ends the run at once (not after every chunk before
it), a process worker that fn killed is named as fn's failure, and an executor whose submit returns no
Future is named (from an audit; each failed before its fix, except the lowest-numbered-error test, which
pins the documented choice)."""

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from regrad import InputError, NumericalError, numerical_grad
from _pickling import FORK  # noqa: E402


class _NotesCancels(ThreadPoolExecutor):
    """A thread pool that sets `cancelled` when one of its futures is cancelled (map's and submit's alike)."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.cancelled = threading.Event()

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        future.add_done_callback(lambda f: f.cancelled() and self.cancelled.set())
        return future


@pytest.mark.parametrize("options", [{}, {"structure": "token", "method": "richardson"}])
def test_a_later_chunk_failing_stops_the_run_while_earlier_chunks_still_run(options):
    """Chunk 1 fails at once while chunk 0 (and the chunk the other worker takes next) wait in their first call
    of fn until the run cancels its chunks not yet started. Before, results were read in order: the run
    noticed chunk 1's error only after chunk 0 had made all its calls, so chunk 0 waited out its guard."""
    token = options.get("structure") == "token"
    x0 = np.zeros(128)  # central, batch: 256 perturbations, 64 chunks of 4 (2 tokens each)
    calls, guard_expired, lock = {}, [], threading.Lock()

    with _NotesCancels(2) as pool:

        def fn(data, lps):
            d = lps[0] - x0
            if token:  # richardson's 4 calls (chunks): +h, -h, +h/2, -h/2
                chunk = (0 if d[0] > 0 else 1) + (2 if abs(d[0]) < 0.75e-3 else 0)  # (step=1e-3)
            else:
                chunk = int(np.flatnonzero(d)[0]) // 2
            with lock:
                calls[chunk] = calls.get(chunk, 0) + 1
                first = calls[chunk] == 1
            if chunk == 1:
                raise ValueError("chunk 1 failed")
            if first and not pool.cancelled.wait(5):  # (a guard: fails the test instead of hanging it)
                guard_expired.append(chunk)
                pool.cancelled.set()  # the other waiting chunk goes on too
            return [x * x for x in lps] if token else float(np.sum(lps[0] ** 2))

        with pytest.raises(NumericalError, match=r"chunk 1 failed \(at (perturbation 4 of 256: datum 0, token 2, "
                                                 r"step \+h|every log-prob at step -h \(call 2 of 4\))\)"):
            numerical_grad(fn, None, [x0.copy()], executor=pool, step=1e-3, **options)
        with lock:
            at_raise = dict(calls)
    assert guard_expired == [], f"chunks {guard_expired} ran on until chunk 1's error was read"
    assert at_raise[0] == 1  # chunk 0 stopped before its next call (it has 4 without the token structure)
    assert set(at_raise) <= {0, 1, 2}  # the chunk the other worker took next; the rest were cancelled
    assert calls == at_raise  # nothing called fn after the error reached the caller


_X = np.linspace(-1.0, -0.1, 8)


def _ends_its_process_at_token_2_minus_h(data, lps):  # top level: process pools pickle it
    if lps[0][2] < _X[2]:  # perturbation 5 of 16 (central): token 2, step -h
        os._exit(1)
    return float(np.sum(lps[0] ** 2))


@FORK[0]
@FORK[1]
def test_a_process_worker_that_fn_ends_is_named_as_fns_failure():
    """One worker, chunks of one perturbation each: the worker dies at perturbation 5, the first chunk not
    finished then. Before, the caller got the pool's bare BrokenProcessPool, naming neither fn nor where."""
    from concurrent.futures.process import BrokenProcessPool

    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        with pytest.raises(NumericalError) as info:
            numerical_grad(_ends_its_process_at_token_2_minus_h, None, [_X.copy()], executor=pool)
    message = str(info.value)
    assert message.startswith("fn '_ends_its_process_at_token_2_minus_h' did not return: a worker process of "
                              "executor ProcessPoolExecutor died (BrokenProcessPool: "), message
    assert "(at perturbation 5 of 16: datum 0, token 2, step -h, the first chunk not finished then" in message
    assert isinstance(info.value.__cause__, BrokenProcessPool)


class _RunsAtSubmit(cf.Executor):
    """Runs each call when it is submitted: every chunk has finished before the first result is read."""

    def submit(self, fn, *args, **kwargs):
        future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


class _MapOnly(cf.Executor):
    """An Executor subclass that implements map only (its submit is Executor's, which raises)."""

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return list(map(fn, *iterables))


@pytest.mark.parametrize("executor", [_RunsAtSubmit, _MapOnly])
def test_of_several_failed_chunks_the_lowest_numbered_is_raised(executor):
    """The documented choice (docs/numerical.md, executor): of the chunks found failed when the run notices a
    failure, the lowest-numbered; and an Executor subclass with map only gets its chunks through map."""
    x0 = np.zeros(128)

    def fn(data, lps):
        e = int(np.flatnonzero(lps[0] != x0)[0])
        if e in (10, 40):  # chunks 5 and 20 of 64
            raise ValueError(f"token {e}")
        return float(np.sum(lps[0] ** 2))

    with pytest.raises(NumericalError, match=r"token 10 \(at perturbation 20 of 256: datum 0, token 10, step \+h\)"):
        numerical_grad(fn, None, [x0.copy()], executor=executor())
    assert numerical_grad(lambda d, lps: float(np.sum(lps[0] ** 2)), None, [x0.copy()], executor=executor()).grads[0][0] == 0.0


class _NoFutures(cf.Executor):
    """An Executor subclass whose submit hands back something that is not a Future."""

    def submit(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def test_an_executor_whose_submit_returns_no_future_is_named():
    """Before: Executor.map's own loop failed on it with "AttributeError: 'tuple' object has no attribute 'result'"."""
    with pytest.raises(InputError, match="executor _NoFutures.submit returned tuple, not a concurrent.futures.Future"):
        numerical_grad(lambda d, lps: float(np.sum(lps[0] ** 2)), None, [np.zeros(4)], executor=_NoFutures())
