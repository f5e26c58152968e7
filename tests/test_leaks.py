"""Leak regressions found by a resource audit (2026-11-25). Each test failed before its fix:
close() + reuse, failed composed calls, failed client requests. Fast (a few seconds in all).

B: ComposedLoss.close() + reuse kept one weakref.finalize (holding a dead ThreadPoolExecutor) per cycle.
C: a failed composed call (pooled or async terms) left a reference cycle holding the failing term's frames
   (fn's locals) and the call's inputs until the cyclic GC ran.
D: a failed client request left a cycle through RequestFuture / MappedFuture frames, likewise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import regrad


class _Sentinel:
    """Stands for the large scratch buffers a failing fn holds in its frame."""


@contextlib.contextmanager
def _gc_off():
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _failing_fn(refs, is_async=False):
    def fail(data, logprobs_list):
        scratch = _Sentinel()  # noqa: F841 - a local of the failing frame
        refs.append(weakref.ref(scratch))
        raise ValueError("term failed")

    async def afail(data, logprobs_list):
        scratch = _Sentinel()  # noqa: F841
        refs.append(weakref.ref(scratch))
        await asyncio.sleep(0)
        raise ValueError("async term failed")

    return afail if is_async else fail


def _value(data, lps):
    return float(sum(np.sum(np.asarray(x) ** 2) for x in lps)), {}


def _grad(data, lps):
    return [2 * np.asarray(x) for x in lps]


def test_compose_close_then_reuse_keeps_no_finalizers():
    loss_fn = regrad.compose(None, [regrad.RegularizerSpec.with_grad("a", 1.0, _value, _grad),
                                    regrad.RegularizerSpec.with_grad("b", 1.0, _value, _grad)])
    x = [np.ones(4), np.ones(3)]
    loss_fn.evaluate([None, None], x)  # starts the pool (two pooled terms)
    before = len(weakref.finalize._registry)
    for _ in range(50):
        with loss_fn:  # close() after every step; the next call starts a new pool (documented)
            loss_fn.evaluate([None, None], x)
    gc.collect()
    grown = len(weakref.finalize._registry) - before
    pools = [o for o in gc.get_objects() if type(o) is ThreadPoolExecutor
             and getattr(o, "_thread_name_prefix", "").startswith("regrad")]
    assert grown <= 1, f"{grown} finalizers left by 50 close()/reuse cycles"
    assert len(pools) <= 2, f"{len(pools)} regrad thread pools alive after 50 close()/reuse cycles"


@pytest.mark.parametrize("kind", ["pool", "async", "async-timeout", "async-inside-loop"])
def test_failed_composed_call_frees_its_frames_without_gc(kind):
    torch = pytest.importorskip("torch")
    refs: list = []

    def other(data, lps):
        return sum(x.exp().sum() for x in lps) / 100, {}

    async def slow(data, lps):
        scratch = _Sentinel()  # noqa: F841
        refs.append(weakref.ref(scratch))
        await asyncio.sleep(10)
        return 0.0

    if kind == "pool":
        failing = {"fn": _failing_fn(refs), "weight": 0.1, "name": "bad"}
    elif kind == "async-timeout":
        failing = regrad.RegularizerSpec.async_("bad", 0.1, slow, timeout=0.001)
    else:
        failing = regrad.RegularizerSpec.async_("bad", 0.1, _failing_fn(refs, True))
    loss_fn = regrad.compose(None, [{"fn": other, "weight": 0.1, "name": "ok"}, failing])
    data = [None, None]

    def call():
        lps = [(-torch.rand(8)).requires_grad_() for _ in range(2)]
        if kind != "async-inside-loop":
            loss_fn(data, lps)
            return

        async def inside():  # a sync call from inside a running loop (Tinker's case): the helper-thread path
            try:
                loss_fn(data, lps)
            except regrad.RegularizerError:
                return "failed"
        assert asyncio.run(inside()) == "failed"
        raise regrad.RegularizerError("bad", ValueError("failed inside the loop"))

    with pytest.raises(regrad.RegularizerError):  # warm-up (lazy imports, the pool)
        call()
    with _gc_off():
        for _ in range(5):
            try:
                call()
            except regrad.RegularizerError:
                pass
        alive = sum(r() is not None for r in refs[1:])
    loss_fn.close()
    assert alive == 0, f"{alive} of 5 failed calls still hold their failing term's frame (a reference cycle)"


@pytest.mark.parametrize("route", ["client", "forward_backward_custom"])
def test_failed_client_request_frees_its_frames_without_gc(route):
    pytest.importorskip("torch")
    refs: list = []
    client = regrad.LocalTrainingClient(seed=0)
    data = [regrad.Datum(model_input=regrad.ModelInput.from_ints(list(range(8))),
                         loss_fn_inputs={"target_tokens": np.arange(1, 9), "weights": np.ones(8)})]

    def request():
        if route == "client":
            return client.forward_backward_custom(data, _failing_fn(refs))
        return regrad.forward_backward_custom(client, data, regularizers=[{"fn": _failing_fn(refs), "weight": 0.1,
                                                                           "name": "bad"}])

    with pytest.raises(Exception):  # warm-up
        request().result()
    with _gc_off():
        for _ in range(5):
            future = request()
            try:
                future.result()
            except Exception:  # noqa: BLE001 - the request's own error
                pass
            del future
        alive = sum(r() is not None for r in refs[1:])
    client.close()
    assert alive == 0, f"{alive} of 5 failed requests still hold their loss_fn's frame (a reference cycle)"
