"""The C++ numerical core's edges (from an audit; each test failed before its fix): subnormal steps,
the float32 token pass out of float's range, quotients that overflow although every loss is finite,
and the bindings' bounds checks under int64 wrap-around."""

import numpy as np
import pytest

from regrad import _core, numerical_grad
from regrad.errors import NonFiniteError, NumericalError

# ---- subnormal steps -----------------------------------------------------------------------------
# x + h - x was nonzero, so it passed the underflow check, but 1 / (s[0] - s[1]) = inf and an
# unchanged loss read 0 * inf = NaN: a silent NaN gradient (and error) instead of a named step error.


@pytest.mark.parametrize("method", ["central", "richardson", "forward"])
@pytest.mark.parametrize("structure", ["batch", "token"])
@pytest.mark.parametrize("step", [1e-310, 5e-324])
def test_subnormal_step_is_named_not_a_silent_nan(method, structure, step):
    x = [np.zeros(3)]
    if structure == "token":
        fn = lambda d, lps: [np.zeros_like(np.asarray(a)) for a in lps]  # noqa: E731
    else:
        fn = lambda d, lps: 0.0  # noqa: E731
    with pytest.raises(NumericalError, match=r"^step underflow at datum 0, token 0: (x \+ h - x is subnormal|x \+ h == x)"):
        numerical_grad(fn, None, x, method=method, structure=structure, step=step)


def test_core_difference_points_refuses_a_subnormal_spacing():
    with pytest.raises(ValueError, match="step underflow at datum 0, token 0"):
        _core.difference_points([np.zeros(2)], "central", 1e-3, np.array([1e-310]))
    # the smallest normal step still works, and its quotients' reciprocal is finite
    points, spacing = _core.difference_points([np.zeros(2)], "central", 1e-3, np.array([2.3e-308]))
    assert np.all(np.isfinite(1.0 / (spacing[0] - spacing[1])))


# ---- the float32 token pass --------------------------------------------------------------------
# float32 log-probs with float32 per-token losses are differenced in float, but the steps were only
# range-checked for double: h > FLT_MAX / 2 gave 1 / inf = 0 (zeros, central) or NaN (Richardson),
# h < ~3e-39 at x = 0 gave 0 * inf = NaN. Such a datum is now differenced again in double.


def _linear(scale, dtype):
    return lambda d, lps: [(np.asarray(a, np.float64) * scale).astype(dtype) for a in lps]


@pytest.mark.parametrize("method", ["central", "richardson"])
@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("scale,step", [(1e-10, 2e38), (1.0, 2e38), (2.0, 1e38)])
def test_float32_token_pass_matches_the_double_pass_for_large_steps(method, vectorized, scale, step):
    x = [np.array([0.0, 1.0], np.float32)]
    got = numerical_grad(_linear(scale, np.float32), None, x, method=method, structure="token", step=step,
                         vectorized=vectorized)
    ref = numerical_grad(_linear(scale, np.float64), None, x, method=method, structure="token", step=step,
                         vectorized=vectorized)
    assert np.all(np.isfinite(got.grads[0])) and np.all(np.isfinite(got.error[0]))
    np.testing.assert_allclose(got.grads[0], scale, rtol=1e-5)  # a linear loss: the exact slope
    np.testing.assert_allclose(got.grads[0], ref.grads[0], rtol=1e-5)


@pytest.mark.parametrize("method", ["central", "richardson"])
@pytest.mark.parametrize("step", [1e-40, 1e-44])
def test_float32_token_pass_tiny_step_is_not_nan(method, step):
    x = [np.array([0.0], np.float32)]
    const = lambda d, lps: [np.zeros(np.shape(a), np.float32) for a in lps]  # noqa: E731
    r = numerical_grad(const, None, x, method=method, structure="token", step=step)
    assert np.all(np.isfinite(r.grads[0])) and np.all(np.isfinite(r.error[0]))
    np.testing.assert_array_equal(r.grads[0], 0.0)


# ---- quotients that overflow although every loss is finite ----------------------------------------
# Losses of +-1.5e308 at x +- h: (f+ - f-) / 2h is inf (Richardson: inf - inf = NaN). The gradient came
# back inf / NaN without a word, in every structure and method.

_OVERFLOW = r"numerical gradient of .* at datum 0, token 1 is (inf|nan), not finite in float64: every loss was finite"


def _steep_scalar(d, lps):
    return float(1.5e308 * np.tanh(1e3 * np.asarray(lps[0])[1]))


def _steep_tokens(d, lps):
    return [1.5e308 * np.tanh(1e3 * np.asarray(a)) for a in lps]


@pytest.mark.parametrize("method", ["central", "richardson", "forward", "spsa", "gaussian"])
def test_overflowing_quotient_is_named_in_the_batch_structure(method):
    options = {"sigma": 1e-2} if method in ("spsa", "gaussian") else {"step": 1e-2}
    with pytest.raises(NonFiniteError, match=_OVERFLOW.replace("token 1", "token [01]")):
        numerical_grad(_steep_scalar, None, [np.zeros(3)], method=method, **options)


