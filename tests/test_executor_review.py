"""Regressions found auditing the session's executor, wrapper, layout and size changes (2026-11-25)."""

import concurrent.futures as cf
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from regrad import numerical_grad


class _Recording(ThreadPoolExecutor):
    """A thread pool that keeps the futures it hands out."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.futures = []

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        self.futures.append(future)
        return future


def test_a_run_queued_behind_other_work_sees_its_pool_shut_down_with_cancel_futures():
    """shutdown(cancel_futures=True) only cancel()s the queued futures, which wakes no as_completed waiter: a
    run whose next chunk was queued behind the pool's other work waited forever. map's Future.result (the
    route before the submit one) raised CancelledError, as this does now."""
    pool, release, outcome = _Recording(1), threading.Event(), []
    pool.submit(release.wait)  # the pool's other work

    def run():
        try:
            numerical_grad(lambda d, lps: float(np.sum(lps[0] ** 2)), None, [np.zeros(8)], executor=pool)
        except BaseException as err:  # noqa: B036 (the test reads it)
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for _ in range(1000):  # the other work and the run's 16 chunks, queued
            if len(pool.futures) == 17:
                break
            thread.join(0.01)
        assert len(pool.futures) == 17
        pool.shutdown(wait=False, cancel_futures=True)
        release.set()
        thread.join(10)
        assert not thread.is_alive(), "the run still waits for chunks its pool cancelled"
        assert len(outcome) == 1 and isinstance(outcome[0], CancelledError)
    finally:  # (on failure: wake the waiting run, so no thread is left behind)
        release.set()
        for future in pool.futures:
            if future.cancelled():
                try:
                    future.set_running_or_notify_cancel()
                except RuntimeError:  # (already notified)
                    pass
        thread.join(10)


def _fails_at_token_3(data, lps):
    if lps[0][3] != 0.5:
        raise ValueError("token 3")
    return 0.0


def test_a_failed_run_on_dask_logs_no_tornado_errors():
    """Cancelling the futures that Dask's ClientExecutor.submit hands back (what a failed run does with the
    rest) made Dask's event loop log a tornado ERROR traceback for each chunk that finished meanwhile
    (FutureCancelledError from its gather, InvalidStateError setting a cancelled future's result): most
    failed runs printed some. Its map route, used before, cancels Dask's own futures: nothing logged."""
    import logging

    from regrad import NumericalError

    distributed = pytest.importorskip("distributed")
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep, logger = _Keep(logging.ERROR), logging.getLogger("tornado.application")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        logger.addHandler(keep)
        try:
            executor = client.get_executor()
            for _ in range(20):  # (a race: the current code logs in most runs; 20 without one are ~1e-5)
                with pytest.raises(NumericalError, match="token 3"):
                    numerical_grad(_fails_at_token_3, None, [np.full(64, 0.5)], executor=executor)
                time.sleep(0.05)  # (the event loop runs the cancelled chunks' cascades)
                if records:
                    break
        finally:
            logger.removeHandler(keep)
    assert records == []


class _Deferred:
    """A future of another library's kind (as Dask's own Future): result() and cancel(), not a cf.Future."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self, timeout=None):
        return self.fn(*self.args)

    def cancel(self):
        return False


class _DuckSubmits(cf.Executor):
    """A thin Executor adapter whose submit hands back another library's futures (Executor.map read them)."""

    def submit(self, fn, *args, **kwargs):
        return _Deferred(fn, args)


def test_an_executor_whose_submit_returns_another_librarys_futures_still_runs():
    """Executor.map, the route before 2026-11-25, only calls result() and cancel() on what submit returns (a
    Dask Future from `client.submit` worked); the submit route refused anything but a cf.Future."""
    from regrad import NumericalError

    x = [np.linspace(-2.0, -0.1, 8)]
    fn = lambda d, lps: float(np.sum(np.sin(lps[0])))  # noqa: E731
    mapped = numerical_grad(fn, None, x, executor=_DuckSubmits())
    assert np.array_equal(mapped.grads[0], numerical_grad(fn, None, x).grads[0])

    def fails(d, lps):
        if lps[0][5] != x[0][5]:
            raise ValueError("token 5")
        return 0.0

    with pytest.raises(NumericalError, match=r"token 5 \(at perturbation 10 of 16: datum 0, token 5, step \+h\)"):
        numerical_grad(fails, None, x, executor=_DuckSubmits())
