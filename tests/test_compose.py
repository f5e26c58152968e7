"""compose(): gradients through every route, concurrency, failures, and the real Tinker SDK path."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec  # noqa: E402
from regrad.errors import InputError, NonFiniteError  # noqa: E402

LENGTHS = (7, 3, 12, 5)


def make_batch(dtype=torch.float64, seed=0):
    """Random log-probs in (-4, -0.01) and data with random weights (one datum without weights)."""
    gen = np.random.default_rng(seed)
    lps = [torch.from_numpy(-gen.uniform(0.01, 4.0, n)).to(dtype) for n in LENGTHS]
    data = []
    for i, n in enumerate(LENGTHS):
        inputs = {"target_tokens": gen.integers(0, 255, n)}
        if i != 1:
            inputs["weights"] = gen.uniform(0.0, 1.0, n).astype(np.float32)
        data.append(regrad.Datum(list(range(n)), inputs))
    return data, lps


def leaves(lps):
    return [x.clone().requires_grad_(True) for x in lps]


def weights_of(data):
    out = []
    for d, n in zip(data, LENGTHS):
        w = d.loss_fn_inputs.get("weights")
        out.append(torch.ones(n, dtype=torch.float64) if w is None else torch.from_numpy(np.asarray(w, np.float64)))
    return out


# Regularizers, each paired with a torch expression of the same value for the hand-written total


def softplus_reg(data, logprobs_list):
    """Plain torch: autograd route."""
    total = sum(torch.nn.functional.softplus(x).sum() for x in logprobs_list)
    return total / len(logprobs_list), {"softplus_total": total.item()}


def cubic_value(data, logprobs_list):
    """numpy only (torch cannot differentiate it): user or numerical route."""
    return float(sum(np.sum(np.asarray(x) ** 3) for x in logprobs_list)), {}


def cubic_grad(data, logprobs_list):
    return [3 * np.asarray(x) ** 2 for x in logprobs_list]


def hand_total(data, xs, terms):
    """Σ weight·term by hand in torch; terms name the pieces in `terms`."""
    n = len(xs)
    ws = weights_of(data)
    pieces = {
        "ce": lambda: -sum((w * x).sum() for w, x in zip(ws, xs)) / sum(w.sum() for w in ws),
        "l1": lambda: sum(x.abs().sum() for x in xs) / n,
        "l2": lambda: sum((x * x).sum() for x in xs) / n,
        "entropy": lambda: sum(-(x.exp() * x).sum() for x in xs) / n,
        "softplus": lambda: softplus_reg(data, xs)[0],
        "cubic": lambda: sum((x**3).sum() for x in xs),
    }
    return sum(weight * pieces[name]() for name, weight in terms)


MIX = [("ce", 1.0), ("l1", 0.1), ("l2", 0.01), ("entropy", 0.2), ("softplus", 0.3), ("cubic", 0.05)]


def mixed_loss(**options):
    return regrad.compose(
        regrad.losses.cross_entropy,
        [
            regrad.l1(0.1),
            regrad.l2(0.01),
            regrad.entropy(0.2),
            {"fn": softplus_reg, "weight": 0.3, "name": "softplus"},
            RegularizerSpec.with_grad("cubic", 0.05, cubic_value, cubic_grad),
        ],
        **options,
    )


@pytest.mark.parametrize("parallel", [True, False])
def test_gradient_of_mixed_routes_equals_hand_written_autograd(parallel):
    data, lps = make_batch()
    loss_fn = mixed_loss(parallel=parallel)
    ours = leaves(lps)
    loss, metrics = loss_fn(data, ours)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    loss.backward()
    ref = leaves(lps)
    total = hand_total(data, ref, MIX)
    total.backward()
    assert loss.item() == pytest.approx(total.item(), rel=1e-12)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    out = loss_fn.last_output
    methods = {name: r.grad_method for name, r in out.regularizers.items()}
    assert methods == {"l1": "analytic", "l2": "analytic", "entropy": "analytic", "softplus": "autograd", "cubic": "user"}
    assert out.base_loss.grad_method == "analytic"
    assert metrics["loss_total"] == pytest.approx(total.item(), rel=1e-12)


def test_grad_norms_equal_hand_computed_ones():
    data, lps = make_batch()
    loss_fn = mixed_loss()
    loss_fn(data, leaves(lps))
    out = loss_fn.last_output
    total_grad = []
    for name, weight in MIX:
        xs = leaves(lps)
        term = hand_total(data, xs, [(name, 1.0)])
        grads = torch.autograd.grad(term, xs)
        norm = torch.cat(grads).norm().item()
        total_grad.append(weight * torch.cat(grads))
        entry = out.base_loss if name == "ce" else out.regularizers[{"softplus": "softplus"}.get(name, name)]
        assert entry.grad_norm == pytest.approx(norm, rel=1e-12)
        if name != "ce":
            assert entry.grad_norm_weighted == pytest.approx(weight * norm, rel=1e-12)
    assert out.total_grad_norm == pytest.approx(sum(total_grad).norm().item(), rel=1e-12)


def test_evaluate_returns_the_gradient_without_autograd():
    data, lps = make_batch()
    value, grads, output = mixed_loss().evaluate(data, lps)
    ref = leaves(lps)
    total = hand_total(data, ref, MIX)
    total.backward()
    assert value == pytest.approx(total.item(), rel=1e-12) and output.loss_total == value
    assert all(isinstance(g, torch.Tensor) and g.shape == x.shape for g, x in zip(grads, lps))
    for g, x in zip(grads, ref):
        torch.testing.assert_close(g, x.grad)


def test_numpy_inputs_give_numpy_gradients():
    data, lps = make_batch()
    arrays = [x.numpy() for x in lps]
    loss_fn = regrad.compose(regrad.losses.cross_entropy, [regrad.l1(0.1), RegularizerSpec.with_grad("cubic", 0.05, cubic_value, cubic_grad)])
    value, grads, _ = loss_fn.evaluate(data, arrays)
    ref = leaves(lps)
    hand_total(data, ref, [("ce", 1.0), ("l1", 0.1), ("cubic", 0.05)]).backward()
    for g, x in zip(grads, ref):
        assert isinstance(g, np.ndarray) and g.dtype == np.float64
        np.testing.assert_allclose(g, x.grad.numpy(), rtol=1e-12)
    loss, _ = loss_fn(data, arrays)
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad and loss.item() == pytest.approx(value)


def test_float32_inputs_keep_their_dtype():
    data, lps = make_batch(torch.float32)
    ours = leaves(lps)
    loss, _ = mixed_loss()(data, ours)
    loss.backward()
    assert loss.dtype == torch.float32 and all(x.grad.dtype == torch.float32 for x in ours)
    ref = leaves([x.double() for x in lps])
    hand_total(data, ref, MIX).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


def test_regularizers_only_and_zero_weight():
    data, lps = make_batch()
    loss_fn = regrad.compose(None, [regrad.l1(0.0, name="off"), regrad.l2(2.0)])
    ours = leaves(lps)
    loss, metrics = loss_fn(data, ours)
    loss.backward()
    ref = leaves(lps)
    hand_total(data, ref, [("l2", 2.0)]).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    assert loss_fn.last_output.base_loss is None and "base_loss/value" not in metrics
    assert loss_fn.last_output.regularizers["off"].contribution == 0.0


def test_backward_scales_with_grad_output():
    data, lps = make_batch()
    ours = leaves(lps)
    loss, _ = mixed_loss()(data, ours)
    (3.0 * loss).backward()
    _, grads, _ = mixed_loss().evaluate(data, lps)
    for x, g in zip(ours, grads):
        torch.testing.assert_close(x.grad, 3.0 * g)


def test_each_fn_runs_once_per_call():
    data, lps = make_batch()
    calls = {"torch": 0, "user": 0, "grad": 0}

    def counted_torch(data, lp):
        calls["torch"] += 1
        return softplus_reg(data, lp)

    def counted_user(data, lp):
        calls["user"] += 1
        return cubic_value(data, lp)

    def counted_grad(data, lp):
        calls["grad"] += 1
        return cubic_grad(data, lp)

    loss_fn = regrad.compose(
        regrad.losses.cross_entropy,
        [RegularizerSpec.sync("t", 0.1, counted_torch), RegularizerSpec.with_grad("u", 0.1, counted_user, counted_grad)],
    )
    loss, _ = loss_fn(data, leaves(lps))
    loss.backward()
    assert calls == {"torch": 1, "user": 1, "grad": 1}


def test_results_are_reported_in_spec_order():
    data, lps = make_batch()

    def slow(data, lp):
        time.sleep(0.05)
        return 1.0, {}

    specs = [RegularizerSpec.with_grad(f"r{i}", 0.1, slow if i == 0 else cubic_value, cubic_grad) for i in range(4)]
    loss_fn = regrad.compose(regrad.losses.cross_entropy, specs)
    _, metrics = loss_fn(data, lps)
    assert list(loss_fn.last_output.regularizers) == ["r0", "r1", "r2", "r3"]
    keys = [k.split("/")[1] for k in metrics if k.startswith("reg/") and k.endswith("/value")]
    assert keys == ["r0", "r1", "r2", "r3"]


def test_sync_regularizers_run_on_worker_threads():
    data, lps = make_batch()
    threads = []

    def where(data, lp):
        threads.append(threading.current_thread().name)
        return 0.0, {}

    specs = [RegularizerSpec.with_grad(f"r{i}", 0.1, where, cubic_grad) for i in range(3)]
    regrad.compose(regrad.losses.cross_entropy, specs)(data, lps)
    assert sum(name.startswith("regrad") for name in threads) == 3
    threads.clear()
    regrad.compose(regrad.losses.cross_entropy, specs, parallel=False)(data, lps)
    assert threads == [threading.current_thread().name] * 3


# ------------------------------------------------------------------------------------------------
# Failures: RegularizerError naming the regularizer, no partial result


def _failing(exc):
    def fn(data, lp):
        raise exc

    return fn


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize(
    ("fn", "cause", "message"),
    [
        (_failing(ValueError("bad topology")), ValueError, "bad topology"),
        (lambda data, lp: (float("nan"), {}), NonFiniteError, "loss is nan"),
        (lambda data, lp: (torch.tensor(float("inf")), {}), NonFiniteError, "loss is inf"),
        (lambda data, lp: (torch.ones(3), {}), TypeError, r"shape \(3,\)"),
        (lambda data, lp: (torch.ones(1), {}), TypeError, r"shape \(1,\)"),
        (lambda data, lp: ("1.0", {}), TypeError, "str loss"),
        (lambda data, lp: (1.0, {"m": "x"}), TypeError, "metric 'm'"),
        (lambda data, lp: (1.0, 2.0, 3.0), TypeError, "tuple of 3"),
    ],
)
def test_a_failing_regularizer_fails_the_call(fn, cause, message, parallel):
    data, lps = make_batch()
    armed = []

    def topology(data, lp):
        return fn(data, lp) if armed else (sum(x.sum() for x in lp) * 0.0, {})

    loss_fn = regrad.compose(regrad.losses.cross_entropy, [regrad.l1(0.1), RegularizerSpec.sync("topology", 0.1, topology)], parallel=parallel)
    loss_fn(data, lps)
    assert loss_fn.last_output is not None
    armed.append(True)
    with pytest.raises(RegularizerError, match=r"'topology'") as info:
        loss_fn(data, leaves(lps))
    assert info.value.name == "topology" and isinstance(info.value.cause, cause)
    assert info.value.__cause__ is info.value.cause
    assert re.search(message, str(info.value.cause))
    assert loss_fn.last_output is None


def test_non_finite_or_misshapen_gradients_fail_the_call():
    data, lps = make_batch()
    bad_value = RegularizerSpec.with_grad("g", 0.1, cubic_value, lambda d, lp: [x * float("nan") for x in lp])
    with pytest.raises(RegularizerError, match="'g'.*non-finite") as info:
        regrad.compose(None, [bad_value])(data, lps)
    assert isinstance(info.value.cause, NonFiniteError)
    bad_shape = RegularizerSpec.with_grad("s", 0.1, cubic_value, lambda d, lp: [x[:-1] for x in lp])
    with pytest.raises(RegularizerError, match=r"'s'.*datum 0 has shape \(6,\)"):
        regrad.compose(None, [bad_shape])(data, lps)
    too_few = RegularizerSpec.with_grad("f", 0.1, cubic_value, lambda d, lp: lp[:2])
    with pytest.raises(RegularizerError, match=r"'f'.*2 entries"):
        regrad.compose(None, [too_few])(data, lps)


@pytest.mark.parametrize("track_grad_norms", [True, False])
def test_a_non_finite_gradient_names_its_first_element(track_grad_norms):
    data, lps = make_batch()

    def poisoned(d, lp):
        grads = [3 * np.asarray(x) ** 2 for x in lp]
        grads[2].reshape(-1)[5] = grads[2].reshape(-1)[9] = np.inf  # flat elements 5 and 9 of datum 2
        return grads

    spec = RegularizerSpec.with_grad("p", 0.1, cubic_value, poisoned)
    with pytest.raises(RegularizerError, match=r"'p'.*user gradient has non-finite entries \(2 of 27\); the first, inf, at datum 2, token 5"):
        regrad.compose(None, [spec], track_grad_norms=track_grad_norms)(data, lps)
    wide = [x.reshape(-1, 1).expand(-1, 3).contiguous() for x in lps]
    with pytest.raises(RegularizerError, match=r"\(2 of 81\); the first, inf, at datum 2, token 1, column 2"):
        regrad.compose(None, [spec], track_grad_norms=track_grad_norms)(data, wide)


@pytest.mark.parametrize("is_async", [False, True])
def test_numerical_route_errors_name_the_users_fn(is_async):
    data, lps = make_batch()

    def sqrt_of_first(d, lp):  # finite at x and x + h, NaN at x - h (h = 0.01)
        x = np.asarray(lp[0])
        return float(np.sqrt(x[0] + 0.005 - lps[0][0].item())), {}

    async def async_sqrt_of_first(d, lp):
        return sqrt_of_first(d, lp)

    fn = async_sqrt_of_first if is_async else sqrt_of_first
    spec = {"fn": fn, "weight": 1.0, "name": "s", "grad": "numerical", "numerical_options": {"step": 0.01}}
    with np.errstate(invalid="ignore"), pytest.raises(
        RegularizerError, match=rf"'s'.*fn '.*{fn.__name__}' returned the non-finite loss nan .*datum 0, token 0, step -h"
    ):
        regrad.compose(None, [spec])(data, lps)


def test_a_gradient_norm_beyond_float64_is_named_not_written_as_infinity():
    data, lps = make_batch()
    huge = RegularizerSpec.with_grad("huge", 1.0, cubic_value, lambda d, lp: [np.full(x.shape, 1e308) for x in lp])
    with pytest.raises(RegularizerError, match="'huge'.*L2 norm overflows float64"):
        regrad.compose(None, [huge])(data, lps)
    _, _, out = regrad.compose(None, [huge], track_grad_norms=False).evaluate(data, lps)  # no norm asked: fine
    assert out.regularizers["huge"].grad_norm is None


def test_autograd_route_needs_a_graph():
    data, lps = make_batch()
    spec = RegularizerSpec.sync("counted", 0.1, lambda d, lp: (float(len(lp)), {}), grad="autograd")
    with pytest.raises(RegularizerError, match="'counted'.*no autograd graph"):
        regrad.compose(None, [spec])(data, lps)


def test_a_graph_that_misses_the_inputs_goes_numerical():
    # A numpy regularizer wrapped back into a fresh leaf: autograd would give an all-zero gradient.
    data, lps = make_batch()
    value = lambda d, lp: float(sum(np.sum(np.tanh(x.detach().numpy())) for x in lp))  # noqa: E731
    rewrapped = lambda d, lp: (torch.tensor(value(d, lp), dtype=torch.float64, requires_grad=True), {})  # noqa: E731
    loss_fn = regrad.compose(None, [{"fn": rewrapped, "weight": 1.0, "name": "t"}])
    xs = leaves(lps)
    loss, _ = loss_fn(data, xs)
    loss.backward()
    assert loss_fn.last_output.regularizers["t"].grad_method == "numerical"
    for x in xs:
        np.testing.assert_allclose(x.grad.numpy(), 1 - np.tanh(x.detach().numpy()) ** 2, rtol=1e-6)
    strict = RegularizerSpec.sync("t", 1.0, rewrapped, grad="autograd")
    with pytest.raises(RegularizerError, match="'t'.*does not reach the log-probs"):
        regrad.compose(None, [strict])(data, leaves(lps))


@pytest.mark.parametrize("grad", ["auto", "numerical"])
def test_a_regularizer_sorting_the_log_probs_in_place_fails_and_they_are_put_back(grad):
    data, lps = make_batch()
    before = [x.clone() for x in lps]

    def top_sorted(d, lp):  # np.ndarray.sort() sorts the caller's memory
        return float(sum((a.sort(), a[-1])[1] for a in (x.detach().numpy() for x in lp)))

    spec = RegularizerSpec.sync("topsort", 1.0, top_sorted, grad=grad)
    with pytest.raises(RegularizerError, match="'topsort'.*datum 0 changed in place.*put back"):
        regrad.compose(regrad.losses.cross_entropy, [spec]).evaluate(data, leaves(lps))
    xs = leaves(lps)
    with pytest.raises(RegularizerError, match="'topsort'.*changed in place"):
        regrad.compose(None, [spec])(data, xs)
    for x, b in zip(xs, before):
        assert torch.equal(x.detach(), b)


def test_the_in_place_guard_names_the_changed_datum_only_and_compares_bits():
    """Only datum 2's memory is written: it alone is named and put back. A NaN log-prob that a term
    leaves alone is not a change (NaN != NaN as a number, equal as bits)."""
    data, lps = make_batch()
    lps[1] = lps[1].clone()
    lps[1][2] = float("nan")
    before = [x.clone() for x in lps]

    def scale_datum_2(d, lp):
        lp[2].detach().numpy()[1:4] *= 2.0
        return 0.0

    zeros = lambda d, lp: [np.zeros(x.shape) for x in lp]  # noqa: E731
    xs = leaves(lps)
    with pytest.raises(RegularizerError, match="'s2'.*datum 2 changed in place.*put back"):
        regrad.compose(None, [RegularizerSpec.with_grad("s2", 1.0, scale_datum_2, zeros)])(data, xs)
    for x, b in zip(xs, before):
        assert torch.equal(x.detach().view(torch.int64), b.view(torch.int64))  # NaN bits too

    def nan_tolerant(d, lp):
        return float(sum(np.nansum(x.detach().numpy()) for x in lp))

    loss, _ = regrad.compose(None, [RegularizerSpec.with_grad("nt", 1.0, nan_tolerant, zeros)])(data, leaves(lps))
    assert loss.item() == pytest.approx(sum(np.nansum(x.numpy()) for x in before))


def test_non_finite_metrics_and_weighted_totals_are_named():
    data, lps = make_batch()
    nan_metric = {"fn": lambda d, lp: (sum(x.sum() for x in lp), {"m": float("nan")}), "weight": 1.0, "name": "nm"}
    with pytest.raises(RegularizerError, match="'nm'.*metric 'm' is nan") as info:
        regrad.compose(None, [nan_metric])(data, leaves(lps))
    assert isinstance(info.value.cause, NonFiniteError)
    # each term finite, the float32 weighted sum not: 1e38 * (-4) * 2 terms overflows
    lps32 = [x.float() for x in lps]
    loud = [RegularizerSpec.with_grad(f"big{i}", 1e38, cubic_value, lambda d, lp: [np.full(x.shape, -4.0, np.float32) for x in lp])
            for i in range(2)]
    with pytest.raises(NonFiniteError, match="weighted sum of the terms has a non-finite gradient"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # named by the error alone: no RuntimeWarning "overflow" first
            regrad.compose(None, loud)(data, leaves(lps32))
    with warnings.catch_warnings():  # a weight beyond float32 (cast warned before the error)
        warnings.simplefilter("error")
        with pytest.raises(NonFiniteError, match="weighted sum of the terms"):
            regrad.compose(None, [regrad.l1(1e308), regrad.l2(1.0)]).evaluate(data, lps32)


@pytest.mark.parametrize("weights,match", [([1.0, -2.0], "weight -2.0 at token 1"), ([1.0, float("nan")], "weight nan at token 1")])
def test_cross_entropy_rejects_signed_or_nan_weights(weights, match):
    lps = [torch.tensor([-1.0, -1.0], dtype=torch.float64)]
    data = [regrad.Datum([0, 1], {"target_tokens": np.array([0, 1]), "weights": np.array(weights)})]
    with pytest.raises(regrad.InputError, match=f"datum 0 has {match}"):
        regrad.losses.cross_entropy(data, lps)
    with pytest.raises(RegularizerError, match=f"'base_loss'.*datum 0 has {match}"):
        regrad.compose(regrad.losses.cross_entropy, [])(data, leaves(lps))


def test_cross_entropy_masks_weight_zero_tokens_and_reads_generators():
    lps = [torch.tensor([-1.0, float("-inf"), -2.0], dtype=torch.float64)]
    data = [regrad.Datum([0, 1, 2], {"target_tokens": np.array([0, 1, 2]), "weights": np.array([1.0, 0.0, 1.0])})]
    value, metrics = regrad.losses.cross_entropy(data, [lps[0].numpy()])
    assert value == 1.5 and metrics["perplexity"] == pytest.approx(np.exp(1.5))
    x = leaves(lps)
    loss, _ = regrad.losses.cross_entropy(data, x)
    loss.backward()
    assert loss.item() == 1.5
    np.testing.assert_array_equal(x[0].grad.numpy(), [-0.5, 0.0, -0.5])
    composed, _, out = regrad.compose(regrad.losses.cross_entropy, []).evaluate(data, lps)
    assert composed == 1.5 and out.base_loss.value == 1.5
    # one-shot iterators are read once; a length mismatch is named on the torch path too
    gen_loss, _ = regrad.losses.cross_entropy(iter(data), (t for t in leaves(lps)))
    assert gen_loss.item() == 1.5 and gen_loss.requires_grad
    with pytest.raises(regrad.InputError, match="data has 1 entries but logprobs_list has 2"):
        regrad.losses.cross_entropy(data, leaves(lps) * 2)
    # every token masked: 0 and a zero gradient, +0.0 (no negative zeros in telemetry or grads)
    masked = [regrad.Datum([0, 1, 2], {"target_tokens": np.array([0, 1, 2]), "weights": np.zeros(3)})]
    value, grad, metrics = regrad.losses.cross_entropy.value_and_grad(masked, [lps[0].numpy()])
    assert value == 0.0 and math.copysign(1.0, value) == 1.0 and metrics["perplexity"] == 1.0
    assert grad.shape == (3,) and not np.signbit(grad).any() and not grad.any()


def test_second_derivative_of_a_composed_loss_raises():
    data, lps = make_batch()
    loss_fn = regrad.compose(None, [regrad.l2(1.0)])
    xs = leaves(lps)
    loss, _ = loss_fn(data, xs)
    grads = torch.autograd.grad(loss, xs, create_graph=True)
    ref = leaves(lps)
    hand_total(data, ref, [("l2", 1.0)]).backward()
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.detach(), r.grad)
    with pytest.raises(RuntimeError, match="second derivatives"):
        sum((g**2).sum() for g in grads).backward()


def test_a_failure_stops_later_terms_when_sequential():
    data, lps = make_batch()
    ran = []

    def later(data, lp):
        ran.append("later")
        return 0.0, {}

    loss_fn = regrad.compose(None, [RegularizerSpec.sync("first", 0.1, _failing(RuntimeError("x"))), RegularizerSpec.with_grad("later", 0.1, later, cubic_grad)], parallel=False)
    with pytest.raises(RegularizerError, match="'first'"):
        loss_fn(data, lps)
    assert ran == []


def test_base_loss_failure_names_the_base_loss():
    data, lps = make_batch()
    with pytest.raises(RegularizerError, match="'base_loss'") as info:
        regrad.compose(_failing(KeyError("weights")), [regrad.l1(0.1)])(data, lps)
    assert info.value.name == "base_loss"


def test_input_errors_are_not_regularizer_errors():
    data, lps = make_batch()
    with pytest.raises(regrad.InputError, match="4 entries but logprobs_list has 3"):
        mixed_loss()(data, lps[:3])


# ------------------------------------------------------------------------------------------------
# Async regularizers: one event loop, concurrent, timeouts cancel siblings


def _sleeper(stamps, name, seconds, partners=1):
    """An async term that sleeps; with partners > 1 it first waits (up to ~5 s of polls, no clock read)
    until that many such terms have started, and records in stamps[name] whether they all had."""

    async def fn(data, lp):
        stamps["started"] = stamps.get("started", 0) + 1
        for _ in range(5000):  # sequential terms would never meet: the first gives up after its polls
            if stamps["started"] >= partners:
                break
            await asyncio.sleep(0.001)
        stamps[name] = stamps["started"] >= partners
        await asyncio.sleep(seconds)
        return sum(x.sum() for x in lp) * 0.0 + 1.0, {"slept": seconds}

    return fn


def test_async_regularizers_overlap():
    data, lps = make_batch()
    stamps = {}
    loss_fn = regrad.compose(
        regrad.losses.cross_entropy,
        [RegularizerSpec.async_("a", 0.1, _sleeper(stamps, "a", 0.1, partners=2)),
         RegularizerSpec.async_("b", 0.1, _sleeper(stamps, "b", 0.1, partners=2)), regrad.l1(0.1)],
    )
    loss, metrics = loss_fn(data, leaves(lps))
    loss.backward()
    # each saw the other started before it went on: they ran concurrently on one loop
    assert stamps["a"] is True and stamps["b"] is True
    assert metrics["reg/a/value"] == 1.0 and metrics["reg/b/custom/slept"] == 0.1
    assert loss_fn.last_output.regularizers["a"].grad_method == "autograd"


def test_timeout_cancels_siblings_and_names_the_regularizer():
    data, lps = make_batch()
    seen = {}

    async def stuck(data, lp):
        await asyncio.sleep(30)

    async def sibling(data, lp):
        seen["started"] = True
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise
        return 0.0, {}

    loss_fn = regrad.compose(
        regrad.losses.cross_entropy,
        [RegularizerSpec.async_("verifier", 0.1, stuck, timeout=0.05), RegularizerSpec.async_("kb", 0.1, sibling, timeout=None)],
    )
    with pytest.raises(RegularizerError, match="'verifier'.*timeout of 0.05 s") as info:
        loss_fn(data, lps)
    assert info.value.name == "verifier" and isinstance(info.value.cause, TimeoutError)
    assert seen == {"started": True, "cancelled": True}
    assert loss_fn.last_output is None


def test_async_failure_cancels_async_siblings():
    data, lps = make_batch()
    seen = []

    async def boom(data, lp):
        await asyncio.sleep(0.01)
        raise ConnectionError("verifier down")

    async def sibling(data, lp):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    loss_fn = regrad.compose(None, [RegularizerSpec.async_("kb", 0.1, sibling), RegularizerSpec.async_("verifier", 0.1, boom)])
    with pytest.raises(RegularizerError, match="'verifier'.*verifier down"):
        loss_fn(data, lps)
    assert seen == ["cancelled"]


def test_acall_inside_a_running_loop():
    data, lps = make_batch()
    stamps = {}

    async def main():
        loss_fn = regrad.compose(
            regrad.losses.cross_entropy,
            [RegularizerSpec.async_("a", 0.1, _sleeper(stamps, "a", 0.05)), {"fn": softplus_reg, "weight": 0.3, "name": "softplus"}],
        )
        ours = leaves(lps)
        loss, metrics = await loss_fn.acall(data, ours)
        loss.backward()
        value, grads, out = await loss_fn.aevaluate(data, lps)
        return ours, loss, value, grads

    ours, loss, value, grads = asyncio.run(main())
    ref = leaves(lps)
    hand_total(data, ref, [("ce", 1.0), ("softplus", 0.3)]).backward()
    assert loss.item() == pytest.approx(value)
    for a, g, b in zip(ours, grads, ref):
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(g, b.grad)


def test_sync_call_from_inside_a_running_loop_with_async_terms():
    """Tinker calls a custom loss synchronously from inside its own event loop."""
    data, lps = make_batch()
    stamps = {}
    loss_fn = regrad.compose(regrad.losses.cross_entropy, [RegularizerSpec.async_("a", 0.1, _sleeper(stamps, "a", 0.01))])

    async def main():
        return loss_fn(data, lps)

    _, metrics = asyncio.run(main())
    assert metrics["reg/a/value"] == 1.0


def test_async_user_gradient():
    data, lps = make_batch()

    async def value(data, lp):
        await asyncio.sleep(0)
        return cubic_value(data, lp)

    async def grad(data, lp):
        return cubic_grad(data, lp)

    _, grads, out = regrad.compose(None, [RegularizerSpec.async_("c", 0.5, value, grad_fn=grad)]).evaluate(data, lps)
    ref = leaves(lps)
    hand_total(data, ref, [("cubic", 0.5)]).backward()
    for g, b in zip(grads, ref):
        torch.testing.assert_close(g, b.grad)
    assert out.regularizers["c"].grad_method == "user"


class _AsyncCubic:
    """A callable object whose __call__ is `async def` (a client wrapper, say): awaited like an async fn."""

    def __init__(self):
        self.awaited = 0

    async def __call__(self, data, logprobs_list):
        await asyncio.sleep(0)
        self.awaited += 1
        return cubic_value(data, logprobs_list)


@pytest.mark.parametrize("as_base", [False, True])
def test_object_with_async_call_is_awaited(as_base):
    data, lps = make_batch()
    fn = _AsyncCubic()
    loss_fn = regrad.compose(fn, []) if as_base else regrad.compose(None, [{"fn": fn, "weight": 0.5, "name": "c"}])
    value, grads, out = loss_fn.evaluate(data, lps)
    ref = leaves(lps)
    total = hand_total(data, ref, [("cubic", 1.0 if as_base else 0.5)])
    total.backward()
    assert value == pytest.approx(total.item(), rel=1e-12) and fn.awaited >= 1
    for g, b in zip(grads, ref):
        torch.testing.assert_close(g, b.grad, rtol=1e-6, atol=1e-8)  # numerical route: numpy inside


# ------------------------------------------------------------------------------------------------
# The real Tinker SDK's client-side custom-loss path (no server)


def _tinker_batch():
    tinker = pytest.importorskip("tinker")
    from tinker import types

    data, lps = make_batch(torch.float32, seed=3)
    tinker_data = []
    outputs = []
    for d, lp in zip(data, lps):
        inputs = {"target_tokens": np.asarray(d.loss_fn_inputs["target_tokens"], dtype=np.int64)}
        if "weights" in d.loss_fn_inputs:
            inputs["weights"] = d.loss_fn_inputs["weights"]
        tinker_data.append(types.Datum(model_input=types.ModelInput.from_ints(d.model_input.to_ints()), loss_fn_inputs=inputs))
        outputs.append({"logprobs": types.TensorData.from_numpy(lp.numpy())})
    forward = types.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={})
    return tinker, data, lps, tinker_data, forward


def test_tinker_sdk_custom_loss_path_sends_minus_the_gradient():
    tinker, data, lps, tinker_data, forward = _tinker_batch()
    from tinker.lib.public_interfaces.training_client import TrainingClient

    loss_fn = mixed_loss()
    result = TrainingClient._compute_custom_loss(tinker_data, loss_fn, forward)
    ref = leaves([x.double() for x in lps])
    total = hand_total(data, ref, MIX)
    total.backward()
    assert result.loss_sum == pytest.approx(total.item(), rel=1e-5)
    assert result.metrics == loss_fn.last_output.flat()
    assert all(isinstance(v, float) for v in result.metrics.values())
    for datum, x in zip(result.data, ref):
        sent = datum.loss_fn_inputs["weights"].to_numpy()
        np.testing.assert_allclose(sent, -x.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_tinker_sdk_path_with_an_async_regularizer_inside_a_loop():
    tinker, data, lps, tinker_data, forward = _tinker_batch()
    from tinker.lib.public_interfaces.training_client import TrainingClient

    stamps = {}
    loss_fn = regrad.compose(regrad.losses.cross_entropy, [RegularizerSpec.async_("kb", 0.1, _sleeper(stamps, "kb", 0.01)), regrad.l2(0.01)])

    async def in_loop():  # as in the SDK, the loss runs inside a running event loop
        return TrainingClient._compute_custom_loss(tinker_data, loss_fn, forward)

    result = asyncio.run(in_loop())
    ref = leaves([x.double() for x in lps])
    hand_total(data, ref, [("ce", 1.0), ("l2", 0.01)]).backward()
    for datum, x in zip(result.data, ref):
        np.testing.assert_allclose(datum.loss_fn_inputs["weights"].to_numpy(), -x.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert result.metrics["reg/kb/value"] == 1.0


def test_cross_entropy_alone_matches_torch_and_reads_tinker_weights():
    tinker, data, lps, tinker_data, forward = _tinker_batch()
    ref = leaves([x.double() for x in lps])
    expected = hand_total(data, ref, [("ce", 1.0)])
    loss, metrics = regrad.losses.cross_entropy(tinker_data, leaves([x.double() for x in lps]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["perplexity"] == pytest.approx(np.exp(expected.item()))


# ------------------------------------------------------------------------------------------------
# Numerical routes (regrad.numerical_grad, the C++ engine)


def _needs_engine():
    if not hasattr(regrad, "numerical_grad"):
        pytest.skip("regrad.numerical_grad (the numerical engine) is not available in this build")


@pytest.mark.parametrize("grad", ["auto", "numerical"])
def test_numerical_route_matches_autograd(grad):
    _needs_engine()
    data, lps = make_batch()
    calls = []

    def numpy_cubic(data, lp):
        calls.append(1)
        return cubic_value(data, [x.detach().numpy() if hasattr(x, "detach") else x for x in lp])

    loss_fn = regrad.compose(regrad.losses.cross_entropy, [RegularizerSpec.sync("cubic", 0.05, numpy_cubic, grad=grad), regrad.l1(0.1)])
    ours = leaves(lps)
    loss, _ = loss_fn(data, ours)
    loss.backward()
    ref = leaves(lps)
    hand_total(data, ref, [("ce", 1.0), ("cubic", 0.05), ("l1", 0.1)]).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    entry = loss_fn.last_output.regularizers["cubic"]
    assert entry.grad_method == "numerical" and entry.nfev is not None and entry.nfev > 0


def test_auto_falls_back_to_numerical_for_numpy_code():
    _needs_engine()
    data, lps = make_batch()

    def strict_numpy(data, lp):  # np.asarray on a tensor that requires grad raises in torch
        return cubic_value(data, [np.asarray(x) for x in lp])

    loss_fn = regrad.compose(None, [RegularizerSpec.sync("cubic", 1.0, strict_numpy)])
    _, grads, out = loss_fn.evaluate(data, lps)
    ref = leaves(lps)
    hand_total(data, ref, [("cubic", 1.0)]).backward()
    for g, b in zip(grads, ref):
        torch.testing.assert_close(g, b.grad, rtol=1e-6, atol=1e-6)
    assert out.regularizers["cubic"].grad_method == "numerical"


@pytest.mark.parametrize("route", ["spsa", "gaussian"])
def test_randomized_routes_run(route):
    _needs_engine()
    data, lps = make_batch()
    spec = RegularizerSpec.sync("cubic", 1.0, cubic_value, grad=route, num_samples=8, seed=1)
    _, grads, out = regrad.compose(None, [spec]).evaluate(data, lps)
    assert out.regularizers["cubic"].grad_method == route
    assert all(g.shape == x.shape and torch.isfinite(g).all() for g, x in zip(grads, lps))


@pytest.mark.parametrize("route", ["spsa", "gaussian"])
def test_randomized_routes_draw_fresh_directions_each_call_reproducibly(route):
    """Call k of a composed loss is numerical_grad with seed + k - 1: the same bits as the engine run
    directly, different directions every training step, and the same sequence from a fresh loss."""
    _needs_engine()
    data, lps = make_batch()
    spec = RegularizerSpec.sync("cubic", 1.0, cubic_value, grad=route, num_samples=8, seed=5)
    runs = []
    for _ in range(2):
        loss_fn = regrad.compose(None, [spec])
        runs.append([loss_fn.evaluate(data, lps)[1] for _ in range(3)])
    for k, grads in enumerate(runs[0]):
        ref = regrad.numerical_grad(cubic_value, data, lps, method=route, num_samples=8, seed=5 + k)
        for g, r, again in zip(grads, ref.grads, runs[1][k]):
            assert torch.equal(g, r) and torch.equal(g, again)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])


def test_async_numerical_route():
    _needs_engine()
    data, lps = make_batch()

    async def remote_cubic(data, lp):
        await asyncio.sleep(0)
        return cubic_value(data, lp)

    spec = RegularizerSpec.async_("remote", 1.0, remote_cubic, grad="numerical")
    _, grads, out = regrad.compose(None, [spec]).evaluate(data, lps)
    ref = leaves(lps)
    hand_total(data, ref, [("cubic", 1.0)]).backward()
    for g, b in zip(grads, ref):
        torch.testing.assert_close(g, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "fn"),
    [
        ({"structure": "datum"}, lambda datum, lp: float(np.sum(np.asarray(lp) ** 3))),
        ({"structure": "token"}, lambda data, lp: [np.asarray(x) ** 3 for x in lp]),
        ({"vectorized": True}, lambda data, lp: sum((np.asarray(x) ** 3).sum(axis=1) for x in lp)),
        ({"method": "richardson"}, cubic_value),
    ],
)
def test_numerical_options_pass_through(options, fn):
    _needs_engine()
    data, lps = make_batch()
    spec = RegularizerSpec.sync("cubic", 0.05, fn, **options)
    value, grads, out = regrad.compose(regrad.losses.cross_entropy, [spec]).evaluate(data, lps)
    ref = leaves(lps)
    total = hand_total(data, ref, [("ce", 1.0), ("cubic", 0.05)])
    total.backward()
    assert value == pytest.approx(total.item(), rel=1e-12)
    for g, b in zip(grads, ref):
        torch.testing.assert_close(g, b.grad, rtol=1e-6, atol=1e-6)
    assert out.regularizers["cubic"].grad_method.startswith("numerical")


def test_a_failure_stops_a_running_numerical_sibling():
    _needs_engine()
    data, lps = make_batch()
    calls = []

    def slow_cubic(data, lp):
        calls.append(1)
        time.sleep(0.005)
        return cubic_value(data, lp)

    def failing_later(data, lp):
        time.sleep(0.05)
        raise RuntimeError("late failure")

    full = 1 + 2 * sum(LENGTHS)  # the value call + two evaluations per token (central)
    loss_fn = regrad.compose(failing_later, [RegularizerSpec.sync("cubic", 1.0, slow_cubic, grad="numerical")])
    with pytest.raises(RegularizerError, match="'base_loss'.*late failure"):
        loss_fn(data, lps)
    time.sleep(full * 0.005)  # long enough for an uncancelled run to finish
    assert 1 < len(calls) < full


def test_a_tensor_listed_twice_gets_its_gradient_once():
    # autograd.grad w.r.t. [x, x] gives x's whole gradient at both places; backward then added it twice
    x = torch.linspace(-2.0, -0.1, 6, dtype=torch.float64).requires_grad_(True)
    loss, _ = regrad.compose(None, [RegularizerSpec.sync("sq", 1.0, lambda d, lp: sum((t**2).sum() for t in lp))])(
        [None, None], [x, x]
    )
    loss.backward()
    ref = x.detach().clone().requires_grad_(True)
    ((ref**2).sum() * 2).backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("second", [lambda a: 2 * a, lambda a: a[1:]])
def test_an_entry_computed_from_another_gets_the_chain_rule_once(second):
    """[a, f(a)]: each entry's gradient is partial; autograd then adds f's path once (was twice)."""
    def reg(d, lp):
        return sum((t**3).sum() for t in lp)

    a = torch.linspace(-2.0, -0.1, 6, dtype=torch.float64).requires_grad_(True)
    loss, _ = regrad.compose(None, [RegularizerSpec.sync("cube", 0.5, reg)])([None, None], [a, second(a)])
    loss.backward()
    ref = a.detach().clone().requires_grad_(True)
    (0.5 * reg(None, [ref, second(ref)])).backward()
    torch.testing.assert_close(a.grad, ref.grad)


@pytest.mark.parametrize("route", ["kernels", "numerical_grad", "compose logprobs", "compose data"])
@pytest.mark.parametrize("unordered", [{"a": np.zeros(3)}, {b"\0" * 24}, None, "abc"])
def test_a_batch_that_is_not_a_list_is_named(route, unordered):
    """A dict listed gives its keys ("logprobs_list[0] is a str"), a set no datum order, None a raw TypeError."""
    x = [np.zeros(3)]
    calls = {
        "kernels": lambda: regrad.kernels.l1(unordered),
        "numerical_grad": lambda: regrad.numerical_grad(lambda d, lps: 0.0, None, unordered),
        "compose logprobs": lambda: regrad.compose(None, [regrad.l1(0.1)])([None], unordered),
        "compose data": lambda: regrad.compose(None, [regrad.l1(0.1)])(unordered, x),
    }
    what = "data" if route == "compose data" else "logprobs_list"
    kind = type(unordered).__name__
    with pytest.raises(InputError, match=f"^{what} must be a list of .*, one per datum, got (a )?{kind}$"):
        calls[route]()


def test_inference_tensors_take_the_autograd_route():
    _, lps = make_batch()
    with torch.inference_mode():
        frozen = [x.clone() for x in lps]
    _, grads, out = regrad.compose(None, [RegularizerSpec.sync("s", 0.5, softplus_reg)]).evaluate([None] * len(frozen), frozen)
    ref = leaves(lps)
    (0.5 * softplus_reg(None, ref)[0]).backward()
    for g, b in zip(grads, ref):
        torch.testing.assert_close(g, b.grad)
    assert out.regularizers["s"].grad_method == "autograd"


def test_async_autograd_terms_record_under_a_callers_no_grad():
    # grad mode is per thread: one term's enable_grad must not end while another term is suspended
    data, lps = make_batch()

    async def early(d, lp):
        doubled = [2 * x for x in lp]
        await asyncio.sleep(0.01)
        return sum((x**2).sum() for x in doubled), {}

    async def late(d, lp):
        await asyncio.sleep(0.005)
        tripled = [3 * x for x in lp]
        await asyncio.sleep(0.02)
        return sum((x**2).sum() for x in tripled), {}

    loss_fn = regrad.compose(None, [RegularizerSpec.async_("a", 1.0, early, grad="autograd"),
                                    RegularizerSpec.async_("b", 1.0, late, grad="autograd")])
    with torch.no_grad():
        _, grads, out = loss_fn.evaluate(data, lps)
    for g, x in zip(grads, lps):
        torch.testing.assert_close(g, 26 * x)  # d/dx (4x² + 9x²)
    assert [r.grad_method for r in out.regularizers.values()] == ["autograd", "autograd"]


def test_a_cancelled_error_raised_inside_an_async_term_names_it():
    data, lps = make_batch()

    async def awaits_a_cancelled_future(d, lp):
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future
        return 0.0

    loss_fn = regrad.compose(None, [RegularizerSpec.async_("kb", 0.1, awaits_a_cancelled_future)])
    with pytest.raises(RegularizerError, match="'kb'.*CancelledError") as info:
        loss_fn(data, lps)
    assert info.value.name == "kb"

    async def inside_a_loop():
        with pytest.raises(RegularizerError, match="'kb'"):
            await loss_fn.acall(data, lps)
        await asyncio.sleep(0)  # this task was not cancelled

    asyncio.run(inside_a_loop())


@pytest.mark.parametrize(
    "grads, match",
    [
        (lambda lp: [torch.ones_like(x, dtype=torch.bool) for x in lp], r"datum 0 has dtype torch.bool"),
        (lambda lp: [x.to(torch.complex128) for x in lp], r"datum 0 has dtype torch.complex128"),
        (lambda lp: [np.ones(x.shape, dtype=bool) for x in lp], r"datum 0 has dtype bool"),
        (lambda lp: [np.full(x.shape, "1.5") for x in lp], r"datum 0 has dtype <U3"),
        (lambda lp: np.ones(sum(LENGTHS), dtype=np.complex128), r"packed gradient has dtype complex128"),
        (lambda lp: None, r"gradient has type NoneType"),
        (lambda lp: {i: x for i, x in enumerate(lp)}, r"gradient has type dict"),
        (lambda lp: [x for x in lp[:3]] + ["abc"], r"gradient of datum 3 has type str"),
    ],
)
def test_user_gradients_must_hold_real_numbers(grads, match):
    data, lps = make_batch()
    spec = RegularizerSpec.with_grad("g", 0.1, cubic_value, lambda d, lp: grads(lp))
    with pytest.raises(RegularizerError, match=r"'g'.*InputError: .*" + match):
        regrad.compose(None, [spec]).evaluate(data, lps)


def test_a_bfloat16_user_gradient_is_widened():
    data, lps = make_batch()
    spec = RegularizerSpec.with_grad("g", 0.5, cubic_value, lambda d, lp: [(3 * x**2).bfloat16() for x in lp])
    _, grads, _ = regrad.compose(None, [spec]).evaluate(data, lps)
    for g, x in zip(grads, lps):
        torch.testing.assert_close(g, 0.5 * (3 * x**2).bfloat16().double())


@pytest.mark.parametrize(
    "loss, match",
    [
        (lambda: np.bool_(True), "dtype bool"),
        (lambda: torch.tensor(True), "dtype torch.bool"),
        (lambda: torch.tensor(1.0 + 2.0j), "dtype torch.complex64"),
        (lambda: np.complex128(1.0 + 2.0j), "dtype complex128"),
        (lambda: np.array("2.5"), "dtype <U3"),
        (lambda: 10**400, r"NonFiniteError: loss \(int\) is beyond the range of float64"),
    ],
)
def test_losses_that_are_not_real_numbers_are_named(loss, match):
    # numpy / torch would read these as 1.0, 1.0, 2.5 or drop the imaginary part
    data, lps = make_batch()
    spec = RegularizerSpec.with_grad("odd", 0.1, lambda d, lp: (loss(), {}), cubic_grad)  # no engine to catch it
    with pytest.raises(RegularizerError, match=r"'odd'.*" + match):
        regrad.compose(None, [spec]).evaluate(data, lps)


def test_numerical_route_on_a_batch_of_empty_data():
    _needs_engine()
    lps = [torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]
    value, grads, out = regrad.compose(None, [RegularizerSpec.sync("c", 0.5, cubic_value)]).evaluate([None, None], lps)
    assert value == 0.0 and [tuple(g.shape) for g in grads] == [(0,), (0,)]
    assert out.regularizers["c"].grad_method == "numerical" and out.regularizers["c"].grad_error == 0.0


def test_a_term_starting_after_a_sibling_changed_the_log_probs_does_not_put_the_change_back():
    """Terms in parallel share the caller's memory. A term that starts after a sibling changed it in
    place must compare against the values the call received: the caller ends with its own values,
    not with the sibling's change that the later term took for the original."""
    data, lps = make_batch()
    before = [x.clone() for x in lps]
    modified, b_started, release, b_done = (threading.Event() for _ in range(4))
    zeros = lambda d, lp: [np.zeros(x.shape) for x in lp]  # noqa: E731

    def doubles_in_place(d, lp):  # A: changes datum 0, and returns once B runs
        lp[0].detach().numpy()[:] *= 2.0
        modified.set()
        b_started.wait(10)
        return 0.0

    def late(d, lp):  # B: runs until the call has failed
        b_started.set()
        release.wait(10)
        return 0.0

    def on_event(event):  # runs in B's thread before B's term starts: B starts after A's change
        if event.name == "b" and event.phase == "start":
            modified.wait(10)
        if event.name == "b" and event.phase in ("stop", "exception"):
            b_done.set()

    specs = [RegularizerSpec.with_grad("a", 1.0, doubles_in_place, zeros), RegularizerSpec.with_grad("b", 1.0, late, zeros)]
    loss_fn = regrad.compose(None, specs, max_workers=2, on_event=on_event)
    xs = leaves(lps)
    with pytest.raises(RegularizerError, match="'a'.*datum 0 changed in place.*put back"):
        loss_fn(data, xs)
    release.set()
    assert b_done.wait(10)
    loss_fn.close()
    for x, b in zip(xs, before):
        assert torch.equal(x.detach(), b)