@pytest.mark.parametrize("method", ["central", "richardson", "forward"])
@pytest.mark.parametrize("vectorized", [False, True])
def test_overflowing_quotient_is_named_in_the_token_structure(method, vectorized):
    x = [np.array([1.0, 0.0, 1.0])]  # token 0: tanh saturates, a finite gradient; token 1 overflows
    with pytest.raises(NonFiniteError, match=_OVERFLOW):
        numerical_grad(_steep_tokens, None, x, method=method, structure="token", step=1e-2, vectorized=vectorized)


@pytest.mark.parametrize("structure", ["batch", "token"])
def test_float32_gradient_past_float32_range_is_named_and_one_inside_is_kept(structure):
    # float64 losses of float32 log-probs: a slope of 1e39 is finite in double but inf once rounded
    # to the float32 gradient; 1e37 fits and must come back as is.
    def fn(slope):
        if structure == "token":
            return lambda d, lps: [slope * np.asarray(a, np.float64) for a in lps]
        return lambda d, lps: float(slope * np.sum(np.asarray(lps[0], np.float64)))

    x = [np.array([0.5, 1.0], np.float32)]
    ok = numerical_grad(fn(1e37), None, x, structure=structure, step=1e-2)
    np.testing.assert_allclose(ok.grads[0], 1e37, rtol=1e-5)
    with pytest.raises(NonFiniteError, match=r"at datum 0, token 0 is (1e\+39|inf), not finite in float32: every loss was finite"):
        numerical_grad(fn(1e39), None, x, structure=structure, step=1e-2)


# ---- bounds checks under int64 wrap-around ------------------------------------------------------
# Index sums and products in int64 wrapped for huge arguments, so the checks passed and the core read
# outside the arrays (a segfault, or wrong elements). The values wrap onto readable memory, so the old
# code returned instead of crashing.


def test_difference_quotients_refuses_strides_whose_product_wraps():
    spacing = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    with pytest.raises(ValueError, match="loss values"):
        _core.difference_quotients("central", spacing, np.arange(4.0), 2**62, 1)  # (n-1) * 2**62 wraps
    with pytest.raises(ValueError, match="loss values"):
        _core.difference_quotients("central", spacing, np.arange(4.0), 1, 2**63 - 1)
    with pytest.raises(ValueError, match="f0 is too short"):
        _core.difference_quotients("forward", spacing[:1], np.arange(3.0), 1, 0, np.zeros(1), 2**62)


def _points_view():
    base = np.arange(4.0)  # points is a view one element in: the wrapped read lands on base[0]
    return base[1:3].reshape(1, 2)


def test_difference_block_refuses_an_element_offset_that_wraps():
    out = [np.zeros((1, 2))]
    with pytest.raises(ValueError, match="points has shape"):
        _core.difference_block([np.array([1.0, 2.0])], out, _points_view(), 2**63 - 1, 1, 0, 1, True)
    np.testing.assert_array_equal(out[0], 0.0)  # nothing written


def test_difference_diagonal_refuses_an_element_offset_that_wraps():
    buffer = np.zeros((1, 2))
    with pytest.raises(ValueError, match="points has shape"):
        _core.difference_diagonal(buffer, _points_view(), 2**63 - 1, 1)
    np.testing.assert_array_equal(buffer, 0.0)


def test_core_refuses_stacked_token_losses_not_aligned_to_their_dtype():
    """token_quotients reads whole floats: stacked per-token losses (numpy arrays or addresses) at an
    odd address are refused, as every other array the core reads (the engine then copies them)."""
    import torch

    lps = [np.linspace(-2.0, -0.5, 5), np.linspace(-1.0, -0.1, 3)]
    points, _ = _core.difference_points(lps, "central", 1e-3, None, False, True)
    aligned = [np.ascontiguousarray(np.tile(a, 2)) for a in lps]  # R = 2 rows per datum
    grad_error, bad = _core.token_quotients("central", lps, points, aligned, 1e-16, True)
    assert bad == -1 and grad_error.shape == (16,)
    odd = [aligned[0], np.frombuffer(b"\0" + aligned[1].tobytes(), dtype=np.float64, count=6, offset=1)]
    assert not odd[1].flags.aligned
    with pytest.raises(ValueError, match=r"loss values\[1\] is not aligned to its dtype"):
        _core.token_quotients("central", lps, points, odd, 1e-16, True)
    tensors = [torch.from_numpy(a) for a in aligned]
    addresses = [t.data_ptr() for t in tensors]
    again, _ = _core.token_quotients("central", lps, points, (addresses, "float64"), 1e-16, True)
    np.testing.assert_array_equal(again, grad_error)
    with pytest.raises(ValueError, match=r"loss values\[0\] is not aligned to its dtype"):
        _core.token_quotients("central", lps, points, ([addresses[0] + 4, addresses[1]], "float64"), 1e-16, True)
