"""Events, specs with an executor, and regrad.numerical's wrapper across pickle and copies (from an audit; each
test failed before its fix)."""

import concurrent.futures as cf
import copy
import multiprocessing as mp
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from _pickling import FORK, _CodedError, without_tblib  # noqa: E402
from regrad import LossEvent, RegularizerError, RegularizerSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _without_tblib(monkeypatch):
    """Errors by their own rules, whatever an earlier test imported (see _pickling)."""
    without_tblib(monkeypatch, RegularizerError, _CodedError)


def _coded(data, lps):
    raise _CodedError(7, "bad batch")


def _square(data, lps):
    return sum((lp**2).sum() for lp in lps)


def _lps():
    return [torch.tensor([-1.0, -2.0, -0.25], dtype=torch.float64, requires_grad=True),
            torch.tensor([-0.5, -3.0], dtype=torch.float64, requires_grad=True)]


def _run(loss_fn):
    lps = _lps()
    loss, _ = loss_fn([None, None], lps)
    loss.backward()
    return float(loss.detach()), [lp.grad.numpy().tobytes() for lp in lps]


def _failing_events(fn=_coded):
    events = []
    loss_fn = regrad.compose(None, [regrad.l1(0.1), RegularizerSpec.sync("coded", 1.0, fn)], on_event=events.append)
    with pytest.raises(RegularizerError) as info:
        loss_fn.evaluate([None], [np.array([-1.0, -2.0])])
    loss_fn.close()
    return [e for e in events if e.phase == "exception"], info.value


def _events_of_a_failing_call(_):
    events = []
    with pytest.raises(RegularizerError):
        regrad.compose(None, [RegularizerSpec.sync("coded", 1.0, _coded)], on_event=events.append)([None, None], _lps())
    return events


# ---- LossEvent through pickle and copy


def test_event_of_a_term_whose_exception_does_not_pickle_pickles():
    (term, whole), raised = _failing_events()
    assert (term.scope, term.name, whole.scope) == ("regularizer", "coded", "loss")
    assert type(term.error) is _CodedError and whole.error is raised  # in process: the objects themselves
    back = pickle.loads(pickle.dumps(term))  # "cannot pickle '_thread.lock' object"
    assert type(back) is LossEvent and (back.phase, back.scope, back.name, back.call) == ("exception", "regularizer", "coded", 1)
    assert back.time == term.time and back.duration_ms == term.duration_ms
    assert type(back.error) is RuntimeError and "_CodedError: code 7: bad batch" in str(back.error)
    assert type(term.error) is _CodedError  # pickling leaves the event as it was
    whole_back = pickle.loads(pickle.dumps(whole))
    assert type(whole_back.error) is RegularizerError and str(whole_back.error) == str(raised)
    plain = LossEvent("exception", "regularizer", "r", 1.0, error=ValueError("v"))  # an error that pickles: as is
    assert type(pickle.loads(pickle.dumps(plain)).error) is ValueError


def test_copies_of_an_event():
    (term, whole), _ = _failing_events()
    shallow = copy.copy(term)
    assert shallow is not term and shallow == term and shallow.error is term.error
    deep = copy.deepcopy(term)  # "_CodedError.__init__() missing 1 required positional argument: 'detail'"
    assert deep is not term and deep.name == "coded" and deep.time == term.time
    assert type(deep.error) is RuntimeError and "_CodedError: code 7: bad batch" in str(deep.error)

    class LocalError(Exception):  # pickle refuses a class defined in a function, deepcopy does not
        pass

    local = LossEvent("exception", "regularizer", "r", 1.0, error=LocalError("x"))
    deep = copy.deepcopy(local)
    assert type(deep.error) is LocalError and deep.error is not local.error and str(deep.error) == "x"
    assert "LocalError: x" in str(pickle.loads(pickle.dumps(local)).error)
    assert copy.deepcopy(whole).error.name == "coded"


@FORK[0]
@FORK[1]
def test_events_of_a_failing_call_come_back_from_a_process_worker():
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        events = pool.submit(_events_of_a_failing_call, 0).result(timeout=60)  # the result did not pickle
    assert [(e.phase, e.scope) for e in events] == [("start", "loss"), ("start", "regularizer"),
                                                    ("exception", "regularizer"), ("exception", "loss")]
    assert "_CodedError: code 7: bad batch" in str(events[2].error) and events[3].error.name == "coded"


# ---- specs and composed losses with an executor=


def test_deep_copy_of_a_spec_with_an_executor_shares_the_executor():
    with cf.ThreadPoolExecutor(2) as pool:
        spec = RegularizerSpec.sync("sq", 0.5, _square, grad="numerical", executor=pool, method="richardson")
        deep = copy.deepcopy(spec)  # "cannot pickle '_queue.SimpleQueue' object"
        assert deep is not spec and deep == spec and deep.numerical_options["executor"] is pool
        assert deep.numerical_options is not spec.numerical_options
        shallow = copy.copy(spec)
        assert shallow == spec and shallow.numerical_options["executor"] is pool
        loss_fn = regrad.compose(None, [spec])
        expected = _run(loss_fn)
        other = copy.deepcopy(loss_fn)
        assert other.regularizers[0].numerical_options["executor"] is pool and _run(other) == expected
        for fn in (loss_fn, other):
            fn.close()


def test_pickling_a_spec_with_an_executor_names_the_spec_and_the_option():
    with cf.ThreadPoolExecutor(2) as pool:
        spec = RegularizerSpec.sync("sq", 0.5, _square, grad="numerical", executor=pool)
        for obj in (spec, regrad.compose(None, [spec])):
            with pytest.raises(TypeError, match=r"regularizer 'sq': executor=.*ThreadPoolExecutor.* cannot be pickled"):
                pickle.dumps(obj)  # was: "cannot pickle '_queue.SimpleQueue' object"
        with pytest.raises(TypeError, match=r"regrad.numerical of fn '_square': executor=.* cannot be pickled"):
            pickle.dumps(regrad.numerical(_square, executor=pool))
    plain = RegularizerSpec.sync("sq", 0.5, _square, grad="numerical", step=1e-4)
    assert pickle.loads(pickle.dumps(plain)) == plain


# ---- regrad.numerical's wrapper compares by fn and options


def test_spec_of_a_numerical_wrapper_equals_its_pickle_and_copies():
    spec = RegularizerSpec.sync("num", 1.0, regrad.numerical(_square, method="richardson", step=[np.full(3, 1e-3)]))
    for other in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec), copy.copy(spec)):
        assert other == spec and hash(other) == hash(spec)  # a pickle or deep copy compared unequal
    wrapped = spec.fn
    same = regrad.numerical(_square, method="richardson", step=[np.full(3, 1e-3)])
    assert same == wrapped and hash(same) == hash(wrapped) and len({same, wrapped}) == 1
    assert regrad.numerical(_square, method="richardson", step=[np.full(3, 2e-3)]) != wrapped  # arrays by value
    assert regrad.numerical(_square) != wrapped and regrad.numerical(_cubes_like) != regrad.numerical(_square)
    assert wrapped != _square


def _cubes_like(data, lps):
    return sum((lp**3).sum() for lp in lps)
