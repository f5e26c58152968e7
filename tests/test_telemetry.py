"""CustomLossOutput (the seed's JSON), flat metrics, events and the logging adapter."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec  # noqa: E402

# The seed's telemetry example (seeds/custom-loss-python-vs-tinkex.md, DESIGN.md §7)
SEED = {
    "loss_total": 2.847,
    "base_loss": {"value": 2.5, "custom": {"perplexity": 12.18}},
    "regularizers": {
        "topology": {"value": 1.23, "weight": 0.1, "contribution": 0.123, "custom": {"beta_1_mean": 3.2}},
        "sparsity": {"value": 22.4, "weight": 0.01, "contribution": 0.224, "custom": {"l1_norm": 22.4}},
    },
    "regularizer_total": 0.347,
}


def seed_batch():
    """Two data: four target tokens at log-prob -2.5 (weight 1) and one at -12.4 (weight 0).

    cross_entropy = 2.5 (perplexity e^2.5 = 12.18); the L1 norm of each datum is 4·2.5 + 12.4 = 22.4.
    """
    lp = [-2.5, -2.5, -2.5, -2.5, -12.4]
    weights = np.array([1, 1, 1, 1, 0], dtype=np.float32)
    data = [regrad.Datum([1, 2, 3, 4, 5], {"target_tokens": np.arange(5), "weights": weights}) for _ in range(2)]
    return data, [torch.tensor(lp, dtype=torch.float64, requires_grad=True) for _ in range(2)]


def topological_consistency(data, logprobs_list):
    """Stands in for the seed's topology term: value 1.23, zero gradient, metric beta_1_mean."""
    loss = sum(x.sum() for x in logprobs_list) * 0.0 + 1.23
    return loss, {"beta_1_mean": 3.2}


def seed_loss(**options):
    regularizers = [
        {"fn": topological_consistency, "weight": 0.1, "name": "topology"},
        regrad.l1(0.01, name="sparsity"),
    ]
    return regrad.compose(regrad.losses.cross_entropy, regularizers, **options)


