"""Regressions found by the reviews of this session's commits (2026-11-25): 996573c..76288c2 (pickling
leftovers, half precision, torch integration) and 76288c2..3b4c6d5 (executors' done callbacks, numerical
evaluations outside autocast). Each test failed before its fix."""

import asyncio
import concurrent.futures
import copy
import dataclasses
import gc
import pickle
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import regrad  # noqa: E402
from regrad import numerical_grad  # noqa: E402

_K = 8
_W = torch.linspace(-1.0, 1.0, _K * _K).reshape(_K, _K)
_X0 = [torch.linspace(-2.0, -0.1, 2 * _K).reshape(2, _K)]


def _matmul_loss(data, lps):
    """A float32 loss through a matmul (bfloat16 under CPU autocast), differentiated numerically."""
    return sum(((lp @ _W) ** 2).sum().float() for lp in lps)


def _matmul_float(data, lps):
    return float(_matmul_loss(data, lps))


async def _async_matmul_loss(data, lps):
    await asyncio.sleep(0)  # (a step boundary: other tasks run here, under the loop thread's autocast)
    return _matmul_loss(data, lps)


def _reference():
    x = _X0[0].clone().requires_grad_(True)
    _matmul_loss(None, [x]).backward()
    return x.grad


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("term", ["numerical_route", "forward_route", "numerical_wrapper"])
def test_numerical_terms_under_autocast_evaluate_fn_in_float32(parallel: bool, term: str) -> None:
    """76288c2 re-entered the caller's torch.autocast on compose's pool, so a numerical term there (as inline
    before) evaluated its perturbations in bfloat16, which rounds away the engine's float32-sized steps: an
    all-zero gradient for a float32 loss, no warning (it was right on the pool before). The engine now
    evaluates fn outside autocast, as regrad.numerical's backward claims to."""
    fn = {"numerical_route": lambda: regrad.RegularizerSpec.sync("f", 1.0, _matmul_loss, grad="numerical"),
          "forward_route": lambda: regrad.RegularizerSpec.sync("f", 1.0, _matmul_loss, grad="numerical",
                                                               method="forward"),
          "numerical_wrapper": lambda: regrad.RegularizerSpec.sync("f", 1.0, regrad.numerical(_matmul_float))}[term]
    other = regrad.RegularizerSpec.sync("g", 0.0, _matmul_loss, grad="numerical")  # a second pooled term
    loss = regrad.compose(None, [fn(), other], parallel=parallel)
    ref = _reference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads, _ = loss.evaluate([None], [x.clone() for x in _X0])
    assert float((grads[0] - ref).abs().max()) < 0.01 * float(ref.abs().max())
    assert torch.is_autocast_enabled("cpu") is False
    loss.close()


