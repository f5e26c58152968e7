"""LocalTrainingClient edge cases (from an audit; each test failed before its fix): the custom
surrogate with -inf log-probs at zero gradient, half-precision models with regrad's own losses,
tinker's optim_step signature, non-finite weights, a failed load_state, ids past int64."""

import inspect
import math

import numpy as np
import pytest
import torch

import regrad
from regrad.clients import LocalTrainingClient
from regrad.data import Datum, ModelInput, data_from_texts, datum_from_text
from regrad.errors import InputError
from regrad.model import ByteLMConfig, default_model
from conftest import masks_byte0_model

SMALL = ByteLMConfig(d_model=32, n_layers=1, n_heads=2, context=32)
TEXTS = ["the cat sat on the mat", "gradients flow back"]


# ---- forward_backward_custom: a weight-0 / gradient-0 position with a -inf log-prob must not make
# surrogate_loss:sum NaN (the built-in forward_backward masks such positions already).


def test_custom_surrogate_masks_minus_inf_log_probs_at_zero_gradient() -> None:
    client = LocalTrainingClient(masks_byte0_model(SMALL))
    plain = datum_from_text("the cat sat")
    ids, tgt = plain.model_input.to_ints(), np.asarray(plain.loss_fn_inputs["target_tokens"])
    padded = Datum(ModelInput(ids + [32]), {"target_tokens": np.append(tgt, 0), "weights": np.append(np.ones(len(tgt)), 0.0)})
    out = client.forward_backward_custom([padded], regrad.losses.cross_entropy).result()
    assert math.isfinite(out.metrics["loss:sum"])
    assert math.isfinite(out.metrics["surrogate_loss:sum"]), out.metrics
    composed = regrad.forward_backward_custom(client, [padded]).result()
    assert math.isfinite(composed.output.metrics["surrogate_loss:sum"]), composed.output.metrics
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in client.model.parameters())


# ---- float16 / bfloat16 local models: regrad's own losses (cross_entropy, compose, regrad.forward_backward_custom)
# must work through forward_backward_custom; Tinker always hands the loss float32 log-probs.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_regrads_own_losses(dtype: torch.dtype) -> None:
    data = data_from_texts(TEXTS)
    client = LocalTrainingClient(default_model(0, SMALL).to(dtype))
    seen = []

    def spy(d, lps):
        seen.extend(lp.dtype for lp in lps)
        return regrad.losses.cross_entropy(d, lps)

    out = client.forward_backward_custom(data, spy).result()
    assert set(seen) == {torch.float32}  # as tinker's _compute_custom_loss gives them
    assert out.metrics["loss:sum"] > 0
    res = regrad.forward_backward_custom(client, data, regularizers=[regrad.l1(1e-3), regrad.entropy(0.05)]).result()
    assert res.loss > 0 and all(g.dtype == torch.float32 for g in res.grads)
    client.optim_step(regrad.AdamParams(learning_rate=1e-3)).result()
    assert all(p.dtype == dtype and bool(torch.isfinite(p).all()) for p in client.model.parameters())


def test_half_precision_custom_gradient_matches_float32_reference() -> None:
    """Parameter gradients of a bfloat16 model equal, within bfloat16 rounding, the float32 model's."""
    data = data_from_texts(TEXTS)
    half = LocalTrainingClient(default_model(0, SMALL).to(torch.bfloat16))
    full = LocalTrainingClient(default_model(0, SMALL))
    half.forward_backward_custom(data, regrad.losses.cross_entropy).result()
    full.forward_backward_custom(data, regrad.losses.cross_entropy).result()
    for (name, a), b in zip(half.model.named_parameters(), full.model.parameters()):
        if b.grad is not None and float(b.grad.abs().max()) > 1e-3:
            cos = torch.nn.functional.cosine_similarity(a.grad.float().reshape(-1), b.grad.reshape(-1), dim=0)
            assert float(cos) > 0.9, name


# ---- optim_step has tinker 0.38's signature: optim_step(optim_params=None, *, adam_params=None).


def test_optim_step_takes_tinkers_optim_params_keyword() -> None:
    types = pytest.importorskip("tinker.types")
    client = LocalTrainingClient(default_model(0, SMALL))
    client.forward_backward(data_from_texts(["the cat sat"])).result()
    res = client.optim_step(optim_params=types.AdamParams(learning_rate=2e-3)).result()
    assert res.metrics["optim/learning_rate"] == 2e-3
    assert client.optim_step(adam_params=regrad.AdamParams(learning_rate=3e-3)).result().metrics["optim/learning_rate"] == 3e-3
    with pytest.raises(ValueError, match="not both"):
        client.optim_step(regrad.AdamParams(), adam_params=regrad.AdamParams())


