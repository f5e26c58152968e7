"""Conformance with tinker 0.38's real TrainingClient (tests/_fake_tinker.py: only the network replaced):
regrad's own data through `regrad.forward_backward_custom`, `Datum.to_tinker`, and the fake's fidelity
(turns / poisoning after a failed custom loss, tinker's request encoder)."""
import numpy as np
import pytest
import torch

pytest.importorskip("tinker")
try:
    from _fake_tinker import FakeTinkerTrainingClient, tinker_data  # noqa: E402
except ImportError as err:  # a private tinker module the fake builds on moved
    pytest.skip(f"tinker's client internals differ from the fake's: {err}", allow_module_level=True)

from tinker import types  # noqa: E402

import regrad  # noqa: E402
from regrad.model import default_model  # noqa: E402
from _fake_tinker import SMALL  # noqa: E402

TEXTS = ["the cat sat on the mat", "a tiny model learns bytes", "gradients flow back"]


def test_regrad_data_runs_on_a_real_tinker_client_as_on_the_local_one() -> None:
    """README: the same regrad.forward_backward_custom call works with a real tinker TrainingClient, on the
    data regrad.data_from_texts makes (tinker's client raised AttributeError 'model_input_spans')."""
    data = regrad.data_from_texts(TEXTS)
    seen = []

    def reads_data(d, lps):
        seen.append(d)
        return sum(lp.sum() for lp in lps) * 0.0, {}

    regs = [regrad.l1(1e-2), regrad.RegularizerSpec.sync("sees", 0.1, reads_data)]
    tc = FakeTinkerTrainingClient()
    res = regrad.forward_backward_custom(tc, data, regularizers=regs).result()
    ref = regrad.LocalTrainingClient(default_model(0, SMALL), seed=0)
    local = regrad.forward_backward_custom(ref, data, regularizers=regs).result()
    assert res.loss == pytest.approx(local.loss, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(res.grads, local.grads))
    assert all(a is b for run in seen for a, b in zip(run, data))  # the loss gets the caller's own Datums on both
    for p, q in zip(tc.server.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_datum_to_tinker_keeps_tokens_and_inputs() -> None:
    d = regrad.Datum([1, 2, 3], {"target_tokens": np.array([2, 3, 4], np.uint8), "weights": np.array([1.0, 0.0, 0.5]),
                                 "mask": np.array([True, False, True]), "tops": torch.tensor([[1, 2], [3, 4], [5, 6]])})
    t = d.to_tinker()
    assert isinstance(t, types.Datum) and t.model_input.to_ints() == [1, 2, 3]
    assert t.loss_fn_inputs["target_tokens"].dtype == "int64" and t.loss_fn_inputs["weights"].dtype == "float32"
    for key in d.loss_fn_inputs:
        assert np.array_equal(t.loss_fn_inputs[key].to_numpy(), np.asarray(d.loss_fn_inputs[key], dtype=np.float64))
    assert regrad.losses.cross_entropy([t], [torch.tensor([-1.0, -2.0, -3.0])])[0].item() == pytest.approx(
        regrad.losses.cross_entropy([d], [torch.tensor([-1.0, -2.0, -3.0])])[0].item())


def test_fake_refuses_requests_after_a_failed_custom_loss_as_tinker_does() -> None:
    """tinker's _run_fwd_bwd takes turns (_take_turn), which refuse every request once a custom loss failed
    (docs/clients.md: "Tinker's client instead rejects all later requests"); the fake skipped the turns."""
    tc = FakeTinkerTrainingClient()

    def boom(data, lps):
        raise ZeroDivisionError("custom loss failed")

    with pytest.raises(ZeroDivisionError):
        tc.forward_backward_custom(tinker_data(), boom).result()
    with pytest.raises(RuntimeError, match="poisoned"):
        tc.forward(tinker_data(), "cross_entropy").result()


def test_fake_encodes_requests_with_tinkers_encoder() -> None:
    """What tinker cannot send (regrad's ModelInput) fails in the fake as on the wire, not passed through."""

    class SpanDatum(regrad.Datum):  # a regrad.Datum with tinker's span fields: gets as far as the encoder
        model_input_spans = None
        loss_fn_input_spans = None

    data = [SpanDatum(d.model_input, dict(d.loss_fn_inputs)) for d in regrad.data_from_texts(TEXTS)]
    with pytest.raises(ValueError, match="Unsupported model input chunk type"):
        FakeTinkerTrainingClient().forward_backward_custom(data, regrad.compose()).result()


def test_datum_to_tinker_types_list_inputs_by_key_as_tinker_does() -> None:
    # tinker's own Datum makes a list of targets int64 and a list of weights float32, empty ones too
    for tokens, targets, weights in (([1, 2, 3], [2, 3, 4], [1, 0, 1]), ([], [], [])):
        ours = regrad.Datum(tokens, {"target_tokens": targets, "weights": weights}).to_tinker()
        theirs = types.Datum(model_input=types.ModelInput.from_ints(tokens),
                             loss_fn_inputs={"target_tokens": targets, "weights": weights})
        for key in ("target_tokens", "weights"):
            assert ours.loss_fn_inputs[key].dtype == theirs.loss_fn_inputs[key].dtype
            assert ours.loss_fn_inputs[key].data == theirs.loss_fn_inputs[key].data
