"""Concurrency edge cases (from audits; each test failed before its fix): a composed call's
background terms after it failed, forked children (multiprocessing's default start method on Linux),
a loss_fn waiting on its own client, state a run leaves for the next one on its thread, and a run
nested in a chunk of its own executor."""

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec, numerical_grad  # noqa: E402
from regrad.errors import NumericalError  # noqa: E402
from _pickling import FORK  # noqa: E402


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


@FORK[0]
@FORK[1]
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


@FORK[0]
@FORK[1]
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


# ---- The per-thread stacked copies (token structure, vectorized) and fn's views of them are kept for the
# next run on the thread: what fn did to the views (in place, autograd state) must not reach that run.

def _token(fn, xs):
    return numerical_grad(fn, None, xs, structure="token", vectorized=True)


def test_stacked_views_changed_in_place_by_a_failed_run_are_not_reused():
    """fn transposing its [2, 2] stacked copies in place is refused; the next, correct run on the same
    shapes must not get the transposed views (it returned ~1e5 instead of cos(x), without an error)."""
    xs = [torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)]
    good = lambda d, v: [t.sin() for t in v]  # noqa: E731
    fresh = _token(good, xs).grads

    def bad(d, v):
        v[0].t_()
        return [t.sin() for t in v]

    with pytest.raises(NumericalError, match="in place"):
        _token(bad, xs)
    got = _token(good, xs).grads
    for g, f, x in zip(got, fresh, xs):
        torch.testing.assert_close(g, f, rtol=0, atol=0)
        torch.testing.assert_close(g, x.cos(), rtol=1e-6, atol=1e-8)


def test_stacked_views_unsqueezed_by_a_failed_run_do_not_break_the_next_run():
    xs = [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]

    def bad(d, v):
        for t in v:
            t.unsqueeze_(0)
        return [t.sin().squeeze(0) for t in v]

    with pytest.raises(NumericalError, match="in place"):
        _token(bad, xs)
    got = _token(lambda d, v: [t.sin() for t in v], xs).grads  # raised "shape (1, 2, 5)" before the fix
    for g, x in zip(got, xs):
        torch.testing.assert_close(g, x.cos(), rtol=1e-6, atol=1e-8)


def test_stacked_views_carry_no_autograd_state_into_the_next_run():
    """A per-token fn reading x.grad after a backward on its input gets the same answer every run
    (it accumulated into the cached views: 1x, 2x, 3x the gradient)."""
    xs = [torch.tensor([0.3, -1.2], dtype=torch.float64)]

    def fn(d, v):
        out = []
        with torch.enable_grad():
            for t in v:
                t.requires_grad_(True)
                (t ** 3).sum().backward()
                out.append(t.grad.detach().clone())  # 3 x^2 per token: gradient 6 x
        return out

    runs = [_token(fn, xs).grads[0] for _ in range(3)]
    for g in runs:
        torch.testing.assert_close(g, 6 * xs[0], rtol=1e-6, atol=1e-8)


# ---- compose's in-place check watches what fns are handed: a non-contiguous tensor itself, not the copy
# the checks read.

@pytest.mark.parametrize("parallel", [False, True])
def test_compose_in_place_change_of_a_strided_tensor_is_caught_and_undone(parallel):
    base = torch.arange(1.0, 9.0, dtype=torch.float64)
    lp = base[::2]  # non-contiguous: as_array_batch copies it, fns get the tensor itself
    before = lp.clone()

    def bad(d, xs):
        xs[0].mul_(2.0)
        return float(xs[0].pow(2).sum())

    specs = [RegularizerSpec.with_grad("bad", 1.0, bad, lambda d, xs: [2 * x for x in xs]),
             RegularizerSpec.sync("ok", 1.0, lambda d, xs: float(sum(x.sum() for x in xs)), grad="numerical")]
    loss = regrad.compose(None, specs, parallel=parallel)
    with pytest.raises(RegularizerError, match="changed in place"):
        loss.evaluate([None], [lp])
    assert torch.equal(lp, before)
    assert torch.equal(base[1::2], torch.arange(2.0, 9.0, 2.0, dtype=torch.float64))  # the rest untouched


# ---- A run nested in a chunk of its own thread-pool executor.

def test_nested_run_on_the_outer_runs_executor_completes_instead_of_hanging():
    """fn of a run mapped over a ThreadPoolExecutor calling numerical_grad with the same executor: the
    inner chunks queued behind the outer ones, whose workers waited for them, forever."""
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(2)
    inner = [np.linspace(-1, 1, 4)]
    seen = []

    def fn(d, xs):
        seen.append(numerical_grad(lambda d2, ys: float((ys[0] ** 2).sum()), None, inner, executor=ex).grads[0])
        return float(sum((x ** 3).sum() for x in xs))

    box = {}
    x = np.linspace(-1, 1, 6)
    t = threading.Thread(target=lambda: box.update(r=numerical_grad(fn, None, [x], executor=ex)), daemon=True)
    t.start()
    t.join(30)
    ex.shutdown(wait=False, cancel_futures=True)  # (on a failure: frees the stuck workers, so pytest can exit)
    assert not t.is_alive(), "numerical_grad deadlocked on its own executor"
    np.testing.assert_allclose(box["r"].grads[0], 3 * x ** 2, atol=1e-6)
    fresh = numerical_grad(lambda d2, ys: float((ys[0] ** 2).sum()), None, inner).grads[0]
    assert all(np.array_equal(g, fresh) for g in seen)  # the same bits as a run without an executor


def test_numpy_stacked_views_reshaped_by_fn_are_not_reused():
    """numpy's views take a new .shape in place (no version counter to see it): the next run gets
    fresh views of the right shape."""
    xs = [np.array([0.3, -1.2, 0.7]), np.array([0.5, 2.0])]

    def reshaping(d, v):
        shapes = [a.shape for a in v]
        for a in v:
            a.shape = (a.size,)  # flat now, in place
        return [np.sin(a).reshape(s) for a, s in zip(v, shapes)]

    first = numerical_grad(reshaping, None, xs, structure="token", vectorized=True).grads
    seen = []
    second = numerical_grad(lambda d, v: seen.extend(a.shape for a in v) or [np.sin(a) for a in v], None, xs,
                            structure="token", vectorized=True).grads
    assert seen == [(2, 3), (2, 2)]
    for a, b, x in zip(first, second, xs):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, np.cos(x), rtol=1e-6)
