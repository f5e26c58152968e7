"""Regressions from the review of 76288c2..3b4c6d5 (executors' done callbacks, numerical evaluations outside
autocast): each test fails on 3b4c6d5 and passes with all_fixes.diff."""

import asyncio
import concurrent.futures as cf
import gc
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


async def _async_matmul_loss(data, lps):
    await asyncio.sleep(0)  # (a step boundary: other tasks run here, under the loop thread's autocast)
    return _matmul_loss(data, lps)


def _reference():
    x = _X0[0].clone().requires_grad_(True)
    _matmul_loss(None, [x]).backward()
    return x.grad


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


class _WeakRecording(cf.ThreadPoolExecutor):
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