def test_datum_metrics_are_averaged_over_the_data_reporting_them_and_weight_zero_contributes_plus_zero():
    """A metric only datum 0 reports is its own value (it was divided by every datum: 4.0 of two data
    read 2.0); a weight-0 term with a negative value contributes 0.0, not -0.0."""
    _needs_engine()
    data, lps = make_batch()

    def per_datum(datum, lp):
        x = np.asarray(lp, np.float64)
        metrics = {"mean_lp": float(x.mean())}
        if x.size == LENGTHS[0]:
            metrics["only_first"] = 4.0
        return float(np.sum(x ** 2)), metrics

    specs = [RegularizerSpec.sync("d", 1.0, per_datum, grad="numerical", structure="datum"),
             RegularizerSpec.sync("off", 0.0, lambda d, lp: -float(sum(np.sum(np.asarray(x)) ** 2 for x in lp)) - 1.0,
                                  grad="numerical")]
    out = regrad.compose(None, specs).evaluate(data, lps)[2]
    custom = out.regularizers["d"].custom
    assert custom["only_first"] == 4.0
    assert custom["mean_lp"] == pytest.approx(np.mean([x.numpy().mean() for x in lps]), rel=1e-12)
    contribution = out.regularizers["off"].contribution
    assert contribution == 0.0 and math.copysign(1.0, contribution) == 1.0
    assert '"contribution": -0.0' not in out.to_json()


_NO_TORCH_COMPOSE = """
import asyncio, sys
sys.modules["torch"] = None  # an install without the torch extra
import numpy as np, regrad
data = [regrad.Datum([1, 2], {"target_tokens": np.array([1, 2])})]
lps = [np.array([-1.0, -2.0])]
def square(d, lp):
    return float(sum((x ** 2).sum() for x in lp))
async def remote_square(d, lp):
    await asyncio.sleep(0)
    return square(d, lp)
for spec in (regrad.RegularizerSpec.sync("s", 1.0, square), regrad.RegularizerSpec.async_("a", 1.0, remote_square)):
    value, grads, _ = regrad.compose(regrad.losses.cross_entropy, [spec]).evaluate(data, lps)
    assert abs(value - (1.5 + 5.0)) < 1e-9, value
    assert np.allclose(grads[0], [-0.5 - 2.0, -0.5 - 4.0], atol=1e-6), grads
"""


def test_compose_runs_numpy_batches_without_torch():
    """The wheel's runtime dependency is numpy alone: an auto term on numpy log-probs imported torch
    before deciding that no autograd probe was needed (ModuleNotFoundError without torch)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _NO_TORCH_COMPOSE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

