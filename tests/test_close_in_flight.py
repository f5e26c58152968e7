"""close() of a composed loss while another thread's call is in flight (audit hH): the call finishes with
the sequential result; it hung (concurrent.futures.wait never returns for a future cancelled by
shutdown(cancel_futures=True), CPython gh-109934), raised a bare CancelledError, or "cannot schedule new
futures after shutdown"."""

import asyncio
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import RegularizerSpec  # noqa: E402

compose_module = sys.modules["regrad.compose"]  # (regrad.compose is also the function)


def _cubic(data, lps):
    return float(sum(np.sum(np.asarray(x) ** 3) for x in lps)), {}


def _zeros(data, lps):
    return [np.zeros(tuple(x.shape)) for x in lps]


async def _async_square(data, lps):
    await asyncio.sleep(0)
    return sum((x ** 2).sum() for x in lps), {}


def _specs(slow, with_async):
    specs = [RegularizerSpec.with_grad("slow", 1.0, slow, _zeros),
             RegularizerSpec.sync("cubic", 0.01, _cubic, grad="numerical"), regrad.l1(0.1)]
    if with_async:
        specs.append(RegularizerSpec.async_("square", 0.05, _async_square, timeout=20.0))
    return specs


@pytest.mark.parametrize("mode", ["evaluate", "aevaluate", "evaluate_in_a_loop"])
def test_close_from_another_thread_lets_an_in_flight_call_finish(mode):
    """max_workers=1: "cubic" is still queued when close() runs; the call still returns its total."""
    started, release, submitted = threading.Event(), threading.Event(), threading.Event()
    last = "l1" if mode == "evaluate" else "square"  # starts in the calling thread once all terms were submitted

    def on_event(event):
        if event.name == last and event.phase == "start":
            submitted.set()

    def slow(data, lps):
        started.set()
        assert release.wait(10)
        return _cubic(data, lps)

    lps = [np.linspace(-3.0, -0.1, n) for n in (5, 3, 7)]
    expected = regrad.compose(None, _specs(slow, mode != "evaluate"), parallel=False)
    release.set()
    want = expected.evaluate([0, 1, 2], lps)[0]
    release.clear()
    loss_fn = regrad.compose(None, _specs(slow, mode != "evaluate"), max_workers=1, on_event=on_event)
    box = {}

    def call():
        try:
            if mode == "evaluate":
                box["value"] = loss_fn.evaluate([0, 1, 2], lps)[0]
            elif mode == "aevaluate":
                box["value"] = asyncio.run(loss_fn.aevaluate([0, 1, 2], lps))[0]
            else:  # the helper-thread path (a sync call inside a running loop)
                async def inside():
                    return loss_fn.evaluate([0, 1, 2], lps)[0]
                box["value"] = asyncio.run(inside())
        except BaseException as err:  # noqa: BLE001 - reported below
            box["error"] = err

    thread = threading.Thread(target=call, daemon=True)  # (daemon: a hang must not keep pytest alive)
    thread.start()
    assert started.wait(10) and submitted.wait(10)
    loss_fn.close()
    release.set()
    thread.join(10)
    assert not thread.is_alive(), "the in-flight call hung after close()"
    assert "error" not in box, repr(box.get("error"))
    assert box["value"] == want
    assert loss_fn.evaluate([0, 1, 2], lps)[0] == want  # and the loss is reusable afterwards
    loss_fn.close()
    expected.close()


def test_close_between_getting_the_pool_and_submitting_is_not_a_pool_error(monkeypatch):
    """A close() racing the submission of a call's terms (forced here at the first submit): the call
    runs; it raised RuntimeError "cannot schedule new futures after shutdown"."""
    holder = {}

    class Racing(compose_module.ThreadPoolExecutor):
        fired = False

        def submit(self, *args, **kwargs):
            if not Racing.fired and self._thread_name_prefix == "regrad":
                Racing.fired = True
                closer = threading.Thread(target=holder["loss"].close, daemon=True)
                closer.start()
                closer.join(0.5)  # close() runs now, or waits until this submission is made
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(compose_module, "ThreadPoolExecutor", Racing)
    specs = [RegularizerSpec.with_grad(name, 1.0, _cubic, _zeros) for name in ("a", "b")]
    lps = [np.linspace(-3.0, -0.1, 4)]
    loss_fn = holder["loss"] = regrad.compose(None, specs)
    value = loss_fn.evaluate([0], lps)[0]
    assert Racing.fired
    assert value == 2 * _cubic(None, lps)[0]
    loss_fn.close()
