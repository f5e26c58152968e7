"""Process boundaries (from an audit; each test failed before its fix): errors and composed losses that
executors and process workers pickle, and copies of a composed loss."""

import concurrent.futures as cf
import copy
import logging
import multiprocessing as mp
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from _pickling import FORK, _CodedError, run_backward as _run, two_lps as _lps, without_tblib  # noqa: E402
from regrad import RegularizerError, RegularizerSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _without_tblib(monkeypatch):
    """RegularizerError by its own __reduce__, whatever an earlier test imported (see _pickling)."""
    without_tblib(monkeypatch, RegularizerError)


def _coded(data, lps):
    raise _CodedError(7, "bad batch")


def _square(data, lps):
    return sum((lp**2).sum() for lp in lps)


def _base(data, lps):
    return -sum(lp.sum() for lp in lps)


def _loss(**kwargs):
    return regrad.compose(_base, [regrad.l1(0.1), RegularizerSpec.sync("sq", 0.5, _square, grad="numerical")], **kwargs)


def _failing_call(_):
    regrad.compose(_base, [RegularizerSpec.sync("coded", 1.0, _coded)])([None, None], _lps())


# ---- RegularizerError through pickle (executors pickle a worker's exception)


def test_regularizer_error_round_trips_when_its_cause_cannot_be_unpickled():
    err = RegularizerError("coded", _CodedError(7, "bad batch"))
    err.step = 3  # attributes a caller added travel too
    for back in (pickle.loads(pickle.dumps(err)), copy.deepcopy(err)):
        assert type(back) is RegularizerError and str(back) == str(err) and back.args == err.args
        assert back.name == "coded" and back.step == 3
        assert "_CodedError" in str(back.cause) and "code 7: bad batch" in str(back.cause)
    shallow = copy.copy(err)  # copying pickles nothing: the same cause
    assert type(shallow) is RegularizerError and str(shallow) == str(err) and shallow.step == 3 and shallow.cause is err.cause


def test_regularizer_error_keeps_a_picklable_cause_as_is():
    cause = ValueError("v")
    back = pickle.loads(pickle.dumps(RegularizerError("r", cause)))
    assert type(back.cause) is ValueError and back.cause.args == ("v",) and str(back) == "regularizer 'r' failed: ValueError: v"


@FORK[0]
@FORK[1]
def test_regularizer_error_of_a_user_exception_reaches_the_caller_of_a_process_pool():
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        with pytest.raises(RegularizerError, match="'coded' failed: _CodedError: code 7: bad batch") as info:
            pool.submit(_failing_call, 0).result(timeout=60)  # it broke the pool: BrokenProcessPool
        assert info.value.name == "coded"
        assert pool.submit(abs, -2).result(timeout=60) == 2  # the pool still works


# ---- ComposedLoss through pickle and copy


def test_composed_loss_pickles_after_use_and_gives_the_same_bits():
    loss_fn = _loss()
    expected = _run(loss_fn)  # its thread pool is running now
    back = pickle.loads(pickle.dumps(loss_fn))  # "cannot pickle '_thread.lock' object" / "'_queue.SimpleQueue'"
    assert repr(back) == repr(loss_fn) and _run(back) == expected
    deep = copy.deepcopy(loss_fn)
    assert _run(deep) == expected
    for fn in (loss_fn, back, deep):
        fn.close()


@FORK[0]
@FORK[1]
def test_composed_loss_shipped_to_a_process_worker_gives_the_same_bits():
    loss_fn = _loss()
    expected = _run(loss_fn)
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        assert pool.submit(_run, loss_fn).result(timeout=60) == expected
    loss_fn.close()


def test_closing_a_copy_of_a_composed_loss_leaves_the_original_working():
    loss_fn = _loss()
    expected = _run(loss_fn)
    other = copy.copy(loss_fn)
    assert _run(other) == expected
    other.close()  # shut the shared pool down: "cannot schedule new futures after shutdown"
    assert _run(loss_fn) == expected
    loss_fn.close()


def test_composed_loss_logging_its_events_pickles():
    loss_fn = _loss(on_event=regrad.log_events(logging.getLogger("regrad.test"), logging.INFO))
    back = pickle.loads(pickle.dumps(loss_fn))  # "Can't pickle local object 'log_events.<locals>.on_event'"
    assert _run(back) == _run(loss_fn)
    back.close()
    loss_fn.close()


def test_log_events_still_logs(caplog):
    on_event = regrad.log_events(level=logging.INFO)
    with caplog.at_level(logging.INFO, logger="regrad"):
        regrad.compose(None, [regrad.l1(0.1)], on_event=on_event).evaluate([None], [np.array([-1.0, -2.0])])
    assert "loss start" in caplog.text and "regularizer 'l1' stop" in caplog.text
