"""The randomized estimators (spsa, gaussian) and regrad.numerical's per-datum options: rounding of
x +- sigma, option checks, empty batches, sigma ranges (from an audit; each test failed before its fix)."""

import numpy as np
import pytest

from regrad import numerical, numerical_grad
from regrad.errors import InputError, NumericalError

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("sigma", [1e-5, 1e-4, 1e-3])
def test_spsa_divides_by_the_perturbation_actually_taken(antithetic, sigma):
    # float32 x = -10 has ulp 9.5e-7: x +- 1e-5 rounds to x +- 9.54e-6. SPSA divided by the nominal sigma
    # (a 4.6% bias at sigma = 1e-5 that no number of samples removes, with error 0); like the finite
    # differences it must divide by the step actually taken. One element: SPSA is then exact on a line.
    lps = [np.array([-10.0], np.float32)]
    result = numerical_grad(lambda d, lps: float(2.0 * np.asarray(lps[0], np.float64).sum()), None, lps,
                            method="spsa", sigma=sigma, num_samples=50, seed=0, antithetic=antithetic)
    assert float(result.grads[0][0]) == pytest.approx(2.0, rel=1e-6)


def test_spsa_points_are_the_central_points():
    # the rows SPSA hands fn are exactly x +- sigma as the central points round them (what the fix relies on)
    x = np.array([-10.0, -3.7, -0.2, 7.5], np.float32)
    seen = []
    numerical_grad(lambda d, lps: seen.append(np.array(lps[0])) or 0.0, None, [x], method="spsa", sigma=1e-5,
                   num_samples=8, seed=3)
    plus, minus = (x.astype(np.float64) + 1e-5).astype(np.float32), (x.astype(np.float64) - 1e-5).astype(np.float32)
    for row in seen:
        assert np.all((row == plus) | (row == minus))


def _fn(data, lps):
    return float(sum(np.sum(np.sin(np.asarray(l.detach(), dtype=np.float64)) ** 2) for l in lps))


@pytest.mark.parametrize("method,key,per_datum", [
    ("spsa", "sigma", True), ("gaussian", "sigma", True), ("spsa", "sigma", False), ("central", "step", True),
    ("central", "step", False),
])
def test_numerical_wrapper_cuts_per_datum_options_to_the_tensors_it_differentiates(method, key, per_datum):
    # logprobs_list[1] needs no gradient: the backward differentiates [0] and [2] only, and a sigma / step given
    # for the whole logprobs_list (one array per datum, or packed) must follow them (it used to raise InputError).
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([3.0], dtype=torch.float64)
    c = torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64, requires_grad=True)
    parts = [np.full(2, 1e-3), np.full(1, 2e-3), np.full(3, 3e-3)]
    value = parts if per_datum else np.concatenate(parts)
    extra = dict(num_samples=16, seed=5) if method != "central" else {}
    numerical(_fn, method=method, **{key: value}, **extra)(None, [a, b, c]).backward()
    ref = numerical_grad(lambda d, l: _fn(d, [l[0], b, l[1]]), None, [a.detach(), c.detach()], method=method,
                         **{key: [parts[0], parts[2]]}, **extra)
    assert torch.equal(a.grad, ref.grads[0]) and torch.equal(c.grad, ref.grads[1])


@pytest.mark.parametrize("value", ["no", "False", None, 1.5])
def test_antithetic_must_be_a_bool(value):
    # a string used to reach pybind11 (an 'incompatible function arguments' dump) and None silently ran the
    # one-sided estimator; both are named like the other options (num_samples, seed)
    with pytest.raises(InputError, match="antithetic"):
        numerical_grad(lambda d, l: float(np.sum(l[0] ** 2)), None, [np.ones(3)], method="spsa", num_samples=4,
                       antithetic=value)


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_])
def test_antithetic_bools_still_work(value):
    r = numerical_grad(lambda d, l: float(np.sum(l[0] ** 2)), None, [np.ones(3)], method="spsa", num_samples=4,
                       antithetic=value)
    assert r.nfev == (8 if value else 5)


