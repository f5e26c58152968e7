"""Specs and telemetry edge cases: strict JSON, unused numerical options, the dict form as a base
loss, hashing, partials of async callables, option types (from an audit; each test failed before its fix)."""

import functools
import json
import pickle

import numpy as np
import pytest

import regrad
from regrad import RegularizerError, RegularizerSpec
from regrad.errors import NonFiniteError


def _batch():
    data = [regrad.Datum([1, 2, 3], {"target_tokens": np.arange(3)}) for _ in range(2)]
    return data, [np.array([-1.1, -2.0, -3.0]), np.array([-0.5, -0.25, -4.0])]


def _huge(data, logprobs_list):  # finite value and gradient (~1e161); the SPSA sample variance overflows
    return float(1e160 * sum(float((np.asarray(x) ** 2).sum()) for x in logprobs_list)), {}


@pytest.mark.parametrize("route", ["spsa", "gaussian"])
def test_an_error_estimate_beyond_float64_never_reaches_the_json(route):
    data, lps = _batch()
    loss_fn = regrad.compose(None, [RegularizerSpec.sync("huge", 1.0, _huge, grad=route, num_samples=8)])
    with pytest.raises(RegularizerError, match="huge") as info:
        loss_fn.evaluate(data, lps)
    assert isinstance(info.value.cause, NonFiniteError) and "error estimate" in str(info.value.cause)
    assert loss_fn.last_output is None


def test_to_json_is_strict_json():
    data, lps = _batch()
    loss_fn = regrad.compose(regrad.losses.cross_entropy, [regrad.l1(0.1)])
    _, _, out = loss_fn.evaluate(data, lps)
    json.loads(out.to_json(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    out.regularizers["l1"].grad_error = float("inf")  # whatever leaks in, to_json never writes Infinity
    with pytest.raises(ValueError):
        out.to_json()


def reg(data, logprobs_list):
    return 0.0, {}


@pytest.mark.parametrize("make, unused", [
    (lambda: regrad.l1(0.1, name="sparsity", method="richardson"), "method"),       # auto -> analytic kernel
    (lambda: regrad.entropy(0.1, name="sparsity", step=1e-3), "step"),
    (lambda: regrad.l2(0.1, name="sparsity", vectorized=True), "vectorized"),
    (lambda: RegularizerSpec.sync("sparsity", 0.1, reg, grad="numerical", num_samples=4), "num_samples"),
    (lambda: RegularizerSpec.sync("sparsity", 0.1, reg, method="forward", sigma=0.1), "sigma"),
    (lambda: RegularizerSpec.sync("sparsity", 0.1, reg, grad="numerical", seed=1), "seed"),
    (lambda: RegularizerSpec.sync("sparsity", 0.1, reg, grad="numerical", antithetic=False), "antithetic"),
    (lambda: RegularizerSpec.sync("sparsity", 0.1, reg, grad="spsa", step=1e-3), "step"),
    (lambda: RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "sparsity", "grad": "gaussian",
                                        "numerical_options": {"step": 1e-3}}), "step"),
])
def test_numerical_options_the_route_never_reads_are_named_not_dropped(make, unused):
    with pytest.raises(ValueError, match=f"'sparsity'.*{unused}"):
        make()


def test_numerical_options_the_route_reads_are_still_accepted():
    assert regrad.l1(0.1, grad="numerical", method="richardson", step=1e-3).grad == "numerical"
    assert RegularizerSpec.sync("r", 0.1, reg, grad="spsa", num_samples=4, sigma=0.1, seed=2, antithetic=False)
    assert RegularizerSpec.sync("r", 0.1, reg, method="gaussian", num_samples=4, seed=2)  # auto, randomized method
    assert RegularizerSpec.sync("r", 0.1, reg, grad="numerical", method="forward", step=1e-4, structure="datum")


@pytest.mark.parametrize("base", [regrad.losses.cross_entropy, None])
def test_telemetry_numbers_are_floats_without_regularizers(base):
    data = [regrad.Datum([1, 2, 3], {"target_tokens": np.arange(3), "weights": np.ones(3, np.float32)})]
    _, _, out = regrad.compose(base, []).evaluate(data, [np.array([-1.1, -2.0, -3.0])])
    assert type(out.regularizer_total) is float and type(out.loss_total) is float
    assert '"regularizer_total": 0.0' in out.to_json()
    assert all(type(v) is float for v in out.flat().values())
    assert json.loads(out.to_json())["regularizer_total"] == 0.0


def _sq(data, logprobs_list):
    return float(sum(float((np.asarray(x) ** 2).sum()) for x in logprobs_list)), {}


@pytest.mark.parametrize("method", ["spsa", "gaussian"])
@pytest.mark.parametrize("grad", ["numerical", "auto"])
def test_randomized_methods_have_one_label_however_asked_for(grad, method):
    data = [regrad.Datum([1, 2, 3], {"target_tokens": np.arange(3)})]
    lps = [np.array([-1.1, -2.0, -3.0])]
    via_route = RegularizerSpec.sync("r", 1.0, _sq, grad=method, num_samples=4)
    via_method = RegularizerSpec.sync("r", 1.0, _sq, grad=grad, method=method, num_samples=4)
    labels = [regrad.compose(None, [s]).evaluate(data, lps)[2].regularizers["r"].grad_method for s in (via_route, via_method)]
    assert labels == [method, method]


