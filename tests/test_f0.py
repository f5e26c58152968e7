"""numerical_grad(f0=): the caller's loss at the unperturbed log-probs replaces the one-sided
methods' own evaluation of it (same bits, one call fewer per term), and compose / regrad.numerical
hand theirs on; bad f0 is named."""

import asyncio

import numpy as np
import pytest
import torch

import regrad
from regrad import RegularizerSpec
from regrad.errors import InputError, NonFiniteError


def batch(kind="numpy", dtype=np.float64):
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(5, 2)).astype(dtype), rng.normal(size=(3, 2)).astype(dtype)]
    return [torch.from_numpy(a) for a in arrays] if kind == "torch" else arrays


def counted(fn):
    def wrapped(*args):
        wrapped.calls += 1
        return fn(*args)

    wrapped.calls = 0
    return wrapped


def _np(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def sin_total(data, lps):  # structure "batch"
    return float(sum(np.sum(np.sin(_np(a))) for a in lps))


def sin_datum(datum, lp):  # structure "datum"
    return float(np.sum(np.sin(_np(lp))))


def sin_tokens(data, lps):  # structure "token"
    return [np.sin(_np(a)) for a in lps]


def sin_vectorized(data, lps):  # batch, vectorized: one loss per copy
    return sum(np.sin(_np(a)).reshape(a.shape[0], -1).sum(-1) for a in lps)


def sin_datum_vectorized(datum, lp):
    return np.sin(_np(lp)).reshape(lp.shape[0], -1).sum(-1)


CASES = {  # name: (fn, options, f0 from the log-probs, unperturbed evaluations saved)
    "batch": (sin_total, {}, lambda lps: sin_total(None, lps), 1),
    "batch vectorized": (sin_vectorized, {"vectorized": True}, lambda lps: sin_vectorized(None, [a[None] for a in lps]), 1),
    "datum": (sin_datum, {"structure": "datum"}, lambda lps: [sin_datum(None, a) for a in lps], 2),
    "datum vectorized": (sin_datum_vectorized, {"structure": "datum", "vectorized": True},
                         lambda lps: np.array([sin_datum_vectorized(None, a[None])[0] for a in lps]), 2),
    "token": (sin_tokens, {"structure": "token"}, lambda lps: sin_tokens(None, lps), 1),
}


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_with_f0_same_bits_fewer_calls(case, kind):
    fn, options, make_f0, saved = CASES[case]
    lps = batch(kind)
    data = [0, 1] if options.get("structure") == "datum" else None
    plain, given = counted(fn), counted(fn)
    ref = regrad.numerical_grad(plain, data, lps, method="forward", **options)
    got = regrad.numerical_grad(given, data, lps, method="forward", f0=make_f0(lps), **options)
    for a, b, x in zip(got.grads, ref.grads, lps):
        np.testing.assert_array_equal(_np(a), _np(b))
        np.testing.assert_allclose(_np(a), np.cos(_np(x)), rtol=1e-6, atol=1e-6)  # forward differences of sin
    assert given.calls == plain.calls - saved
    assert (got.nfev, got.ncalls) == (ref.nfev - saved, ref.ncalls - saved)


@pytest.mark.parametrize("method", ["spsa", "gaussian"])
@pytest.mark.parametrize("structure", ["batch", "datum"])
def test_one_sided_randomized_with_f0(method, structure):
    lps = batch()
    fn = sin_total if structure == "batch" else sin_datum
    data = None if structure == "batch" else [0, 1]
    f0 = sin_total(None, lps) if structure == "batch" else [sin_datum(None, a) for a in lps]
    plain, given = counted(fn), counted(fn)
    options = dict(method=method, structure=structure, antithetic=False, num_samples=16, seed=5)
    ref = regrad.numerical_grad(plain, data, lps, **options)
    got = regrad.numerical_grad(given, data, lps, f0=f0, **options)
    for a, b in zip(got.grads, ref.grads):
        np.testing.assert_array_equal(a, b)
    terms = 1 if structure == "batch" else 2
    assert given.calls == plain.calls - terms and got.nfev == ref.nfev - terms


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_f0_on_an_empty_batch(case, kind):
    """An empty batch gives empty results with f0 as without it (the token structure's f0 of no
    per-token losses raised IndexError)."""
    fn, options, f0_of, _ = CASES[case]
    empty = batch(kind)[:0]
    f0 = f0_of(empty) if case != "batch vectorized" else np.zeros(1)
    plain = regrad.numerical_grad(fn, [], empty, method="forward", **options)
    given = regrad.numerical_grad(fn, [], empty, method="forward", f0=f0, **options)
    assert given.grads == plain.grads == [] and given.error == [] and (given.nfev, given.ncalls) == (0, 0)


def test_f0_is_what_the_differences_use():
    """A loss 1.0 above fn's moves every forward quotient by -1 / h: f0 is read, not only checked."""
    lps = batch()
    step = 1e-4
    ref = regrad.numerical_grad(sin_total, None, lps, method="forward", step=step)
    got = regrad.numerical_grad(sin_total, None, lps, method="forward", step=step, f0=sin_total(None, lps) + 1.0)
    for a, b, x in zip(got.grads, ref.grads, lps):
        h = (x + step) - x  # the step actually taken
        np.testing.assert_allclose(a - b, -1.0 / h, rtol=1e-9)


def test_f0_float32_tensor_widens_the_error_estimate():
    """A float32 f0 rounds at float32's eps: the error estimate says so, as for fn's own float32 loss."""
    lps = batch()
    f0 = sin_total(None, lps)
    ref = regrad.numerical_grad(sin_total, None, lps, method="forward", step=1e-3, f0=f0)
    got = regrad.numerical_grad(sin_total, None, lps, method="forward", step=1e-3,
                                f0=torch.tensor(f0, dtype=torch.float32))
    for a, b in zip(got.error, ref.error):
        assert np.all(a > 1e6 * b)  # eps 1.2e-7 against 2.2e-16


@pytest.mark.parametrize(
    "options, f0, error, text",
    [
        (dict(method="central"), 1.0, InputError, "never evaluates fn at the unperturbed"),
        (dict(method="richardson"), 1.0, InputError, "never evaluates fn at the unperturbed"),
        (dict(method="spsa"), 1.0, InputError, "with antithetic pairs"),
        (dict(method="forward"), float("nan"), NonFiniteError, "f0 is nan"),
        (dict(method="forward"), [1.0, 2.0], InputError, "f0 must be one loss, got shape (2,)"),
        (dict(method="forward"), "1.0", InputError, "f0 must be a real number"),
        (dict(method="forward"), torch.tensor(1.0 + 2.0j), InputError, "f0 must be a real number"),
        (dict(method="forward", structure="datum"), [1.0], InputError, "one loss per datum (2), got a list of 1"),
        (dict(method="forward", structure="datum"), {"a": 1.0}, InputError, "one loss per datum"),
        (dict(method="forward", structure="datum"), 1.0, InputError, "one loss per datum"),
        (dict(method="forward", structure="datum"), np.ones((2, 1)), InputError, "one loss per datum"),
        (dict(method="forward", structure="datum"), [np.ones(2), 1.0], InputError, "f0[0] (datum 0) must be one loss"),
        (dict(method="forward", structure="datum"), [1.0, float("inf")], NonFiniteError, "f0[1] (datum 1) is inf"),
        (dict(method="forward", structure="token"), [np.zeros((5, 2))], InputError, "list of 2 per-token loss arrays"),
        (dict(method="forward", structure="token"), [np.zeros((5, 2)), np.zeros(6)], InputError,
         "f0[1] has shape (6,); datum 1's log-probs have shape (3, 2)"),
        (dict(method="forward", structure="token"), [np.zeros((5, 2)), np.full((3, 2), -np.inf)], NonFiniteError,
         "f0[1] holds the non-finite loss -inf at element 0"),
        (dict(method="forward", structure="token", vectorized=True), [np.zeros((5, 2)), np.zeros((3, 2))], InputError,
         "saves no call"),
    ],
)
def test_bad_f0_is_named(options, f0, error, text):
    lps = batch()
    fn = {"datum": sin_datum, "token": sin_tokens}.get(options.get("structure"), sin_total)
    data = [0, 1] if options.get("structure") == "datum" else None
    calls = counted(fn)
    with pytest.raises(error, match=None) as info:
        regrad.numerical_grad(calls, data, lps, f0=f0, **options)
    assert text in str(info.value)
    # checked before fn runs, except the values of per-token f0 arrays: the core's quotient pass checks them
    assert calls.calls == (1 if error is NonFiniteError and options.get("structure") == "token" else 0)


# ---- compose and regrad.numerical hand on the loss they already have --------------------------


def test_compose_forward_term_reuses_its_value_call():
    lps = batch("torch")
    data = [0, 1]
    fn = counted(lambda data, lp: sin_total(data, [x.detach() for x in lp]))
    loss_fn = regrad.compose(None, [RegularizerSpec.sync("sin", 1.0, fn, grad="numerical", method="forward")])
    _, grads, out = loss_fn.evaluate(data, lps)
    n = sum(int(x.numel()) for x in lps)
    assert fn.calls == n + 1  # the value call, then one per log-prob (not the unperturbed copy again)
    assert out.regularizers["sin"].nfev == n
    ref = regrad.numerical_grad(sin_total, data, lps, method="forward")
    for g, r in zip(grads, ref.grads):
        np.testing.assert_array_equal(_np(g), _np(r))


def test_compose_auto_term_reuses_its_probe_call():
    """auto probes fn on tensors requiring grad; a loss with no graph keeps that call's value, which is
    then the engine's f0 too."""
    lps = batch("torch")
    fn = counted(lambda data, lp: torch.tensor(sin_total(data, [x.detach() for x in lp]), dtype=torch.float64))
    loss_fn = regrad.compose(None, [RegularizerSpec.sync("sin", 1.0, fn, method="forward")])
    _, grads, out = loss_fn.evaluate([0, 1], lps)
    n = sum(int(x.numel()) for x in lps)
    assert out.regularizers["sin"].grad_method == "numerical:forward"
    assert fn.calls == 1 + n
    ref = regrad.numerical_grad(sin_total, [0, 1], lps, method="forward")
    for g, r in zip(grads, ref.grads):
        np.testing.assert_array_equal(_np(g), _np(r))


@pytest.mark.parametrize("structure, fn, saved", [("datum", sin_datum, 2), ("token", sin_tokens, 1),
                                                  ("datum vectorized", sin_datum_vectorized, 2)])
def test_compose_forward_term_reuses_value_calls_by_structure(structure, fn, saved):
    lps = batch("torch")
    data = [0, 1]
    plain, given = counted(fn), counted(fn)
    options = dict(method="forward", structure=structure.split()[0], vectorized=structure.endswith("vectorized"))
    loss_fn = regrad.compose(None, [RegularizerSpec.sync("sin", 1.0, given, grad="numerical", **options)])
    _, grads, _ = loss_fn.evaluate(data, lps)  # (datum vectorized: a list of shape-(1,) tensors is its f0)
    ref = regrad.numerical_grad(plain, data, lps, **options)
    assert given.calls == plain.calls  # value calls (1 or one per datum) + the engine's, less what f0 saves
    for g, r in zip(grads, ref.grads):
        np.testing.assert_array_equal(_np(g), _np(r))


def test_compose_async_one_sided_spsa_term_reuses_its_value_call():
    lps = batch("torch")
    calls = []

    async def sin_async(data, lp):
        calls.append(1)
        await asyncio.sleep(0)
        return sin_total(data, lp)

    spec = RegularizerSpec.async_("sin", 1.0, sin_async, grad="spsa", antithetic=False, num_samples=8, seed=2)
    loss_fn = regrad.compose(None, [spec])
    _, grads, out = loss_fn.evaluate([0, 1], lps)
    assert len(calls) == 1 + 8  # the value call and the 8 one-sided samples
    ref = regrad.numerical_grad(sin_total, [0, 1], lps, method="spsa", antithetic=False, num_samples=8, seed=2)
    for g, r in zip(grads, ref.grads):
        np.testing.assert_array_equal(_np(g), _np(r))


def test_numerical_wrapper_forward_reuses_its_forward_loss():
    lps = [t.clone().requires_grad_(True) for t in batch("torch")]
    fn = counted(lambda data, lp: torch.tensor(sin_total(data, [x.detach() for x in lp]), dtype=torch.float64))
    loss = regrad.numerical(fn, method="forward")(None, lps)
    loss.backward()
    n = sum(int(x.numel()) for x in lps)
    assert fn.calls == 1 + n  # forward, then one call per log-prob in backward
    ref = regrad.numerical_grad(sin_total, None, [x.detach() for x in lps], method="forward")
    for x, r in zip(lps, ref.grads):
        torch.testing.assert_close(x.grad, r, rtol=0, atol=0)


def test_numerical_wrapper_float16_does_not_reuse_a_float16_loss():
    """float16 tensors are differentiated in float32: fn's float16 loss is not the engine's f(x)."""
    lps = [torch.linspace(-1, 1, 7, dtype=torch.float16).requires_grad_(True)]

    def cube(data, lp):  # computes in the tensors' own dtype
        return (lp[0].detach() ** 3).sum()

    fn = counted(cube)
    regrad.numerical(fn, method="forward")(None, lps).backward()
    assert fn.calls == 1 + 1 + 7  # forward, the engine's own unperturbed float32 call, 7 perturbations
    ref = regrad.numerical_grad(cube, None, [lps[0].detach()], method="forward")
    torch.testing.assert_close(lps[0].grad, ref.grads[0], rtol=0, atol=0)


def test_f0_is_not_a_wrap_time_or_spec_option():
    with pytest.raises(InputError, match="unknown option"):
        regrad.numerical(sin_total, method="forward", f0=1.0)
    with pytest.raises(ValueError, match="unknown numerical options"):
        regrad.compose(None, [RegularizerSpec.sync("sin", 1.0, sin_total, grad="numerical", method="forward", f0=1.0)])