@pytest.mark.parametrize("lps", [[], [np.zeros(0)], [np.zeros(0), np.zeros((0, 3))[:, 0]]])
@pytest.mark.parametrize("method", ["spsa", "gaussian"])
def test_randomized_empty_batch_reports_the_randomized_fields(lps, method):
    r = numerical_grad(lambda d, l: 0.0, None, lps, method=method, num_samples=5, seed=3)
    assert r.variance is not None and len(r.variance) == len(lps)
    assert all(v.shape == (0,) for v in r.variance)
    assert r.num_samples == 5 and r.seed == 3 and r.nfev == 0


@pytest.mark.parametrize("method", ["spsa", "gaussian"])
@pytest.mark.parametrize("sigma", [1e-300, 1e300])
def test_unrepresentable_sigma_is_named_as_sigma(method, sigma):
    # the randomized methods take sigma= and ignore step=: their error must not only say "use a larger step"
    with pytest.raises(NumericalError, match=r"token 0.*sigma="):
        numerical_grad(lambda d, l: float(np.sum(l[0] ** 2)), None, [np.array([1.0, 2.0])], method=method, sigma=sigma)


def test_gaussian_sigma_that_overflows_float32_at_large_u_is_refused():
    # x + sigma is finite for sigma = 3e38, but x + sigma * u is not for |u| > 1.13 (u reaches 8.57):
    # fn used to receive infinite log-probs silently
    seen = []

    def fn(data, lps):
        seen.append(bool(np.all(np.isfinite(lps[0]))))
        return float(np.sum(np.tanh(np.nan_to_num(np.asarray(lps[0], np.float64)))))

    with pytest.raises(NumericalError, match=r"sigma 3e\+38 at datum 0, token 0.*float32"):
        numerical_grad(fn, None, [np.array([1.0, 2.0], np.float32)], method="gaussian", sigma=3e38, num_samples=32)
    assert all(seen)


def test_gaussian_sigma_within_range_still_runs():
    r = numerical_grad(lambda d, l: float(np.sum(np.asarray(l[0], np.float64))), None, [np.array([1.0], np.float32)],
                       method="gaussian", sigma=1e37, num_samples=4)
    assert np.all(np.isfinite(r.grads[0]))


@pytest.mark.parametrize("num_samples", [2**62, 2**44])
@pytest.mark.parametrize("structure", ["batch", "datum"])
def test_num_samples_too_large_to_hold_the_losses_is_named(num_samples, structure):
    # 2**62 antithetic samples are 2**63 losses (numpy: "Maximum allowed dimension exceeded"); 2**44
    # need 256 TiB of losses (numpy: "Unable to allocate"). fn must never be called.
    calls = []

    def fn(data, lps):
        calls.append(1)
        return float(np.sum(lps))

    with pytest.raises(InputError, match=rf"num_samples={num_samples} needs {2 * num_samples} loss evaluations"):
        numerical_grad(fn, [None], [np.ones(4)], method="spsa", structure=structure, num_samples=num_samples)
    assert calls == []


def test_losses_buffer_shared_by_data_keeps_each_datums_estimate():
    # structure='datum' reuses one losses buffer for every datum: each datum's estimate must still
    # be its own (a linear fn of one element per datum: u**2 = 1, so SPSA is exact for every sample).
    slopes = [np.array([1.5]), np.array([-4.0]), np.array([0.25])]

    def fn(datum, lp):
        return float(np.dot(datum, lp))

    x = [np.zeros(1), np.ones(1), np.full(1, -3.0)]
    for executor in (None, "threads"):
        if executor == "threads":
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                res = numerical_grad(fn, slopes, x, method="spsa", structure="datum", num_samples=8, executor=pool)
        else:
            res = numerical_grad(fn, slopes, x, method="spsa", structure="datum", num_samples=8)
        for g, s in zip(res.grads, slopes):
            np.testing.assert_allclose(g, s, rtol=1e-6)
