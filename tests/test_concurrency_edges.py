"""Concurrency edge cases (from an audit; each test failed before its fix): a composed call's
background terms after it failed, forked children (multiprocessing's default start method on Linux),
and a loss_fn waiting on its own client."""

import multiprocessing as mp
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec  # noqa: E402

# Python 3.12+ warns about fork() in a process with threads; the tests fork on purpose.
_FORK = [
    pytest.mark.skipif(sys.platform != "linux", reason="fork start method"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


# ---- A term still running in the background after its composed call failed must not write the caller's
# memory afterwards (docs/compose.md: it "finishes in the background with its result discarded").


def _zeros(d, lp):
    return [np.zeros(tuple(x.shape)) for x in lp]


def _run(make_lps, slow_spec, started, release, write_new):
    done = threading.Event()

    def fails(d, lp):
        assert started.wait(10)  # fail once the sibling runs
        raise RuntimeError("boom")

    def on_event(e):
        if e.name == "b" and e.phase in ("stop", "exception"):
            done.set()

    lps = make_lps()
    loss_fn = regrad.compose(None, [RegularizerSpec.with_grad("a", 1.0, fails, _zeros), slow_spec],
                             max_workers=2, on_event=on_event)
    with pytest.raises(RegularizerError, match="'a'.*boom"):
        loss_fn.evaluate([None, None], lps)
    write_new(lps)  # the caller owns its memory again: e.g. the next step's log-probs written in place
    release.set()
    assert done.wait(10)
    loss_fn.close()
    return lps


def test_background_user_term_does_not_put_old_values_back_after_the_call_failed():
    started, release = threading.Event(), threading.Event()

    def slow(d, lp):
        started.set()
        assert release.wait(10)
        return 0.0

    lps = _run(lambda: [np.full(4, -1.0), np.full(3, -2.0)], RegularizerSpec.with_grad("b", 1.0, slow, _zeros),
               started, release, lambda lps: lps[0].__setitem__(slice(None), -0.5))
    np.testing.assert_array_equal(lps[0], np.full(4, -0.5))


def test_background_numerical_term_does_not_put_old_values_back_after_the_call_failed():
    started, release = threading.Event(), threading.Event()
    calls = []

    def cubic(d, lp):  # numpy-based: the numerical route
        calls.append(1)
        if len(calls) == 2:  # the first perturbed evaluation is running when the call fails
            started.set()
            assert release.wait(10)
        return float(sum(np.sum(np.asarray(x) ** 3) for x in lp))

    def write_new(lps):
        with torch.no_grad():
            lps[0].fill_(-0.5)

    lps = _run(lambda: [torch.full((4,), -1.0, dtype=torch.float64), torch.full((3,), -2.0, dtype=torch.float64)],
               RegularizerSpec.sync("b", 1.0, cubic, grad="numerical"), started, release, write_new)
    assert torch.equal(lps[0], torch.full((4,), -0.5, dtype=torch.float64))


# ---- regrad used in a process, then in a child forked from it (multiprocessing's default start method on
# Linux): the child must not hang.


def _in_forked_child(target, *args, timeout=10.0):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    proc.join(timeout)
    hung = proc.is_alive()
    if hung:
        proc.kill()
        proc.join()
    assert not hung, "the forked child hung"
    return queue.get(timeout=5)


def _cubic(d, lp):
    return float(sum(np.sum(np.asarray(x) ** 3) for x in lp))


def _square(d, lp):
    return float(sum(np.sum(np.asarray(x) ** 2) for x in lp))


_LPS = [-np.linspace(0.1, 3, 7), -np.linspace(0.2, 2, 5)]
_LOSS = regrad.compose(None, [RegularizerSpec.sync("a", 1.0, _cubic, grad="numerical"),
                              RegularizerSpec.sync("b", 1.0, _square, grad="numerical")], max_workers=2)


def _evaluate_composed(queue):
    queue.put(_LOSS.evaluate([None, None], _LPS)[0])


@_FORK[0]
@_FORK[1]
def test_a_composed_loss_used_before_a_fork_runs_in_the_child():
    expected = _LOSS.evaluate([None, None], _LPS)[0]  # starts the pool's two threads in this process
    deadline = time.monotonic() + 10
    while _LOSS._pool._idle_semaphore._value < 1 and time.monotonic() < deadline:  # its worker idle again
        time.sleep(0.005)
    assert _in_forked_child(_evaluate_composed) == expected


_BIG = [-np.linspace(0.1, 3, 300_000)]  # above the kernels' OpenMP threshold (64k elements)
_L1 = regrad.l1(1.0)


def _kernel(queue):
    queue.put(_L1.fn.value_and_grad([None], _BIG)[0])


@_FORK[0]
@_FORK[1]
@pytest.mark.skipif(not regrad.build_info()["openmp"] or regrad.build_info()["max_threads"] < 2, reason="OpenMP")
def test_a_parallel_kernel_runs_in_a_child_forked_after_one_ran():
    expected = _L1.fn.value_and_grad([None], _BIG)[0]  # a parallel region: OpenMP's threads start here
    assert _in_forked_child(_kernel) == expected


# ---- A loss_fn (running inside a request on the client's one worker thread) that waits on another request
# of the same client would wait forever: it must be refused with a named error, as .result() inside the
# request's own event loop is (docs/clients.md).


DATUM = regrad.Datum([1, 2, 3], {"target_tokens": [2, 3, 4]})


def test_waiting_on_a_request_from_inside_a_request_is_refused_not_a_deadlock():
    seen = {}
    with regrad.LocalTrainingClient() as client:
        def loss_fn(data, lps):
            inner = client.forward([DATUM])
            try:
                inner.result(timeout=2)  # (without a timeout: a hang for ever)
            except Exception as err:  # noqa: BLE001
                seen["error"] = err
            return sum(x.sum() for x in lps), {}

        client.forward_backward_custom([DATUM], loss_fn).result(timeout=30)
    assert isinstance(seen.get("error"), RuntimeError), seen
    assert "inside a request" in str(seen["error"])


def test_closing_the_client_from_inside_a_request():
    client = regrad.LocalTrainingClient()

    def loss_fn(data, lps):
        client.close()
        return sum(x.sum() for x in lps), {}

    out = client.forward_backward_custom([DATUM], loss_fn).result(timeout=30)
    assert "loss:sum" in out.metrics
    with pytest.raises(RuntimeError, match="closed"):
        client.forward([DATUM])