def assert_matches_to_the_digit(expected, actual, path="telemetry"):
    """Every number of the seed, rounded to the digits the seed prints, is reproduced exactly."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert key in actual, f"{path} has no key {key!r}"
            assert_matches_to_the_digit(value, actual[key], f"{path}.{key}")
        return
    digits = len(repr(expected).split(".")[1]) if "." in repr(expected) else 0
    assert round(actual, digits) == expected, f"{path}: {actual} does not round to {expected}"


def test_seed_telemetry_reproduced_to_the_digit():
    data, lps = seed_batch()
    loss_fn = seed_loss()
    loss, metrics = loss_fn(data, lps)
    out = loss_fn.last_output.to_dict()
    assert_matches_to_the_digit(SEED, out)
    assert out["loss_total"] == pytest.approx(2.847, abs=1e-12)
    assert out["regularizer_total"] == pytest.approx(0.347, abs=1e-12)
    assert out["regularizers"]["topology"]["contribution"] == pytest.approx(0.123, abs=1e-12)
    assert out["regularizers"]["sparsity"]["contribution"] == pytest.approx(0.224, abs=1e-12)
    assert loss.item() == pytest.approx(2.847, abs=1e-12)
    assert out["regularizers"]["sparsity"]["grad_method"] == "analytic"
    assert out["regularizers"]["topology"]["grad_method"] == "autograd"


def test_exact_keys_of_design_section_7():
    data, lps = seed_batch()
    loss_fn = seed_loss()
    loss_fn(data, lps)
    out = loss_fn.last_output.to_dict()
    assert list(out)[:5] == ["loss_total", "base_loss", "regularizers", "regularizer_total", "total_grad_norm"]
    assert list(out["base_loss"])[:3] == ["value", "grad_norm", "custom"]
    assert list(out["regularizers"]) == ["topology", "sparsity"]
    assert list(out["regularizers"]["sparsity"]) == [
        "value", "weight", "contribution", "grad_norm", "grad_norm_weighted", "grad_method", "duration_ms", "custom",
    ]
    assert out["regularizers"]["sparsity"]["custom"] == pytest.approx({"l1_norm": 22.4, "l1_total": 44.8, "l1_mean": 22.4})
    assert all(r["duration_ms"] >= 0 for r in out["regularizers"].values())


def test_seed_grad_norms_equal_hand_computed():
    data, lps = seed_batch()
    loss_fn = seed_loss()
    loss_fn(data, lps)
    out = loss_fn.last_output
    # d CE/d lp = -w / Σw (8 weighted tokens); d L1-mean/d lp = sign(lp) / 2 (10 tokens)
    assert out.base_loss.grad_norm == pytest.approx(math.sqrt(8) / 8, rel=1e-14)
    sparsity = out.regularizers["sparsity"]
    assert sparsity.grad_norm == pytest.approx(math.sqrt(10) / 2, rel=1e-14)
    assert sparsity.grad_norm_weighted == pytest.approx(0.01 * math.sqrt(10) / 2, rel=1e-14)
    assert out.regularizers["topology"].grad_norm == 0.0
    weighted_token, unweighted_token = -1 / 8 - 0.01 / 2, -0.01 / 2
    expected_total = math.sqrt(8 * weighted_token**2 + 2 * unweighted_token**2)
    assert out.total_grad_norm == pytest.approx(expected_total, rel=1e-14)


def test_track_grad_norms_off():
    data, lps = seed_batch()
    loss_fn = seed_loss(track_grad_norms=False)
    _, metrics = loss_fn(data, lps)
    out = loss_fn.last_output.to_dict()
    assert out["total_grad_norm"] is None and out["regularizers"]["sparsity"]["grad_norm"] is None
    assert out["regularizers"]["sparsity"]["grad_norm_weighted"] is None
    assert not any("grad_norm" in key for key in metrics)


def test_to_json_round_trips():
    data, lps = seed_batch()
    loss_fn = seed_loss()
    loss_fn(data, lps)
    output = loss_fn.last_output
    assert json.loads(output.to_json()) == output.to_dict()
    assert "\n" in output.to_json(indent=2)


def test_flat_metrics_are_tinker_style_floats():
    data, lps = seed_batch()
    loss_fn = seed_loss()
    _, metrics = loss_fn(data, lps)
    assert metrics == loss_fn.last_output.flat()
    assert all(isinstance(k, str) and type(v) is float for k, v in metrics.items())
    assert metrics["loss_total"] == pytest.approx(2.847)
    assert metrics["regularizer_total"] == pytest.approx(0.347)
    assert metrics["reg/sparsity/value"] == pytest.approx(22.4)
    assert metrics["reg/sparsity/weight"] == 0.01
    assert metrics["reg/sparsity/contribution"] == pytest.approx(0.224)
    assert metrics["reg/sparsity/custom/l1_norm"] == pytest.approx(22.4)
    assert metrics["reg/topology/custom/beta_1_mean"] == 3.2
    assert metrics["base_loss/value"] == pytest.approx(2.5)
    assert metrics["base_loss/custom/perplexity"] == pytest.approx(12.18, abs=5e-3)
    assert "reg/sparsity/grad_method" not in metrics and "reg/sparsity/grad_norm_weighted" in metrics


# ------------------------------------------------------------------------------------------------
# Events


def test_events_for_the_call_and_each_term():
    data, lps = seed_batch()
    events = []
    loss_fn = seed_loss(on_event=events.append, parallel=False)
    loss_fn(data, lps)
    summary = [(e.phase, e.scope, e.name) for e in events]
    assert summary == [
        ("start", "loss", "loss"),
        ("start", "base_loss", "base_loss"),
        ("stop", "base_loss", "base_loss"),
        ("start", "regularizer", "topology"),
        ("stop", "regularizer", "topology"),
        ("start", "regularizer", "sparsity"),
        ("stop", "regularizer", "sparsity"),
        ("stop", "loss", "loss"),
    ]
    stops = {e.name: e for e in events if e.phase == "stop"}
    assert stops["loss"].value == pytest.approx(2.847) and stops["sparsity"].value == pytest.approx(22.4)
    assert all(e.duration_ms is not None and e.duration_ms >= 0 for e in stops.values())
    assert all(e.error is None for e in events)
    assert events[0].time <= events[-1].time


def test_parallel_events_pair_up():
    data, lps = seed_batch()
    events = []
    seed_loss(on_event=events.append)(data, lps)
    for name in ("base_loss", "topology", "sparsity"):
        phases = [e.phase for e in events if e.name == name]
        assert phases == ["start", "stop"]
    assert (events[0].phase, events[0].scope) == ("start", "loss")
    assert (events[-1].phase, events[-1].scope) == ("stop", "loss")


def test_exception_events_name_the_regularizer():
    data, lps = seed_batch()
    events = []

    def broken(data, lp):
        raise ValueError("no persistent homology today")

    loss_fn = regrad.compose(regrad.losses.cross_entropy, [RegularizerSpec.sync("topology", 0.1, broken)], on_event=events.append, parallel=False)
    with pytest.raises(RegularizerError):
        loss_fn(data, lps)
    failures = [e for e in events if e.phase == "exception"]
    assert [(e.scope, e.name) for e in failures] == [("regularizer", "topology"), ("loss", "loss")]
    assert isinstance(failures[0].error, ValueError)
    assert isinstance(failures[1].error, RegularizerError) and failures[1].error.name == "topology"


def test_timeout_event():
    data, lps = seed_batch()
    events = []

    async def stuck(data, lp):
        await asyncio.sleep(30)

    loss_fn = regrad.compose(None, [RegularizerSpec.async_("verifier", 0.1, stuck, timeout=0.02)], on_event=events.append)
    with pytest.raises(RegularizerError, match="verifier"):
        loss_fn(data, lps)
    failure = next(e for e in events if e.phase == "exception" and e.scope == "regularizer")
    assert failure.name == "verifier" and isinstance(failure.error, TimeoutError)


def test_a_failing_callback_never_fails_the_step(caplog):
    data, lps = seed_batch()

    def bad_callback(event):
        raise RuntimeError("dashboard down")

    with caplog.at_level(logging.ERROR, logger="regrad"):
        loss, _ = seed_loss(on_event=bad_callback)(data, lps)
    assert loss.item() == pytest.approx(2.847)
    assert "on_event callback raised" in caplog.text


def test_logging_adapter(caplog):
    data, lps = seed_batch()
    with caplog.at_level(logging.DEBUG, logger="regrad"):
        seed_loss(on_event=regrad.log_events(), parallel=False)(data, lps)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "loss start"
    assert any(m.startswith("regularizer 'sparsity' stop: value=22.4 in ") for m in messages)
    assert messages[-1].startswith("loss stop: value=2.847")

    caplog.clear()
    custom = logging.getLogger("my.training")

    def broken(data, lp):
        raise ValueError("boom")

    loss_fn = regrad.compose(None, [RegularizerSpec.sync("topology", 0.1, broken)], on_event=regrad.log_events(custom, logging.INFO))
    with caplog.at_level(logging.INFO, logger="my.training"), pytest.raises(RegularizerError):
        loss_fn(data, lps)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "my.training"]
    assert [w.getMessage().split(" failed")[0] for w in warnings] == ["regularizer 'topology'", "loss"]


def test_events_carry_their_call_number_and_a_late_term_names_its_failed_call():
    """A term still running when its call failed reports later; `call` ties its event to that call."""
    data, lps = seed_batch()
    events, release, late = [], threading.Event(), threading.Event()

    def on_event(event):
        events.append(event)
        if (event.name, event.phase, event.call) == ("slow", "stop", 1):
            late.set()

    def slow(data, lps):  # blocks on the first call until the test lets it go
        if not release.is_set():
            release.wait(timeout=30)
        return sum(lp.sum() for lp in lps)

    def boom_once(data, lps, calls=[]):  # noqa: B006 - counts its calls
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first call fails")
        return sum(lp.sum() for lp in lps)

    specs = [RegularizerSpec.sync("slow", 0.1, slow), RegularizerSpec.sync("boom", 0.1, boom_once)]
    with regrad.compose(None, specs, on_event=on_event, parallel=True) as loss_fn:
        with pytest.raises(RegularizerError, match="boom"):
            loss_fn(data, lps)
        release.set()
        loss_fn(data, lps)
        assert late.wait(timeout=30)
    first = [e for e in events if e.call == 1]
    assert [(e.phase, e.scope) for e in first if e.scope == "loss"] == [("start", "loss"), ("exception", "loss")]
    assert {(e.name, e.phase) for e in first if e.scope == "regularizer"} >= {("boom", "exception"), ("slow", "stop")}
    second = [(e.name, e.phase) for e in events if e.call == 2]
    assert second[0] == ("loss", "start") and second[-1] == ("loss", "stop") and len(second) == 6


def test_flat_keys_cannot_collide_and_metrics_are_one_number_each():
    with pytest.raises(ValueError, match="contains '/'"):
        RegularizerSpec.sync("a/custom", 0.1, topological_consistency)
    data, lps = seed_batch()

    def with_metrics(metrics):
        return regrad.compose(None, [RegularizerSpec.sync("m", 0.1, lambda d, l: (sum(x.sum() for x in l), metrics))])

    out = with_metrics({"arr": np.array([2.0]), "t": torch.tensor([[3.0]]), "flag": True}).evaluate(data, lps)[2]
    assert out.regularizers["m"].custom == {"arr": 2.0, "t": 3.0, "flag": 1.0}
    for metrics, match in (({1: 1.0, "1": 2.0}, "same key"), ({"s": "3.5"}, "is a str"),
                           ({"v": np.array([1.0, 2.0])}, r"has shape \(2,\); expected one number")):
        with pytest.raises(RegularizerError, match=match):
            with_metrics(metrics).evaluate(data, lps)


def test_a_weighted_grad_norm_beyond_float64_is_named_and_names_are_unique_with_the_base():
    data, lps = seed_batch()

    def big(sign):
        return lambda d, l: sign * sum(((x - x.detach()) * 1e10).sum() for x in l)  # value 0, gradient ±1e10

    specs = [RegularizerSpec.sync("a", 1e298, big(1)), RegularizerSpec.sync("b", 1e298, big(-1))]
    with pytest.raises(regrad.NonFiniteError, match="regularizer 'a': weight 1e\\+298 times its grad norm"):
        regrad.compose(None, specs).evaluate(data, lps)  # the summed gradient cancels to 0; a's weighted norm is inf
    with pytest.raises(ValueError, match="the base loss and a regularizer are both named 'r'"):
        regrad.compose(RegularizerSpec.sync("r", 1.0, topological_consistency),
                       [RegularizerSpec.sync("r", 0.5, topological_consistency)])


@pytest.mark.parametrize(
    "value, error, match",
    [
        (np.complex128(1.0 + 2.0j), TypeError, "'c' is the complex number"),  # float() kept 1.0, with a warning
        (torch.tensor(1.0 + 2.0j), TypeError, "'c' is the complex number"),  # a raw RuntimeError naming no metric
        (10**400, regrad.NonFiniteError, r"'c' \(int\) is beyond the range of float64"),  # a raw OverflowError
    ],
)
def test_complex_or_overflowing_metrics_are_named(value, error, match):
    data, lps = seed_batch()
    loss_fn = regrad.compose(None, [RegularizerSpec.sync("m", 0.1, lambda d, l: (sum(x.sum() for x in l), {"c": value}))])
    with pytest.raises(RegularizerError, match="'m'.*" + match) as info:
        loss_fn.evaluate(data, lps)
    assert isinstance(info.value.cause, error)
