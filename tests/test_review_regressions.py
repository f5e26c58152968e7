"""Regressions found by an adversarial review of the 2026-11-25 fixes (each test fails before its fix)."""

from __future__ import annotations

import copy
import copyreg
import pickle
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec, numerical_grad  # noqa: E402


class _TwoArgs(Exception):
    """A user exception whose __init__ takes other arguments than its args (it does not unpickle)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code


def _local_cause() -> Exception:
    class VerifierTimeout(Exception):  # defined in a function: the stdlib pickle refuses it, copy does not
        pass

    return VerifierTimeout("the verifier did not answer")


@pytest.mark.parametrize("cause", [_TwoArgs(503, "busy"), _local_cause(), ValueError("plain")], ids=["init", "local", "plain"])
def test_copying_a_regularizer_error_keeps_its_cause(cause, monkeypatch):
    """copy.copy / copy.deepcopy went through __reduce__, whose cause is made portable for pickling: a copy's
    .cause became a RuntimeError for a cause that pickle refuses (copy.copy kept the cause before 2026-11-25)."""
    for cls in (RegularizerError, type(cause)):  # tblib's reducers (dask.distributed installs them) would decide
        monkeypatch.delitem(copyreg.dispatch_table, cls, raising=False)
    err = RegularizerError("verifier", cause)
    err.add_note("step 7")
    shallow = copy.copy(err)
    assert shallow.cause is cause and shallow.name == "verifier" and str(shallow) == str(err)
    assert shallow.__notes__ == ["step 7"]
    deep = copy.deepcopy(err)
    if isinstance(cause, _TwoArgs):  # cannot be rebuilt by copy either: the portable RuntimeError
        assert type(deep.cause) is RuntimeError and "503: busy" in str(deep.cause)
    else:
        assert type(deep.cause) is type(cause) and str(deep.cause) == str(cause) and deep.cause is not cause
    assert str(deep) == str(err) and deep.__notes__ == ["step 7"]
    again = pickle.loads(pickle.dumps(err))  # pickling as before: a cause pickle refuses arrives as a RuntimeError
    assert str(again) == str(err) and (type(again.cause) is ValueError or type(again.cause) is RuntimeError)


@pytest.mark.parametrize("shape", ["list", "array", "tensor"])
def test_numerical_refuses_a_one_element_loss_when_the_loss_is_computed(shape):
    """numerical()'s forward read fn's loss with real_array(...).reshape(()): [0.5] and np.array([0.5]) passed
    (float() refused them before 2026-11-25) and only the backward's numerical_grad refused the shape."""
    def fn(data, lps):
        value = float(sum(float((x ** 2).sum()) for x in lps))
        return {"list": [value], "array": np.array([value]), "tensor": torch.tensor([value])}[shape]

    wrapped = regrad.numerical(fn)
    x = torch.tensor([0.5, -1.0], requires_grad=True)
    with pytest.raises(regrad.NumericalError, match=r"returned \w+ of shape \(1,\); expected a scalar loss"):
        wrapped([0], [x])
    with pytest.raises(regrad.NumericalError, match=r"shape \(1,\)"):  # what numerical_grad says of the same fn
        numerical_grad(fn, [0], [x.detach()])
    if shape == "tensor":  # nothing differentiated: a 1-element tensor is read as before
        assert wrapped([0], [x.detach()]).item() == 1.25
    else:
        with pytest.raises(regrad.NumericalError, match=r"shape \(1,\)"):
            wrapped([0], [x.detach()])


def test_numerical_reads_a_loss_that_requires_grad_without_a_warning():
    """float(loss) of a tensor requiring grad warns in torch ("Converting a tensor with requires_grad=True to a
    scalar"); the forward reads the value only."""
    w = torch.tensor(2.0, requires_grad=True)  # fn's own parameter

    def fn(data, lps):
        with torch.enable_grad():
            return w * sum((x ** 2).sum() for x in lps)

    x = torch.tensor([0.5, -1.0], requires_grad=True)
    loss = regrad.numerical(fn)([0], [x])  # (pytest turns the warning into an error)
    assert loss.item() == 2.5
    loss.backward()
    assert torch.allclose(x.grad, torch.tensor([2.0, -4.0]), atol=1e-5)