def test_numerical_wrapper_backward_inside_autocast() -> None:
    """regrad.numerical's backward run inside the autocast block (loss.backward() before leaving it, or a
    compose term on the pool) evaluated fn in bfloat16: a relative gradient error of 0.86."""
    xs = [x.clone().requires_grad_(True) for x in _X0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        regrad.numerical(_matmul_float)([None], xs).backward()
    ref = _reference()
    assert float((xs[0].grad - ref).abs().max()) < 0.01 * float(ref.abs().max())


@dataclasses.dataclass
class _ScaledSquares:
    """A configurable loss object: a dataclass, so it compares by value and does not hash."""

    scale: float = 1.0

    def __call__(self, data, lps):
        return self.scale * float(sum((lp.numpy() ** 2).sum() for lp in lps))


def test_numerical_wrapper_of_an_unhashable_fn_hashes() -> None:
    """ceb81cf hashed a wrapper by hash(fn): a wrapper around a dataclass loss (unhashable) and a spec holding it
    raised "unhashable type" where they hashed (by identity) before; equal wrappers still hash alike."""
    wrapper = regrad.numerical(_ScaledSquares(2.0))
    spec = regrad.RegularizerSpec.sync("r", 0.1, wrapper)
    assert hash(wrapper) == hash(copy.deepcopy(wrapper)) and wrapper == copy.deepcopy(wrapper)
    assert hash(spec) == hash(copy.deepcopy(spec)) and spec == copy.deepcopy(spec)
    assert len({spec, copy.deepcopy(spec)}) == 1


def test_shallow_copy_of_a_numerical_wrapper_with_an_executor() -> None:
    """copy.copy went through __reduce__, which ceb81cf made refuse an executor that does not pickle: a shallow
    copy of regrad.numerical(fn, executor=pool) became a TypeError (docs/numerical.md: "a shallow copy shares
    their values")."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        wrapper = regrad.numerical(_matmul_float, executor=pool)
        copied = copy.copy(wrapper)
        assert copied is not wrapper and copied.options["executor"] is pool and copied == wrapper
        with pytest.raises(TypeError, match="executor="):
            pickle.dumps(wrapper)


def _local_executor():
    class SerialMap:  # a map-only executor defined where it is used: cloudpickle carries it, pickle does not
        def map(self, fn, *iterables):
            return list(map(fn, *iterables))

    return SerialMap()


def test_cloudpickle_carries_a_spec_whose_executor_only_cloudpickle_carries() -> None:
    """ceb81cf's check pickles the executor with the standard pickle whatever the pickler is, so cloudpickle
    (Dask, loky, Ray) could no longer send a spec it sent before: TypeError "executor=... cannot be pickled"."""
    cloudpickle = pytest.importorskip("cloudpickle")
    spec = regrad.RegularizerSpec.sync("r", 0.1, _matmul_float, grad="numerical", executor=_local_executor())
    back = cloudpickle.loads(cloudpickle.dumps(spec))
    assert type(back.numerical_options["executor"]).__name__ == "SerialMap"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a pool is still refused by name
        refused = regrad.RegularizerSpec.sync("p", 0.1, _matmul_float, grad="numerical", executor=pool)
        with pytest.raises(TypeError, match="regularizer 'p': executor="):
            cloudpickle.dumps(refused)


def test_autocast_state_reads_torch_before_2_4(monkeypatch):
    """torch 2.2 / 2.3 (which pyproject allows) have no device argument to is_autocast_enabled (it is CUDA's)
    and per-device dtype getters: autocast_state returned () there, so the autocast fixes did nothing."""
    import torch

    from regrad._autograd import autocast_state

    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = autocast_state()
        cpu_on = torch.is_autocast_enabled("cpu")

        def old_is_autocast_enabled(*args):  # torch < 2.4: no device argument; CUDA's state
            if args:
                raise TypeError("is_autocast_enabled() takes 0 positional arguments but 1 was given")
            return False

        monkeypatch.setattr(torch, "is_autocast_enabled", old_is_autocast_enabled)
        monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: cpu_on, raising=False)
        monkeypatch.setattr(torch, "get_autocast_cpu_dtype", lambda: torch.bfloat16, raising=False)
        monkeypatch.setattr(torch, "get_autocast_gpu_dtype", lambda: torch.float16, raising=False)
        old = autocast_state()
    assert new == old == (("cpu", torch.bfloat16, torch.is_autocast_cache_enabled()),)


@pytest.mark.parametrize("method", ["central", "forward"])
@pytest.mark.parametrize("how", ["evaluate", "aevaluate"])
def test_async_numerical_terms_under_autocast_evaluate_fn_in_float32(method: str, how: str) -> None:
    """An async term runs on the loop's thread, which is the caller's under a sync call made outside a running
    loop (asyncio.run there) and under acall: the engine's evaluations, awaited on that loop, ran in the caller's
    bfloat16 autocast, and the bf16 value call was taken as f0 (relative gradient error 0.87 central, 31
    forward). A sibling term's value call still runs under the caller's autocast, and the block is intact."""
    specs = [regrad.RegularizerSpec.async_(name, 1.0, _async_matmul_loss, grad="numerical", method=method)
             for name in ("a", "b")]  # (two: their steps interleave on the loop)
    loss = regrad.compose(None, specs)

    async def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = await loss.aevaluate([None], [x.clone() for x in _X0])
            assert torch.is_autocast_enabled("cpu")
            return out

    if how == "evaluate":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, grads, _ = loss.evaluate([None], [x.clone() for x in _X0])
            assert torch.is_autocast_enabled("cpu")
    else:
        _, grads, _ = asyncio.run(run())
    loss.close()
    ref = 2 * _reference()  # (two terms of weight 1)
    assert float((grads[0] - ref).abs().max()) < 0.01 * float(ref.abs().max())
    assert torch.is_autocast_enabled("cpu") is False


class _WeakRecording(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that keeps weak references to the futures it hands out."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.futures = []

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        self.futures.append(weakref.ref(future))
        return future


def test_a_run_on_a_pool_frees_its_futures_without_the_cyclic_gc():
    """4c1f5a7's done callbacks put the futures into a queue the callbacks hold: future -> callback -> queue ->
    future, a cycle per chunk, so each run's futures and results lived until the cyclic gc ran (with gc
    disabled, as some training loops do, they were never freed: 560 of 640 futures alive after 10 runs)."""
    fn = lambda d, lps: float(np.sum(lps[0] ** 2))  # noqa: E731
    with _WeakRecording(2) as pool:
        enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(3):
                numerical_grad(fn, None, [np.zeros(16)], executor=pool, progress=False)
            alive = sum(ref() is not None for ref in pool.futures)
        finally:
            if enabled:
                gc.enable()
    assert pool.futures and alive == 0
