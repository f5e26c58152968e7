"""Ctrl-C and cancellation in numerical_grad's executor chunks and in compose (from an audit; each test
failed before its fix)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec, numerical_grad  # noqa: E402


class _CtrlCWhileWaiting:
    """A thread pool whose results the caller waits for until fn has started, and then gets Ctrl-C there
    (as a real SIGINT interrupts that wait), while the chunks already started go on on the pool."""

    def __init__(self, pool: ThreadPoolExecutor, started: threading.Event) -> None:
        self.pool, self.started = pool, started

    def map(self, func, *iterables):
        self.pool.map(func, *iterables)  # the chunks start on the pool's threads

        def results():
            self.started.wait(10)
            raise KeyboardInterrupt
            yield  # (a generator)

        return results()


@pytest.mark.parametrize("options", [{}, {"structure": "datum"}, {"method": "spsa", "num_samples": 640}])
def test_ctrl_c_stops_running_executor_chunks_at_their_next_call(options):
    started, calls = threading.Event(), []

    def fn(data, lps):  # 50 ms a call: a chunk is 1/64 of the run, 20 calls (1 s) here
        calls.append(1)
        started.set()
        time.sleep(0.05)
        return float(sum(np.sum(x * x) for x in lps))

    fn_of = (lambda d, x: fn(None, [x])) if options.get("structure") == "datum" else fn
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(KeyboardInterrupt):
            numerical_grad(fn_of, [0], [np.zeros(640)], executor=_CtrlCWhileWaiting(pool, started), **options)
        at_raise = len(calls)
        time.sleep(0.05)
    assert len(calls) == at_raise  # nothing called fn after Ctrl-C reached the caller
    # before: both running chunks made all their calls (40); now each stops after the call it is in (a
    # loaded host may let a few more start before the caller's Ctrl-C sets the stop)
    assert at_raise < 20, f"the running chunks made {at_raise} calls before Ctrl-C reached the caller"


_NEEDS_SIGINT = pytest.mark.skipif(
    not hasattr(signal, "pthread_kill") or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs pthread_kill and Python's own SIGINT handler")


def _zeros(data, lps):
    return [np.zeros_like(x) for x in lps]


def _ctrl_c_inside_a_running_loop(loss_fn, lps, started: threading.Event, after: float) -> None:
    """Calls loss_fn.evaluate synchronously inside a running loop (Tinker's, a Jupyter cell's: a helper thread
    runs it) and sends this thread SIGINT `after` s once `started` is set; KeyboardInterrupt must reach the
    caller."""

    def ctrl_c() -> None:
        if started.wait(10):
            time.sleep(after)  # the caller is now blocked in the call
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    async def main():
        loss_fn.evaluate([0], lps)

    sender = threading.Thread(target=ctrl_c)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(main())
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(task)
        assert isinstance(task.exception(), KeyboardInterrupt)
    finally:
        sender.join()
        loop.close()
        loss_fn.close()


@_NEEDS_SIGINT
def test_ctrl_c_in_a_composed_loss_called_inside_a_running_loop_cancels_its_terms():
    started, seen = threading.Event(), []

    async def stuck(data, lps):  # a verifier that does not answer (timeout=None waits forever)
        started.set()
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("finished")
        return 1.0, {}

    loss_fn = regrad.compose(None, [RegularizerSpec.async_("stuck", 1.0, stuck, timeout=None, grad_fn=_zeros)])
    _ctrl_c_inside_a_running_loop(loss_fn, [np.zeros(3)], started, 0.2)
    assert seen == ["cancelled"], seen  # before: the caller got Ctrl-C only once the term had finished


@_NEEDS_SIGINT
def test_ctrl_c_inside_a_running_loop_stops_the_sync_terms_run_inline_by_the_helper():
    """parallel=False: the helper's loop runs the sync terms inline, where task.cancel() cannot reach them;
    Ctrl-C waited for every sync term (all numerical evaluations: 2.3 s here) before it reached the caller."""
    started, calls = threading.Event(), {"numerical": 0, "plain": 0}

    def slow(data, lps):  # 0.2 s an evaluation, 9 evaluations
        calls["numerical"] += 1
        started.set()
        time.sleep(0.2)
        return float(sum(np.sum(np.asarray(x) ** 2) for x in lps))

    def plain(data, lps):
        calls["plain"] += 1
        time.sleep(0.5)
        return 0.0

    async def other(data, lps):
        return 0.0

    loss_fn = regrad.compose(None, [RegularizerSpec.sync("slow", 1.0, slow, grad="numerical", progress=False),
                                    RegularizerSpec.with_grad("plain", 1.0, plain, _zeros),
                                    RegularizerSpec.async_("other", 1.0, other, grad_fn=_zeros)], parallel=False)
    _ctrl_c_inside_a_running_loop(loss_fn, [np.zeros(4)], started, 0.1)
    # before: every evaluation (9) and the plain term ran first; a loaded host may let one or two more start
    assert calls["plain"] == 0 and calls["numerical"] <= 5, calls


@pytest.mark.parametrize("parallel", [True, False])
def test_a_sync_terms_own_cancelled_error_is_a_regularizer_error(parallel):
    def cancelled(data, lps):  # e.g. asyncio.run(...) inside fn, of a coroutine that awaited a cancelled task
        raise asyncio.CancelledError

    def other(data, lps):
        return float(sum(np.sum(np.asarray(x) ** 2) for x in lps)), {}

    lps = [np.linspace(-1.0, 0.0, 4), np.linspace(-2.0, -1.0, 3)]
    for with_async in (False, True):
        regs = [RegularizerSpec.sync("c", 1.0, cancelled), RegularizerSpec.sync("o", 1.0, other, grad="numerical")]
        if with_async:
            async def aother(data, lps):
                return other(data, lps)

            regs.append(RegularizerSpec.async_("a", 1.0, aother, grad="numerical"))
        with regrad.compose(None, regs, parallel=parallel) as loss_fn:
            with pytest.raises(RegularizerError, match="'c'.*CancelledError") as info:
                loss_fn.evaluate([0, 1], lps)
            assert info.value.name == "c"
            # `cause` is __cause__, as for every term error; fn's CancelledError is the cause's own cause
            assert info.value.__cause__ is info.value.cause
            assert isinstance(info.value.cause.__cause__, asyncio.CancelledError)

            async def inside_a_task():  # fn's CancelledError must not read as this task's cancellation
                with pytest.raises(RegularizerError, match="'c'"):
                    await loss_fn.aevaluate([0, 1], lps)
                await asyncio.sleep(0)  # this task was not cancelled
                return "done"

            assert asyncio.run(inside_a_task()) == "done"


def test_ctrl_c_raised_by_an_async_term_logs_no_unretrieved_task_error(caplog):
    async def interrupted(data, lps):
        raise KeyboardInterrupt

    loss_fn = regrad.compose(None, [RegularizerSpec.async_("k", 1.0, interrupted,
                                                           grad_fn=lambda d, lps: [np.zeros_like(x) for x in lps])])
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(KeyboardInterrupt):
            loss_fn.evaluate([0], [np.zeros(3)])
        gc.collect()  # (asyncio logs an unretrieved exception when the task is collected)
    assert "never retrieved" not in caplog.text
    loss_fn.close()
