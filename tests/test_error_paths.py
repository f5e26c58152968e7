"""Untested error paths (from a coverage audit; each test failed before its fix): bool / complex losses on the
datum-vectorized fast path, a nested composed loss's error chain, regrad.numerical's forward reading its
loss as numerical_grad does, and an AdamParams int beyond float64."""

import math
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import NonFiniteError, NumericalError, RegularizerError, RegularizerSpec  # noqa: E402
from regrad.clients import AdamParams, LocalTrainingClient  # noqa: E402
from regrad.model import ByteLMConfig, default_model  # noqa: E402


def _lps(requires_grad=False):
    return [torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=requires_grad),
            torch.tensor([-0.3, -0.7], dtype=torch.float64, requires_grad=requires_grad)]


# ---- numerical_grad, structure="datum", vectorized=True, torch inputs: the per-datum fast path read fn's
# output with Tensor.numpy(), which also reads bool (gradient silently 0) and complex (imaginary part dropped
# with a ComplexWarning) tensors; docs/numerical.md's error table says both are a NumericalError, as on
# every other route.


@pytest.mark.parametrize("method", ["central", "richardson"])  # (forward reads x first, on a checked path)
@pytest.mark.parametrize("kind", [torch.bool, torch.complex128])
def test_datum_vectorized_fn_returning_bool_or_complex_tensor_is_a_numerical_error(kind, method):
    def fn(datum, copies):  # one loss per perturbed copy, of the wrong kind
        losses = (copies ** 2).sum(-1)
        return losses > 1.0 if kind is torch.bool else losses.to(kind)

    with pytest.raises(NumericalError, match=rf"fn '.*<locals>.fn' returned Tensor of {kind} at .*; expected one loss per perturbed copy"):
        regrad.numerical_grad(fn, [None, None], _lps(), structure="datum", vectorized=True, method=method)


# ---- compose: a term that raises a RegularizerError itself (a nested composed loss) was re-raised with
# `raise err from err`, making the error its own __cause__ and dropping the chain to the user's exception
# (errors.py: `cause` is the underlying exception, also `__cause__`).


def _inner_fails(data, lps):
    raise ValueError("inner boom")


@pytest.mark.parametrize("mode", ["serial", "parallel", "async"])
def test_nested_composed_loss_error_keeps_the_users_exception_as_its_cause(mode):
    inner = regrad.compose(lambda d, lp: -lp[0].sum(), [RegularizerSpec.sync("inner_reg", 1.0, _inner_fails)])
    if mode == "async":
        async def nested(data, lps):
            return await inner.acall(data, lps)

        term = RegularizerSpec.async_("nested", 1.0, nested, grad="autograd")
    else:
        term = RegularizerSpec.sync("nested", 1.0, inner, grad="autograd")
    outer = regrad.compose(lambda d, lp: -lp[0].sum(), [term], parallel=mode == "parallel")
    with pytest.raises(RegularizerError) as info:
        outer([None, None], _lps(requires_grad=True))
    err = info.value
    assert err.name == "inner_reg" and type(err.cause) is ValueError
    assert err.__cause__ is err.cause  # was: err.__cause__ is err
    assert "_inner_fails" in "".join(traceback.format_exception(err))  # where the user's code raised


# ---- regrad.numerical: the forward read fn's loss with float(), so "1.5" became 1.5 and True 1.0 (the
# backward then refused them); numerical_grad, compose and docs/numerical.md say strings are not parsed and
# bools are not numbers. A non-finite loss was handed to the backward as f0, whose error named an f0 the
# caller never gave.


@pytest.mark.parametrize("loss, named", [("1.5", "str"), (True, "bool"), (torch.tensor(True), "Tensor of torch.bool")])
def test_numerical_wrapper_forward_refuses_a_loss_that_is_not_a_real_number(loss, named):
    wrapped = regrad.numerical(lambda data, lps: loss)
    with pytest.raises(NumericalError, match=rf"returned {named}; expected a scalar loss"):
        wrapped(None, _lps(requires_grad=True))


@pytest.mark.parametrize("options", [{"method": "forward"}, {"method": "spsa", "antithetic": False, "num_samples": 4}])
def test_numerical_wrapper_non_finite_loss_is_named_as_fns_not_as_an_f0(options):
    lps = _lps(requires_grad=True)
    loss = regrad.numerical(lambda data, lp: float("nan"), **options)(None, lps)
    assert math.isnan(float(loss.detach()))  # the forward passes it on, as before
    with pytest.raises(NonFiniteError, match=r"returned the non-finite loss nan at the unperturbed log-probs") as info:
        loss.backward()
    assert "f0 is" not in str(info.value)


# ---- AdamParams: "each field is a finite real number >= 0 ... (a bool is a ValueError)" (docs/clients.md);
# an int beyond float64 raised math.isfinite's OverflowError instead.


@pytest.mark.parametrize("params", [AdamParams(learning_rate=10**400), {"weight_decay": -(10**400)}])
def test_adam_params_int_beyond_float64_is_a_value_error(params):
    client = LocalTrainingClient(default_model(0, ByteLMConfig(d_model=16, n_layers=1, n_heads=2, context=16)))
    with pytest.raises(ValueError, match=r"must be a finite number >= 0, got an integer beyond float64's range"):
        client.optim_step(params)
    assert client.optim_step().result().metrics["optim/step"] == 1  # nothing was queued by the refused call
    client.close()


@pytest.mark.parametrize("big", [2**64, -(2**70)])
def test_an_int_loss_past_64_bits_is_read_as_the_float_it_is(big):
    # docs: integer losses are read as float64; numpy made an int past 64 bits an object array, refused as "int"
    result = regrad.numerical_grad(lambda d, lps: big + 0 * int(lps[0].size), None, [np.ones(3)])
    assert [g.tolist() for g in result.grads] == [[0.0, 0.0, 0.0]]
    with pytest.raises(NumericalError, match="returned int beyond float64's range"):
        regrad.numerical_grad(lambda d, lps: 10**400, None, [np.ones(3)])
