"""regrad.check, cross_entropy and Datum edge cases (from an audit; each test failed before its fix):
inference mode, non-scalar datum losses, empty batches, non-real grad_fn gradients, Datum equality,
bfloat16 loss_fn_inputs, data that is not a list, NaN perplexity, weights whose sum overflows."""

import math
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import Datum  # noqa: E402
from regrad.losses import cross_entropy  # noqa: E402


# ---- regrad.check under torch.inference_mode(): the autograd reference must still be recorded.


def cube(data, lps):
    return sum((lp ** 3).sum() for lp in lps)


def test_check_works_inside_inference_mode():
    lps = [torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64), torch.tensor([-0.25], dtype=torch.float64)]
    with torch.inference_mode():
        result = regrad.check(cube, None, lps)
        assert torch.is_inference_mode_enabled()  # the caller's mode is restored
    assert result.passed and result.against == "autograd"
    for ref, lp in zip(result.reference, lps):
        torch.testing.assert_close(torch.from_numpy(ref), 3 * lp ** 2)


# ---- regrad.check(structure='datum'): a per-datum loss that is not a scalar is a named InputError.


def test_check_datum_structure_names_a_non_scalar_loss():
    lps = [torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64), torch.tensor([-0.25, -3.0], dtype=torch.float64)]
    with pytest.raises(regrad.InputError, match=r"loss of shape \(3,\) for datum 0; structure='datum' needs a scalar"):
        regrad.check(lambda d, lp: lp ** 2, [0, 1], lps, structure="datum")


# ---- regrad.check on an empty batch (autograd route): an empty, passing result, as with grad_fn.


@pytest.mark.parametrize("structure, fn", [
    ("batch", lambda d, lps: sum((lp ** 2).sum() for lp in lps)),
    ("datum", lambda d, lp: (lp ** 2).sum()),
    ("batch", regrad.losses.cross_entropy),
])
def test_check_on_an_empty_batch(structure, fn):
    result = regrad.check(fn, [], [], structure=structure)
    assert result.passed and result.max_abs_error == [] and result.max_rel_error == [] and result.worst is None
    assert result.reference == []


def test_check_on_data_without_tokens():
    lps = [torch.zeros(0, dtype=torch.float64)]
    result = regrad.check(lambda d, lps: sum((lp ** 2).sum() for lp in lps), None, lps)
    assert result.passed and result.max_abs_error == [0.0] and result.reference[0].shape == (0,)


# ---- regrad.check(grad_fn=...): a gradient that is not real numbers is named, as compose's grad_fn route names it.


def lps():
    return [torch.tensor([-0.5, -1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)]


@pytest.mark.parametrize("make, dtype", [
    (lambda x: (3 * x.numpy() ** 2).astype(complex) + 1j, "complex128"),  # imaginary part was dropped (ComplexWarning)
    (lambda x: np.array(["%r" % v for v in (3 * x.numpy() ** 2)]), "<U"),  # strings were parsed as numbers
    (lambda x: np.ones(x.shape, dtype=bool), "bool"),                       # True was read as 1.0
    (lambda x: torch.ones(x.shape, dtype=torch.complex128), "torch.complex128"),
])
def test_check_refuses_a_non_real_grad_fn_gradient(make, dtype):
    with pytest.raises(regrad.InputError, match=rf"the gradient of datum 0 has dtype {dtype}.*expected real numbers"):
        regrad.check(cube, None, lps(), grad_fn=lambda d, l: [make(x) for x in l])


def test_compose_refuses_the_same_gradient():  # the rule check should follow
    spec = regrad.RegularizerSpec.with_grad("c", 1.0, cube, lambda d, l: [np.ones(x.shape, dtype=bool) for x in l])
    with pytest.raises(Exception, match="expected real numbers"):
        regrad.compose(None, [spec]).evaluate([None, None], lps())


# ---- regrad.Datum equality with array-valued loss_fn_inputs.


def make(w):
    return Datum([1, 2, 3], {"target_tokens": np.array([2, 3, 4]), "weights": np.asarray(w, dtype=float)})


def test_datum_equality_compares_arrays_by_value():
    a, b = make([1.0, 0.0, 1.0]), make([1.0, 0.0, 1.0])
    assert a == b and not (a != b)  # raised ValueError: the truth value of an array ... is ambiguous
    assert a != make([1.0, 1.0, 1.0])
    assert b in [make([0.0, 0.0, 0.0]), a]
    assert pickle.loads(pickle.dumps(a)) == a
    assert a != Datum([1, 2, 3], {"target_tokens": np.array([2, 3, 4])})
    assert a != Datum([1, 2, 9], dict(a.loss_fn_inputs))


# ---- bfloat16 torch tensors in a regrad.Datum's loss_fn_inputs (tinker's Datum takes them).


def test_bfloat16_weights_are_read_like_tinker_reads_them():
    w = torch.tensor([1.0, 0.0, 2.0], dtype=torch.bfloat16)
    lp = [np.array([-1.0, -2.0, -3.0])]
    ours = Datum([1, 2, 3], {"target_tokens": np.arange(3), "weights": w})
    value, _ = cross_entropy([ours], lp)  # was: InputError "... is not a rectangular array (Got unsupported ScalarType BFloat16)"
    assert value == pytest.approx((1.0 + 6.0) / 3.0)
    np.testing.assert_array_equal(regrad.data.loss_input(ours, "weights"), [1.0, 0.0, 2.0])
    tinker_types = pytest.importorskip("tinker.types")
    theirs = tinker_types.Datum(model_input=tinker_types.ModelInput.from_ints([1, 2, 3]),
                                loss_fn_inputs={"target_tokens": np.arange(3), "weights": w})
    assert cross_entropy([theirs], lp)[0] == value


# ---- regrad.losses.cross_entropy: data that is not a list, a NaN loss's perplexity, huge weights without warnings.


def datum(w):
    return Datum(list(range(len(w))), {"target_tokens": np.arange(len(w)), "weights": np.asarray(w, dtype=float)})


@pytest.mark.parametrize("data", [None, 3])
def test_data_that_is_not_a_list_is_named(data):
    with pytest.raises(regrad.InputError, match="data must be a list"):  # was: TypeError "object of type 'NoneType' has no len()"
        cross_entropy(data, [np.array([-1.0, -2.0])])


@pytest.mark.parametrize("as_torch", [False, True])
def test_nan_loss_has_nan_perplexity(as_torch):
    lp = np.array([-1.0, np.nan, -2.0])
    value, metrics = cross_entropy([datum([1, 1, 1])], [torch.tensor(lp) if as_torch else lp])
    assert math.isnan(float(value))
    assert math.isnan(metrics["perplexity"])  # was inf; perplexity = exp(value)


@pytest.mark.parametrize("as_torch", [False, True])
def test_weights_whose_sum_overflows_give_the_weighted_mean_without_a_warning(as_torch):
    lp = np.array([-1.0, -2.0, -3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning "overflow encountered in reduce"
        value, metrics = cross_entropy([datum([1e308, 1e308, 1e308])], [torch.tensor(lp) if as_torch else lp])
    assert float(value) == pytest.approx(2.0)