def test_specs_are_hashable_and_hash_agrees_with_eq():
    a = RegularizerSpec.sync("r", 0.1, reg, grad="numerical", step=1e-3)
    b = RegularizerSpec.sync("r", 0.1, reg, grad="numerical", step=1e-3)
    c = RegularizerSpec.sync("r", 0.1, reg, grad="numerical", step=1e-4)
    assert a == b and hash(a) == hash(b) and a != c
    assert len({a, b, c, regrad.l1(0.1)}) == 3


@pytest.mark.parametrize("options", ["step=1e-3", 0, False, [("step", 1e-3)]])
def test_from_dict_numerical_options_must_be_a_dict_and_the_error_names_the_spec(options):
    with pytest.raises(TypeError, match="'topology'.*numerical_options"):
        RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "topology", "numerical_options": options})


def test_from_dict_unknown_keys_of_any_type_are_named():
    with pytest.raises(ValueError, match=r"'topology' has unknown keys .*wieght"):
        RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "topology", 1: "x", "wieght": 2})


def test_from_dict_numerical_options_none_or_a_dict_still_work():
    spec = RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "t", "numerical_options": None})
    assert dict(spec.numerical_options) == {}
    spec = RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "t", "grad": "numerical",
                                      "numerical_options": {"step": 1e-3}})
    assert dict(spec.numerical_options) == {"step": 1e-3}


def test_base_loss_accepts_the_seed_dict_form_like_a_spec():
    data = [regrad.Datum([1, 2, 3], {"target_tokens": np.arange(3), "weights": np.ones(3, np.float32)})]
    lps = [np.array([-1.1, -2.0, -3.0])]
    ce = regrad.losses.cross_entropy
    want = regrad.compose(RegularizerSpec.sync("ce", 1.0, ce), [regrad.l1(0.1)]).evaluate(data, lps)[0]
    loss_fn = regrad.compose({"fn": ce, "weight": 1.0, "name": "ce"}, [regrad.l1(0.1)])
    assert loss_fn.base_spec.name == "ce" and loss_fn.evaluate(data, lps)[0] == want
    with pytest.raises(ValueError, match=r"base loss 'ce'.*weight 1"):
        regrad.compose({"fn": ce, "weight": 0.5, "name": "ce"})
    with pytest.raises(ValueError, match="'ce' is missing"):
        regrad.compose({"fn": ce, "name": "ce"})


class Verifier:
    async def __call__(self, data, logprobs_list, scale=1.0):
        return scale * float(sum(float(np.sum(x)) for x in logprobs_list)), {}


def test_a_partial_of_an_async_callable_object_is_async():
    fn = functools.partial(Verifier(), scale=2.0)
    assert RegularizerSpec.from_dict({"fn": fn, "weight": 1.0, "name": "kb"}).is_async
    assert RegularizerSpec.async_("kb", 1.0, fn).is_async
    data = [regrad.Datum([1, 2, 3], {"target_tokens": np.arange(3)})]
    total, _, _ = regrad.compose(None, [{"fn": fn, "weight": 1.0, "name": "kb"}]).evaluate(data, [np.array([-1.0, -2.0, -3.0])])
    assert total == -12.0


@pytest.mark.parametrize("squared", ["False", "True", None, 0, 1.0])
def test_l2_squared_must_be_a_bool_and_the_error_names_the_spec(squared):
    with pytest.raises(TypeError, match=r"'ridge'.*squared"):
        regrad.l2(0.1, name="ridge", squared=squared)


def test_l2_squared_bools_still_work():
    assert regrad.l2(0.1).fn.kind == "l2" and regrad.l2(0.1, squared=False).fn.kind == "l2_norm"
    assert regrad.l2(0.1, squared=np.bool_(False)).fn.kind == "l2_norm"


@pytest.mark.parametrize("keyword, message", [("timeout", "timeout applies to async"), ("grad_fn", "with_grad")])
def test_sync_names_what_timeout_and_grad_fn_are_for(keyword, message):
    # both were refused as "unknown numerical options", which they are not
    with pytest.raises(ValueError, match=f"regularizer 'r': .*{message}"):
        RegularizerSpec.sync("r", 1.0, reg, **{keyword: reg if keyword == "grad_fn" else 3.0})



def test_builtin_specs_compare_equal_by_kind_reduction_and_mask():
    # two equal built-ins were unequal (KernelRegularizer compared by identity), unlike any two equal specs
    assert regrad.l1(0.1) == regrad.l1(0.1) and hash(regrad.l1(0.1)) == hash(regrad.l1(0.1))
    assert regrad.l2(0.1, squared=False) == regrad.l2(0.1, squared=False)
    assert regrad.l1(0.1) != regrad.l1(0.2)
    assert regrad.l1(0.1) != regrad.l1(0.1, reduction="sum")
    assert regrad.l1(0.1) != regrad.l1(0.1, mask="weights")
    assert regrad.l2(0.1) != regrad.l2(0.1, squared=False)
    assert regrad.entropy(0.1).fn != regrad.l1(0.1).fn
    assert len({regrad.l1(0.1), regrad.l1(0.1), regrad.entropy(0.1)}) == 2
    fn = regrad.l1(0.1, mask="weights").fn
    assert pickle.loads(pickle.dumps(fn)) == fn  # executors and spawn-based workers pickle specs
    with pytest.raises(AttributeError):
        fn.mask = None  # read-only: the hash must not change under a set


def test_builtin_mask_must_be_a_key_and_the_error_names_the_spec():
    # a list of masks was accepted, then failed at the first loss call with "unhashable type: 'list'"
    with pytest.raises(TypeError, match=r"regularizer 'sparse'.*mask must be a loss_fn_inputs key.*list"):
        regrad.l1(0.1, name="sparse", mask=[np.ones(3)])