@pytest.mark.parametrize(
    "name", ["optim_step", "optim_step_async", "forward_backward_custom", "forward_backward_custom_async"]
)
def test_signatures_match_tinkers(name: str) -> None:
    tc = pytest.importorskip("tinker.lib.public_interfaces.training_client")
    ours = inspect.signature(getattr(LocalTrainingClient, name)).parameters
    theirs = inspect.signature(getattr(tc.TrainingClient, name)).parameters
    assert list(ours) == list(theirs), name
    assert [p.kind for p in ours.values()] == [p.kind for p in theirs.values()], name


# ---- Non-finite weights are bad input: refused at submission with an InputError naming datum, key and position
# (forward used to return loss:sum NaN silently; forward_backward an unnamed NonFiniteError).


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named_at_submission(bad: float) -> None:
    good = data_from_texts(["the cat sat on the mat", "hello world"])
    tgt = np.asarray(good[1].loss_fn_inputs["target_tokens"])
    w = np.ones(len(tgt))
    w[3] = bad
    data = [good[0], Datum(good[1].model_input, {"target_tokens": tgt, "weights": w})]
    client = LocalTrainingClient(default_model(0, SMALL))
    for call in (client.forward, client.forward_backward):
        with pytest.raises(InputError, match=r"datum 1: loss_fn_inputs\['weights'\] has a non-finite value .* at \(3,\)"):
            call(data)  # at the call, before anything is queued
    assert all(p.grad is None for p in client.model.parameters())


# ---- load_state of another model's state must fail without touching this model (torch's load_state_dict
# copies every matching tensor before raising about the rest).


def test_failed_load_state_leaves_the_model_untouched(tmp_path) -> None:
    torch.manual_seed(0)
    a = LocalTrainingClient(torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256)))
    b = LocalTrainingClient(torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256), torch.nn.Linear(256, 256)))
    path = a.save_state(tmp_path / "a.pt").result()
    before = [p.detach().clone() for p in b.model.parameters()]
    with pytest.raises(InputError, match="2.weight"):
        b.load_state(path).result()
    assert all(torch.equal(x, p) for x, p in zip(before, b.model.parameters()))


# ---- Token ids no int64 can hold are an InputError naming the datum, even for a model with no declared vocab_size
# (they used to wrap to -2**63 and crash in gather / tensor building with a bare RuntimeError/ValueError).


@pytest.mark.parametrize(
    "datum, message",
    [
        (Datum([1, 2], {"target_tokens": np.array([1e20, 2.0])}), "datum 0: target_tokens has an id too large"),
        (Datum([1, 2], {"target_tokens": np.array([np.inf, 2.0])}), "datum 0: target_tokens has non-integer values"),
        (Datum([1, 2], {"target_tokens": np.array([2**63, 2], dtype=np.uint64)}), "datum 0: target_tokens has an id too large"),
        (Datum([1, 2**63], {"target_tokens": [1, 2]}), "datum 0: input tokens has an id too large"),
    ],
)
def test_ids_past_int64_are_named_without_a_declared_vocabulary(datum: Datum, message: str) -> None:
    torch.manual_seed(0)
    client = LocalTrainingClient(torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)))
    assert client.vocab_size is None
    with pytest.raises(InputError, match=message):
        client.forward([datum])


# ---- tinker compatibility of a training loop: save_state(...).result().path, and the deprecated
# loss_type_input keyword of forward_backward_custom (a TypeError here before), treated as tinker does.


def test_save_and_load_state_results_have_tinkers_path_field(tmp_path) -> None:
    client = LocalTrainingClient(default_model(0, SMALL))
    saved = client.save_state(tmp_path / "ckpt.pt").result()
    assert saved == str(tmp_path / "ckpt.pt") and saved.path == saved  # still the str it was, plus .path
    loaded = client.load_state(saved.path).result()
    assert loaded.path == str(tmp_path / "ckpt.pt")


def test_loss_type_input_is_tinkers_deprecated_keyword() -> None:
    data = data_from_texts(TEXTS)
    client = LocalTrainingClient(default_model(0, SMALL))
    with pytest.warns(DeprecationWarning, match="loss_type_input"):
        out = client.forward_backward_custom(data, regrad.losses.cross_entropy, loss_type_input="logprobs").result()
    assert out.metrics["loss:sum"] > 0
    with pytest.raises(ValueError, match="Unsupported loss_type_input='probs'"):
        client.forward_backward_custom(data, regrad.losses.cross_entropy, loss_type_input="probs")