def test_regrad_data_with_extras_tinker_cannot_hold_run_on_a_tinker_client_as_on_the_local_one():
    """forward_backward_custom converts regrad Datums for a Tinker client (datum.to_tinker()); an extra input
    tinker cannot hold (text, a dict, a ragged list), which the local client and the loss take, failed there
    with tinker's bare ValueError ("Unsupported numpy dtype: <U3"). Tinker sends only target_tokens and
    weights and the loss gets the caller's Datums, so such extras are left out of the sent copies."""
    pytest.importorskip("tinker")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))  # tests/, also beside an installed wheel
    try:
        from _fake_tinker import SMALL, FakeTinkerTrainingClient
    except ImportError as err:
        pytest.skip(f"tinker's client internals differ from the fake's: {err}")
    from regrad.model import default_model

    base = regrad.data_from_texts(["the cat sat on the mat", "a tiny model learns bytes"])
    data = [regrad.Datum(d.model_input, {**d.loss_fn_inputs, "source": "web", "meta": {"id": i}, "spans": [[0], [1, 2]]})
            for i, d in enumerate(base)]
    seen = []

    def reads_extras(d, lps):
        seen.append([datum.loss_fn_inputs["source"] for datum in d])
        return sum(lp.sum() for lp in lps) * 0.0, {}

    regs = [regrad.l1(1e-2), regrad.RegularizerSpec.sync("extras", 0.1, reads_extras)]
    local = regrad.forward_backward_custom(regrad.LocalTrainingClient(default_model(0, SMALL), seed=0), data,
                                           regularizers=regs).result()
    tinker = regrad.forward_backward_custom(FakeTinkerTrainingClient(), data, regularizers=regs).result()
    assert tinker.loss == pytest.approx(local.loss, rel=1e-12)
    assert seen == [["web", "web"], ["web", "web"]]
    with pytest.raises(regrad.InputError, match=r"datum 0: loss_fn_inputs\['source'\] must hold numbers"):
        data[0].to_tinker()  # converting one datum says which input tinker cannot hold
    bad = [base[0], regrad.Datum(base[1].model_input, {"target_tokens": [[1], [2, 3]]})]
    with pytest.raises(regrad.InputError, match=r"datum 1: loss_fn_inputs\['target_tokens'\]"):
        regrad.forward_backward_custom(FakeTinkerTrainingClient(), bad)  # named as the local client names it


class _CtrlCOnceStarted:
    """A thread pool whose results the caller waits for until `started`, then gets Ctrl-C there (as in
    test_interrupts), while the chunks already started go on on the pool."""

    def __init__(self, pool, started: threading.Event) -> None:
        self.pool, self.started = pool, started

    def map(self, func, *iterables):
        self.pool.map(func, *iterables)

        def results():
            self.started.wait(10)
            raise KeyboardInterrupt
            yield  # (a generator)

        return results()


def test_a_stopped_executor_run_does_not_fail_the_numerical_runs_of_its_fn():
    """A chunk's stop check (take_chunk_flight) was read by every numerical run in that thread, fn's own too: a
    composed loss evaluated inside fn failed with the private `_Stopped`, which reached its on_event (and
    log_events' warnings) after the caller had its Ctrl-C. fn's own runs finish; the chunk stops after."""
    from concurrent.futures import ThreadPoolExecutor

    started, failures = threading.Event(), []

    def slow_term(data, lps):
        started.set()
        time.sleep(0.005)
        return float(sum(np.sum(np.asarray(x) ** 2) for x in lps))

    inner = regrad.compose(None, [RegularizerSpec.sync("inner", 1.0, slow_term, grad="numerical", progress=False)],
                           on_event=lambda e: failures.append(repr(e.error)) if e.phase == "exception" else None)

    def fn(data, lps):
        return inner.evaluate([0], [lps[0][:8]])[0]

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(KeyboardInterrupt):
            numerical_grad(fn, [0], [np.linspace(-1.0, 0.0, 256)], executor=_CtrlCOnceStarted(pool, started),
                           progress=False)
    inner.close()
    assert failures == [], f"fn's composed loss failed because the outer run stopped: {failures[:2]}"
