"""LocalTrainingClient and forward_backward_custom: Tinker's semantics, exactness, state, bad input."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

import regrad
from regrad._futures import RequestFuture
from regrad.clients import ForwardBackwardOutput, LocalTrainingClient
from regrad.data import Datum, ModelInput, data_from_texts, datum_from_text
from regrad.errors import InputError, NonFiniteError
from regrad.model import ByteLMConfig, default_model
from conftest import masks_byte0_model

TEXTS = ["the cat sat on the mat", "a tiny model learns bytes", "gradients flow back"]
SMALL = ByteLMConfig(d_model=32, n_layers=1, n_heads=2, context=32)


def as_tinker_data(types: Any, data: List[Datum], keys: Tuple[str, ...]) -> List[Any]:
    """The same data as real `tinker.types.Datum`s, carrying the named loss_fn_inputs."""
    return [
        types.Datum(model_input=types.ModelInput.from_ints(d.model_input.to_ints()),
                    loss_fn_inputs={k: np.asarray(d.loss_fn_inputs[k]) for k in keys})
        for d in data
    ]


def small_client(dtype: torch.dtype = torch.float32, seed: int = 0) -> LocalTrainingClient:
    return LocalTrainingClient(default_model(seed, SMALL).to(dtype), seed=seed)


def nonlinear_loss(data: List[Any], logprobs_list: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
    """A loss with cross-datum coupling and per-token nonlinearity, to make the surrogate check non-trivial."""
    ce = torch.stack([-lp.sum() for lp in logprobs_list]).sum()
    probs = torch.cat([lp.exp().reshape(-1) for lp in logprobs_list])
    ent = -(probs * probs.log()).sum()
    return ce + 0.3 * ent + 0.1 * torch.cat([lp.reshape(-1) for lp in logprobs_list]).std(), {"ce": float(ce.detach())}


def param_grads(client: LocalTrainingClient) -> List[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in client.model.parameters()]


def manual_logprobs(model: torch.nn.Module, datum: Datum) -> torch.Tensor:
    ids = torch.tensor([datum.model_input.to_ints()])
    tgt = torch.as_tensor(np.asarray(datum.loss_fn_inputs["target_tokens"]))
    logp = model(ids).log_softmax(-1)[0]
    return logp.gather(1, tgt.unsqueeze(1)).squeeze(1) if tgt.dim() == 1 else logp.gather(1, tgt)


def topk_datum(text: str, k: int) -> Datum:
    """A datum asking for K log-probs per position: the true next byte, then k-1 fixed others."""
    base = datum_from_text(text)
    tgt = np.asarray(base.loss_fn_inputs["target_tokens"])
    others = (tgt[:, None] + np.arange(1, k)[None, :] * 7) % 256
    return Datum(base.model_input, {"target_tokens": np.concatenate([tgt[:, None], others], axis=1)})


# ------------------------------------------------------------------ semantics


@pytest.mark.parametrize("k", [None, 3])
def test_surrogate_path_is_exact(k: Any) -> None:
    """Parameter gradients via the linear surrogate equal direct backprop of the same loss through the model."""
    client = small_client(torch.float64)
    data = data_from_texts(TEXTS) if k is None else [topk_datum(t, k) for t in TEXTS]
    out = client.forward_backward_custom(data, nonlinear_loss).result()
    via_surrogate = param_grads(client)

    reference = default_model(0, SMALL).to(torch.float64)
    loss, _ = nonlinear_loss(data, [manual_logprobs(reference, d) for d in data])
    loss.backward()
    for (name, p), g in zip(reference.named_parameters(), via_surrogate):
        assert torch.allclose(g, p.grad, rtol=1e-6, atol=1e-9 * float(p.grad.abs().max())), name
    assert out.metrics["loss:sum"] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [
        (len(d.model_input.to_ints()),) if k is None else (len(d.model_input.to_ints()), k) for d in data
    ]


def test_forward_matches_model_and_cross_entropy_matches_custom() -> None:
    client = small_client(torch.float64)
    data = data_from_texts(TEXTS)
    fwd = client.forward(data).result()
    with torch.no_grad():
        for d, o in zip(data, fwd.loss_fn_outputs):
            assert torch.allclose(o["logprobs"], manual_logprobs(client.model, d), rtol=0, atol=1e-12)
    assert all(p.grad is None for p in client.model.parameters())  # forward accumulates nothing

    ce = client.forward_backward(data, "cross_entropy").result()
    ce_grads = param_grads(client)
    assert ce.metrics["loss:sum"] == pytest.approx(fwd.metrics["loss:sum"], rel=1e-12)

    other = small_client(torch.float64)
    other.forward_backward_custom(data, lambda d, lps: (sum(-lp.sum() for lp in lps), {})).result()
    for a, b in zip(ce_grads, param_grads(other)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_gradients_accumulate_until_optim_step() -> None:
    client = small_client(torch.float64)
    data = data_from_texts(TEXTS[:1])
    client.forward_backward(data).result()
    once = param_grads(client)
    client.forward_backward(data).result()
    assert all(torch.allclose(2 * a, b) for a, b in zip(once, param_grads(client)))
    before = [p.detach().clone() for p in client.model.parameters()]
    res = client.optim_step(regrad.AdamParams(learning_rate=1e-2)).result()
    assert res.metrics["optim/step"] == 1.0 and client.step == 1
    assert all(p.grad is None for p in client.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, client.model.parameters()))


def test_requests_run_in_submission_order_and_are_awaitable() -> None:
    client = small_client()
    data = data_from_texts(TEXTS)

    async def loop() -> List[float]:
        losses = []
        for _ in range(3):
            fb = client.forward_backward_custom(data, lambda d, lps: (sum(-lp.sum() for lp in lps), {}))
            step = client.optim_step(regrad.AdamParams(learning_rate=1e-2))  # submitted before fb is awaited
            losses.append((await fb).metrics["loss:sum"])
            await step
        return losses

    losses = asyncio.run(loop())
    assert client.step == 3
    assert losses[-1] < losses[0]
    final = client.forward(data).result().metrics["loss:sum"]
    assert final < losses[-1]


def test_tinker_datum_and_adam_params_work_with_the_local_client() -> None:
    types = pytest.importorskip("tinker.types")
    ours = data_from_texts(TEXTS)
    theirs = as_tinker_data(types, ours, ("target_tokens", "weights"))
    a, b = small_client(), small_client()
    out_a = a.forward_backward_custom(ours, nonlinear_loss).result()
    out_b = b.forward_backward_custom(theirs, nonlinear_loss).result()
    assert out_a.metrics == out_b.metrics
    assert all(torch.equal(x, y) for x, y in zip(param_grads(a), param_grads(b)))
    a.optim_step(regrad.AdamParams(learning_rate=1e-3)).result()
    b.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_loss_fn_passes_through_tinker_client_side_custom_loss_unchanged() -> None:
    """Tinker's own `_compute_custom_loss` turns our logprobs into weights = -d loss/d logprobs, as we do."""
    types = pytest.importorskip("tinker.types")
    training_client = pytest.importorskip("tinker.lib.public_interfaces.training_client")
    data = data_from_texts(TEXTS)
    tinker_data = as_tinker_data(types, data, ("target_tokens",))
    client = small_client()
    fwd = client.forward(data).result()
    forward_result = types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[{"logprobs": types.TensorData.from_torch(o["logprobs"])} for o in fwd.loss_fn_outputs],
    )
    tinker_out = training_client.TrainingClient._compute_custom_loss(tinker_data, nonlinear_loss, forward_result)

    leaves = [o["logprobs"].clone().requires_grad_(True) for o in fwd.loss_fn_outputs]
    loss, metrics = nonlinear_loss(data, leaves)
    loss.backward()
    assert tinker_out.metrics == metrics
    assert tinker_out.loss_sum == pytest.approx(float(loss.detach()), rel=1e-6)
    for leaf, datum in zip(leaves, tinker_out.data):
        assert torch.equal(datum.loss_fn_inputs["weights"].to_torch(), -leaf.grad)


# ----------------------------------------------------------------------- state


def test_save_and_load_state_round_trip_exactly(tmp_path: Any) -> None:
    data = data_from_texts(TEXTS)
    adam = regrad.AdamParams(learning_rate=5e-3)

    def train(client: LocalTrainingClient, steps: int) -> None:
        for _ in range(steps):
            client.forward_backward_custom(data, nonlinear_loss)
            client.optim_step(adam)

    client = small_client()
    train(client, 2)
    saved = client.save_state(tmp_path / "ckpt" / "state.pt").result()
    at_save = client.forward(data).result()
    train(client, 2)
    client.forward(data).result()  # wait for the queue
    after_two_more = [p.detach().clone() for p in client.model.parameters()]

    client.load_state(saved).result()
    assert client.step == 2
    for a, b in zip(at_save.loss_fn_outputs, client.forward(data).result().loss_fn_outputs):
        assert torch.equal(a["logprobs"], b["logprobs"])
    train(client, 2)
    client.forward(data).result()  # wait for the queue
    assert all(torch.equal(a, b) for a, b in zip(after_two_more, client.model.parameters()))

    fresh = small_client(seed=1)  # other weights, no optimizer yet: loading restores everything
    fresh.load_state(saved).result()
    train(fresh, 2)
    fresh.forward(data).result()
    assert all(torch.equal(a, b) for a, b in zip(after_two_more, fresh.model.parameters()))


def test_load_state_rejects_other_files(tmp_path: Any) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    client = small_client()
    with pytest.raises(InputError, match="not a state saved"):
        client.load_state(path).result()
    assert client.forward(data_from_texts(TEXTS[:1])).result().loss_fn_outputs


# ------------------------------------------------------------------ bad input


def _edited(tokens: Any) -> ModelInput:
    """A ModelInput whose tokens were replaced after it was built (built with bad ids, it raises)."""
    model_input = ModelInput([1, 2])
    model_input.tokens = tokens
    return model_input


def _bad_data() -> Dict[str, Tuple[List[Any], str]]:
    good = datum_from_text("hello there")
    n = len(good.model_input.to_ints())
    return {
        "empty": ([], "empty"),
        "no targets": ([good, Datum(good.model_input, {"weights": np.ones(n)})], "datum 1 has no loss_fn_inputs\\['target_tokens'\\]"),
        "weights length": ([Datum(good.model_input, {"target_tokens": np.arange(n), "weights": np.ones(n - 1)})], "datum 0: weights have shape"),
        "targets length": ([good, good, Datum(good.model_input, {"target_tokens": np.arange(n + 2)})], "datum 2: target_tokens has shape"),
        "too long": ([datum_from_text("x" * 40)], "datum 0 has 39 input tokens, longer than the model's context \\(32\\)"),
        "token range": ([Datum(ModelInput([1, 2]), {"target_tokens": np.array([3, 300])})], "datum 0: target_tokens has ids outside"),
        "not a list": (good, "must be a list of Datum"),  # type: ignore[dict-item]
        "float ids": ([Datum(_edited([104.9, 101.5]), {"target_tokens": np.array([3, 4])})], "datum 0: input token 104.9 is not an integer id"),
        "string input": ([good, Datum(_edited("hi"), {"target_tokens": np.array([3, 4])})], "datum 1: input token 'h' is not an integer id"),
        "ragged targets": ([Datum([1, 2], {"target_tokens": [[1, 2], [3]]})], "datum 0: loss_fn_inputs\\['target_tokens'\\] is not a rectangular array"),
        "string targets": ([good, Datum([1, 2], {"target_tokens": ["a", "b"]})], "datum 1: loss_fn_inputs\\['target_tokens'\\] must hold numbers"),
        "bool targets": ([Datum([1, 2], {"target_tokens": [True, False]})], "datum 0: target_tokens holds booleans"),
        "string weights": ([Datum([1, 2], {"target_tokens": [2, 3], "weights": ["x", "y"]})], "datum 0: loss_fn_inputs\\['weights'\\] must hold numbers"),
        "ragged weights": ([Datum([1, 2], {"target_tokens": [2, 3], "weights": [[1.0], 1.0]})], "datum 0: loss_fn_inputs\\['weights'\\] is not a rectangular array"),
    }


@pytest.mark.parametrize("case", sorted(_bad_data()))
def test_bad_data_is_rejected_naming_the_datum(case: str) -> None:
    data, message = _bad_data()[case]
    client = small_client()
    for call in (client.forward, client.forward_backward, lambda d: client.forward_backward_custom(d, nonlinear_loss)):
        with pytest.raises(InputError, match=message):
            call(data)
    assert all(p.grad is None for p in client.model.parameters())
    assert client.forward(data_from_texts(TEXTS)).result().metrics["loss:sum"] > 0  # still usable


@pytest.mark.parametrize(
    "datum, message",
    [
        (Datum([1, 2, 3], {"target_tokens": [2, 3, -1]}), "datum 0: target_tokens has a negative id \\(-1\\)"),
        (Datum([1, -2, 3], {"target_tokens": [2, 3, 4]}), "datum 0: input tokens has a negative id \\(-2\\)"),
    ],
)
def test_negative_token_ids_are_rejected_at_submission_without_a_declared_vocabulary(datum: Datum, message: str) -> None:
    torch.manual_seed(0)
    client = LocalTrainingClient(torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)))
    assert client.vocab_size is None  # nothing to check ids against but their sign
    for call in (client.forward, lambda d: client.forward_backward_custom(d, nonlinear_loss)):
        with pytest.raises(InputError, match=message):
            call([datum])  # at the call, before anything is queued


def _wrong_loss_fns() -> Dict[str, Tuple[Any, type, str]]:
    def raises(data: Any, lps: Any) -> Any:
        raise RuntimeError("boom")

    return {
        "raises": (raises, RuntimeError, "boom"),
        "not a tuple": (lambda d, lps: sum(lp.sum() for lp in lps), InputError, "must return \\(loss, metrics\\)"),
        "float loss": (lambda d, lps: (1.0, {}), InputError, "0-d torch tensor"),
        "vector loss": (lambda d, lps: (lps[0], {}), InputError, "0-d torch tensor"),
        "detached": (lambda d, lps: (lps[0].detach().sum(), {}), InputError, "no autograd graph"),
        "bad metrics": (lambda d, lps: (lps[0].sum(), ["x"]), InputError, "dict of metrics"),
        "ignores a datum": (lambda d, lps: (lps[0].sum(), {}), InputError, "logprobs_list\\[1\\] \\(datum 1\\)"),
        "nan loss": (lambda d, lps: (sum(lp.sum() for lp in lps) * float("nan"), {}), NonFiniteError, "non-finite loss"),
        "nan grad": (lambda d, lps: (lps[0].sum() + (lps[1] * 0.0).sqrt().sum(), {}), NonFiniteError, "datum 1"),
    }


@pytest.mark.parametrize("case", sorted(_wrong_loss_fns()))
def test_failed_custom_loss_applies_nothing_and_client_stays_usable(case: str) -> None:
    loss_fn, error, message = _wrong_loss_fns()[case]
    client = small_client()
    data = data_from_texts(TEXTS)
    client.forward_backward(data).result()
    before = param_grads(client)
    future = client.forward_backward_custom(data, loss_fn)
    with pytest.raises(error, match=message):
        future.result()
    assert all(torch.equal(a, b) for a, b in zip(before, param_grads(client)))
    client.forward_backward_custom(data, nonlinear_loss).result()  # the next request works
    client.optim_step(regrad.AdamParams(learning_rate=1e-3)).result()


def test_wrong_builtin_loss_and_adam_params_are_rejected() -> None:
    client = small_client()
    data = data_from_texts(TEXTS[:1])
    with pytest.raises(ValueError, match="cross_entropy"):
        client.forward_backward(data, "importance_sampling")
    with pytest.raises(ValueError, match="learning_rate"):
        client.optim_step(regrad.AdamParams(learning_rate=float("nan")))
    with pytest.raises(TypeError, match="callable"):
        client.forward_backward_custom(data, "cross_entropy")  # type: ignore[arg-type]


def test_weight_zero_padding_with_minus_inf_log_probs_is_masked() -> None:
    client = LocalTrainingClient(masks_byte0_model(SMALL))
    plain = datum_from_text("the cat sat")
    ids, tgt = plain.model_input.to_ints(), np.asarray(plain.loss_fn_inputs["target_tokens"])
    padded = Datum(ModelInput(ids + [32]), {"target_tokens": np.append(tgt, 0), "weights": np.append(np.ones(len(tgt)), 0.0)})
    expected = client.forward([plain]).result().metrics["loss:sum"]
    assert client.forward([padded]).result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    assert client.forward_backward([padded]).result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(InputError, match="ModelInput.from_ints: input token 1.5 is not an integer id"):
        ModelInput.from_ints([1.5])


@pytest.mark.parametrize("tokens, message", [([1, 1.5], "input token 1.5 is not an integer id"),
                                             ("hi", "input tokens must be a sequence"),
                                             ([True], "input token True is not an integer id")])
def test_model_input_checks_its_tokens_when_built(tokens: Any, message: str) -> None:
    """As tinker's (pydantic) ModelInput: a bad id fails where the ModelInput is made, not in a later step."""
    with pytest.raises(InputError, match=f"ModelInput: {message}"):
        ModelInput(tokens)
    assert ModelInput(np.array([3, 4])).tokens == [3, 4]  # numpy ids read as Python ints
    assert all(type(t) is int for t in ModelInput(torch.tensor([3, 4])).tokens)


def test_optim_step_takes_adam_params_only_and_eps_above_zero() -> None:
    client = small_client()
    client.forward_backward(data_from_texts(TEXTS[:1])).result()
    for wrong in (3e-3, "fast", object()):  # silently running AdamW defaults would be wrong
        with pytest.raises(TypeError, match="optim_step takes AdamParams"):
            client.optim_step(wrong)
    with pytest.raises(ValueError, match="eps must be > 0"):  # eps = 0: 0 / 0 = NaN weights where grad is 0
        client.optim_step(regrad.AdamParams(eps=0.0))
    assert client.optim_step({"learning_rate": 1e-3}).result().metrics["optim/learning_rate"] == 1e-3


def test_optim_step_copies_adam_params_at_the_call() -> None:
    """Changing the caller's AdamParams after optim_step (a schedule loop) neither changes nor unvalidates the queued step."""
    data = data_from_texts(TEXTS)
    gate = threading.Event()

    def held_loss(d: Any, lps: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        gate.wait(10)  # keeps the worker busy, so the step below stays queued
        return nonlinear_loss(d, lps)

    client, reference = small_client(), small_client()
    adam = regrad.AdamParams(learning_rate=1e-3)
    backward = client.forward_backward_custom(data, held_loss)
    step = client.optim_step(adam)
    adam.learning_rate, adam.eps = 0.5, 0.0  # eps = 0 is refused at a call: NaN weights where a grad is 0
    gate.set()
    backward.result()
    assert step.result().metrics["optim/learning_rate"] == 1e-3
    reference.forward_backward_custom(data, nonlinear_loss)
    reference.optim_step(regrad.AdamParams(learning_rate=1e-3)).result()
    assert all(torch.equal(a, b) for a, b in zip(client.model.parameters(), reference.model.parameters()))


def test_adam_params_take_real_numbers_of_any_kind_but_not_bools() -> None:
    client = small_client()
    for value in (np.float32(1e-3), np.float64(1e-3), torch.tensor(1e-3, dtype=torch.float64), 1):
        client.forward_backward(data_from_texts(TEXTS[:1]))
        rate = client.optim_step(regrad.AdamParams(learning_rate=value)).result().metrics["optim/learning_rate"]
        assert type(rate) is float and rate == float(value)
    for wrong in (True, np.bool_(True), torch.tensor(True), torch.tensor([1e-3]), "1e-3"):
        with pytest.raises(ValueError, match="AdamParams.learning_rate must be a finite number"):
            client.optim_step(regrad.AdamParams(learning_rate=wrong))
    with pytest.raises(TypeError, match="AdamParams has no field\\(s\\) \\['lr'\\]"):
        client.optim_step({"lr": 1e-3})


def test_grad_clip_of_large_float32_gradients_uses_the_float64_norm() -> None:
    """1e19 × a loss has a float32 gradient norm of inf but a finite float64 one: clipped, the step equals
    torch's own clip_grad_norm_ + AdamW on the unscaled gradient (clipping does not see the scale)."""
    data = data_from_texts(TEXTS)
    adam = dict(learning_rate=1e-2, eps=1e-3)  # eps >> rounding: the update is smooth in the gradient
    plain_sum = lambda d, lps: (sum(lp.sum() for lp in lps), {})  # noqa: E731
    scaled = small_client()
    scaled.forward_backward_custom(data, lambda d, lps: (1e19 * plain_sum(d, lps)[0], {})).result()
    assert math.isinf(float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in scaled.model.parameters()]))))

    reference = small_client()
    reference.forward_backward_custom(data, plain_sum).result()
    params = list(reference.model.parameters())
    norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert norm > 1.0  # clipping acts on both
    torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.0).step()

    metrics = scaled.optim_step(regrad.AdamParams(grad_clip_norm=1.0, **adam)).result().metrics
    assert metrics["optim/grad_norm"] == pytest.approx(1e19 * norm, rel=1e-4)
    for a, b in zip(scaled.model.parameters(), params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class _TableLM(torch.nn.Module):
    """logits[t] = table[id_t] (zeros at first): d log p(target) / d table[id, j] = onehot(target)_j - 1/vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def test_gradient_accumulation_overflow_is_refused_and_leaves_the_gradients_usable() -> None:
    """Each request's gradient is finite; their float32 sum is not: the request that would overflow is
    refused, the accumulated gradient stays as it was, and optim_step still uses it."""
    s = 0.8 * float(torch.finfo(torch.float32).max)
    scaled = lambda d, lps: (s * (lps[0].sum() - lps[0].sum().detach()), {})  # noqa: E731  loss 0, d/d logprob = s
    client = LocalTrainingClient(_TableLM(4))
    data = [Datum([1], {"target_tokens": [2]})]
    client.forward_backward_custom(data, scaled).result()
    expected = torch.zeros(4, 4)
    expected[1] = torch.tensor([-0.25, -0.25, 0.75, -0.25]) * s  # 0.6 × float32 max at [1, 2]: twice is inf
    torch.testing.assert_close(client.model.table.grad, expected, rtol=1e-6, atol=0.0)
    accumulated = client.model.table.grad.clone()

    with pytest.raises(NonFiniteError, match="accumulated gradient of parameter 'table' overflows"):
        client.forward_backward_custom(data, scaled).result()
    assert torch.equal(client.model.table.grad, accumulated)
    step = client.optim_step(regrad.AdamParams(learning_rate=1e-3, grad_clip_norm=1.0)).result()
    assert step.metrics["optim/grad_norm"] == pytest.approx(s * math.sqrt(0.75), rel=1e-6)
    assert client.model.table.grad is None and bool(torch.isfinite(client.model.table).all())
    client.forward_backward(data).result()
    client.optim_step(regrad.AdamParams(learning_rate=1e-3)).result()


class _SqrtScale(torch.nn.Module):
    """Byte logits times sqrt(scale): scale = 0 gives finite logits but a NaN gradient for scale."""

    def __init__(self) -> None:
        super().__init__()
        self.body = default_model(0, SMALL)
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(ids) * (1.0 + self.scale.sqrt())


def test_non_finite_parameter_gradients_apply_nothing_and_the_client_stays_usable() -> None:
    client = LocalTrainingClient(_SqrtScale())
    data = data_from_texts(TEXTS)
    with pytest.raises(NonFiniteError, match="parameter 'scale' has non-finite values; no gradient applied"):
        client.forward_backward(data).result()
    assert all(p.grad is None for p in client.model.parameters())
    with torch.no_grad():
        client.model.scale.fill_(1.0)
    client.forward_backward(data).result()
    assert client.optim_step(regrad.AdamParams(learning_rate=1e-3)).result().metrics["optim/grad_norm"] > 0


def test_a_custom_loss_touching_parameters_leaves_them_alone() -> None:
    client = small_client()
    data = data_from_texts(TEXTS)
    penalty = lambda: sum((p**2).sum() for p in client.model.parameters())  # noqa: E731

    def with_weight_penalty(d: Any, lps: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        return lps[0].sum() + penalty(), {}  # ignores datum 1: the request fails

    with pytest.raises(InputError, match="datum 1"):
        client.forward_backward_custom(data, with_weight_penalty).result()
    assert all(p.grad is None for p in client.model.parameters())
    # on success only d loss / d log-probs reaches the parameters, as on Tinker (whose loss_fn sees no weights)
    ok = client.forward_backward_custom(data, lambda d, lps: (sum(lp.sum() for lp in lps) + penalty(), {})).result()
    reference = small_client()
    reference.forward_backward_custom(data, lambda d, lps: (sum(lp.sum() for lp in lps), {})).result()
    assert math.isfinite(ok.metrics["loss:sum"])
    for a, b in zip(param_grads(client), param_grads(reference)):
        torch.testing.assert_close(a, b)


def test_any_module_mapping_ids_to_logits_works() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
    client = LocalTrainingClient(model)
    data = data_from_texts(TEXTS)
    out = client.forward_backward_custom(data, nonlinear_loss).result()
    assert isinstance(out, ForwardBackwardOutput) and len(out.loss_fn_outputs) == 3
    with pytest.raises(InputError, match="vocabulary"):
        client.forward([Datum(ModelInput([1]), {"target_tokens": np.array([999])})]).result()


class _NoVocabLM(torch.nn.Module):
    """An embedding of 50 ids and no declared vocab_size: ids are only checked when the model runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))


def test_an_input_id_past_an_undeclared_vocabulary_is_named_at_run_time() -> None:
    client = LocalTrainingClient(_NoVocabLM())
    data = [Datum(ModelInput([1, 2, 3]), {"target_tokens": np.array([2, 3, 4])}),
            Datum(ModelInput([7, 70]), {"target_tokens": np.array([1, 2])})]
    for request in (client.forward, client.forward_backward, lambda d: client.forward_backward_custom(d, nonlinear_loss)):
        with pytest.raises(InputError, match=r"largest is 70 \(datum 1\).*vocab_size"):
            request(data).result()
    assert all(p.grad is None for p in client.model.parameters())
    client.forward(data[:1]).result()  # still usable


def test_a_closed_client_refuses_requests_by_name(tmp_path: Any) -> None:
    data = data_from_texts(TEXTS)
    with small_client() as client:
        pending = client.forward_backward(data)
    assert pending.done()  # close() finished the queued request
    client.close()  # twice is fine
    requests = {
        "forward": lambda: client.forward(data),
        "forward_backward": lambda: client.forward_backward(data),
        "forward_backward_custom": lambda: client.forward_backward_custom(data, nonlinear_loss),
        "optim_step": lambda: client.optim_step(),
        "save_state": lambda: client.save_state(tmp_path / "s.pt"),
        "load_state": lambda: client.load_state(tmp_path / "s.pt"),
        "forward_async": lambda: asyncio.run(client.forward_async(data)),
        "bad data": lambda: client.forward([]),  # closed is said before the data are checked
    }
    for name, request in requests.items():
        with pytest.raises(RuntimeError, match="this LocalTrainingClient is closed"):
            request()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_stepped_through_float32_master_weights(dtype: torch.dtype, tmp_path: Any) -> None:
    """float16 / bfloat16 weights follow torch's AdamW run in float32 (rounded after each step): eps=1e-12
    underflows in float16 (NaN weights) and small updates round away in both."""
    data = data_from_texts(TEXTS)
    adam = regrad.AdamParams(learning_rate=1e-3, weight_decay=0.1)
    client = small_client(dtype)
    reference = [p.detach().float().clone().requires_grad_(True) for p in client.model.parameters()]
    optimizer = torch.optim.AdamW(reference, lr=1e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.1)

    def step() -> None:
        client.forward_backward(data).result()
        for ref, p in zip(reference, client.model.parameters()):
            ref.grad = p.grad.float()
        optimizer.step()
        client.optim_step(adam).result()

    for _ in range(3):
        step()
        for ref, p in zip(reference, client.model.parameters()):
            assert p.dtype == dtype and torch.equal(p, ref.detach().to(dtype))
    saved = client.save_state(tmp_path / "half.pt").result()
    step()
    after = [p.detach().clone() for p in client.model.parameters()]
    client.load_state(saved).result()  # the float32 masters come back too: the same step again, bit for bit
    client.forward_backward(data).result()
    client.optim_step(adam).result()
    assert all(torch.equal(a, p) for a, p in zip(after, client.model.parameters()))

    norm = dict(client.model.named_parameters())["norm.weight"]
    with torch.no_grad():
        norm.zero_()  # changed outside the client: the next step starts from it, not from a stale master
    client.forward_backward(data).result()
    client.optim_step(adam).result()
    assert float(norm.detach().abs().max()) < 1e-2


# ------------------------------------------------------ composed losses (regrad.compose)

needs_compose = pytest.mark.skipif(not hasattr(regrad, "compose"), reason="regrad.compose is not available")


def composed_specs() -> List[Any]:
    from regrad.specs import entropy, l1

    def smooth_max(data: Any, lps: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        return torch.logsumexp(torch.cat([lp.reshape(-1) for lp in lps]), 0), {}

    return [l1(0.01), entropy(0.2), {"fn": smooth_max, "weight": 0.5, "name": "smooth_max"}]


@needs_compose
def test_forward_backward_custom_with_regularizers_is_exact() -> None:
    from regrad.compose import compose

    client = small_client(torch.float64)
    data = data_from_texts(TEXTS)
    result = regrad.forward_backward_custom(client, data, regularizers=composed_specs()).result()
    assert isinstance(result, regrad.CustomLossResult)
    assert set(result.telemetry.to_dict()["regularizers"]) == {"l1", "entropy", "smooth_max"}
    assert result.loss == pytest.approx(result.telemetry.loss_total)
    assert result.output.metrics["loss:sum"] == pytest.approx(result.loss, rel=1e-12)
    assert result.output.metrics["reg/l1/weight"] == 0.01  # the composed loss's flat metrics pass through

    reference = default_model(0, SMALL).to(torch.float64)
    loss_fn = compose(regrad.losses.cross_entropy, composed_specs())
    logprobs = [manual_logprobs(reference, d) for d in data]
    loss, _ = loss_fn(data, logprobs)
    grads_wrt_logprobs = torch.autograd.grad(loss, logprobs, retain_graph=True)
    for g, ours in zip(grads_wrt_logprobs, result.grads):
        assert torch.allclose(g, ours, rtol=1e-9, atol=1e-12)
    loss.backward()
    for (name, p), g in zip(reference.named_parameters(), param_grads(client)):
        assert torch.allclose(g, p.grad, rtol=1e-6, atol=1e-9 * float(p.grad.abs().max())), name


@needs_compose
def test_composed_loss_fn_passes_through_tinker_compute_custom_loss() -> None:
    types = pytest.importorskip("tinker.types")
    training_client = pytest.importorskip("tinker.lib.public_interfaces.training_client")
    from regrad.compose import compose

    data = data_from_texts(TEXTS)
    tinker_data = as_tinker_data(types, data, ("target_tokens", "weights"))
    client = small_client()
    local = regrad.forward_backward_custom(client, tinker_data, regularizers=composed_specs()).result()
    forward_result = types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[{"logprobs": types.TensorData.from_torch(o["logprobs"])} for o in local.output.loss_fn_outputs],
    )
    loss_fn = compose(regrad.losses.cross_entropy, composed_specs())
    out = training_client.TrainingClient._compute_custom_loss(tinker_data, loss_fn, forward_result)
    assert out.loss_sum == pytest.approx(local.loss, rel=1e-6)
    assert out.metrics["reg/entropy/contribution"] == pytest.approx(local.telemetry.regularizers["entropy"].contribution)
    for datum, grad in zip(out.data, local.grads):
        assert torch.allclose(datum.loss_fn_inputs["weights"].to_torch(), -grad, rtol=1e-6, atol=1e-9)


class _TinkerShapedClient:
    """Anything with Tinker's `forward_backward_custom(data, loss_fn)` returning a tinker APIFuture."""

    def __init__(self, inner: LocalTrainingClient) -> None:
        self.inner = inner
        self.calls = 0

    def forward_backward_custom(self, data: Any, loss_fn: Any) -> Any:
        from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

        self.calls += 1
        return AwaitableConcurrentFuture(self.inner.forward_backward_custom(data, loss_fn).future())


@needs_compose
def test_forward_backward_custom_is_duck_typed_and_awaitable() -> None:
    pytest.importorskip("tinker")
    client = _TinkerShapedClient(small_client())
    data = data_from_texts(TEXTS)

    async def run() -> Any:
        return await regrad.forward_backward_custom(client, data, regularizers=composed_specs())

    awaited = asyncio.run(run())
    blocking = regrad.forward_backward_custom(client, data, regularizers=composed_specs()).result()
    assert client.calls == 2
    assert awaited.loss == pytest.approx(blocking.loss, rel=1e-6)
    assert all(torch.allclose(a, b) for a, b in zip(awaited.grads, blocking.grads))
    with pytest.raises(TypeError, match="forward_backward_custom"):
        regrad.forward_backward_custom(object(), data)


@needs_compose
def test_failing_regularizer_applies_nothing_and_client_stays_usable() -> None:
    from regrad.errors import RegularizerError

    def broken(data: Any, lps: Any) -> Any:
        raise RuntimeError("verifier down")

    client = small_client()
    data = data_from_texts(TEXTS)
    future = regrad.forward_backward_custom(client, data, regularizers=[{"fn": broken, "weight": 0.1, "name": "verifier"}])
    with pytest.raises(RegularizerError, match="verifier"):
        future.result()
    with pytest.raises(RegularizerError):  # the error is kept, not recomputed
        future.result()
    assert all(p.grad is None for p in client.model.parameters())
    assert regrad.forward_backward_custom(client, data, regularizers=composed_specs()).result().loss > 0


def test_mapped_future_keeps_the_request_outcome_not_an_interrupted_wait() -> None:
    from concurrent.futures import Future

    from regrad._futures import MappedFuture, RequestFuture

    inner: Future = Future()
    inner.set_running_or_notify_cancel()  # the request is running: a cancelled wait cannot stop it
    mapped = MappedFuture(RequestFuture(inner), lambda v: v * 2)

    async def give_up() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(mapped, 0.01)

    asyncio.run(give_up())
    inner.set_result(21)  # ... and then succeeds: its result is what every later wait gets
    assert mapped.result() == 42 and asyncio.run(mapped.result_async()) == 42

    class InterruptedOnce:
        calls = 0

        def result(self, timeout: Any = None) -> int:
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt  # Ctrl-C while blocking in .result()
            return 21

        def done(self) -> bool:
            return self.calls > 1

    interrupted = MappedFuture(InterruptedOnce(), lambda v: v * 2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.result()
    assert interrupted.result() == 42

    failed: Future = Future()
    failed.set_exception(ValueError("request failed"))
    mapped_calls: List[int] = []
    kept = MappedFuture(RequestFuture(failed), mapped_calls.append)
    for _ in range(2):  # the request's own error is kept for every caller; fn never runs
        with pytest.raises(ValueError, match="request failed"):
            kept.result()
    assert mapped_calls == []


def test_futures_have_tinkers_coroutine_and_future() -> None:
    from concurrent.futures import Future

    from regrad._futures import MappedFuture, RequestFuture

    inner: Future = Future()
    request = RequestFuture(inner)
    mapped = MappedFuture(request, lambda v: v * 2)
    concurrent_mapped = mapped.future()
    assert mapped.future() is concurrent_mapped and not concurrent_mapped.done()

    async def run() -> Tuple[int, int]:
        tasks = asyncio.create_task(request.coroutine()), asyncio.create_task(mapped.coroutine())
        await asyncio.sleep(0)
        inner.set_result(21)
        return await tasks[0], await tasks[1]

    assert asyncio.run(run()) == (21, 42)
    assert concurrent_mapped.result(timeout=5) == 42
    failed: Future = Future()
    failed.set_exception(ValueError("request failed"))
    with pytest.raises(ValueError, match="request failed"):
        MappedFuture(RequestFuture(failed), lambda v: v).future().result(timeout=5)


@needs_compose
@pytest.mark.parametrize("single", [{"fn": nonlinear_loss, "weight": 0.1, "name": "x"}, "l1 spec"])
def test_a_single_regularizer_not_in_a_list_is_named(single: Any) -> None:
    single = regrad.l1(0.1) if single == "l1 spec" else single
    with pytest.raises(TypeError, match="regularizers must be a list .* got a single (dict|RegularizerSpec): wrap it in a list"):
        regrad.forward_backward_custom(small_client(), data_from_texts(TEXTS), regularizers=single)


# ----------------------------------------------- Tinker-shaped clients (duck typing)


class _TinkerFuture:
    """Tinker's AwaitableConcurrentFuture: result, result_async, future(), no done(); a cancelled wait
    cancels the request (its asyncio.wrap_future cancels the concurrent future)."""

    def __init__(self, request: Future) -> None:
        self._request = request

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._request.result(timeout)

    async def result_async(self, timeout: Optional[float] = None) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(self._request), timeout)

    def future(self) -> Future:
        return self._request

    def __await__(self) -> Any:
        return self.result_async().__await__()


class _CombinedTinkerFuture:
    """Older Tinker's _CombinedAPIFuture: result, result_async and await only (no done(), no future())."""

    def __init__(self, inner: _TinkerFuture) -> None:
        self._inner = inner

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._inner.result(timeout)

    async def result_async(self, timeout: Optional[float] = None) -> Any:
        return await self._inner.result_async(timeout)

    def __await__(self) -> Any:
        return self.result_async().__await__()


class _FakeTinkerClient:
    """Tinker's client side of a custom loss (leaves, loss_fn, backward) over a local model; the 'server'
    answers at once, or when the test calls `answer` (`hold=True`)."""

    def __init__(self, *, combined: bool = False, hold: bool = False) -> None:
        self.local = small_client()
        self.combined, self.hold = combined, hold
        self.requests: List[Tuple[Future, ForwardBackwardOutput]] = []

    def forward_backward_custom(self, data: Any, loss_fn: Any) -> Any:
        leaves = [o["logprobs"].clone().requires_grad_(True) for o in self.local.forward(data).result().loss_fn_outputs]
        loss, metrics = loss_fn(data, leaves)
        loss.backward()
        output = ForwardBackwardOutput("ArrayRecord", [{"logprobs": lp.detach()} for lp in leaves],
                                       {"loss:sum": float(loss.detach()), **metrics})
        request: Future = Future()
        self.requests.append((request, output))
        if not self.hold:
            self.answer()
        future = _TinkerFuture(request)
        return _CombinedTinkerFuture(future) if self.combined else future

    def answer(self, error: Optional[Exception] = None) -> None:
        request, output = self.requests[-1]
        request.set_exception(error) if error else request.set_result(output)


def _local_result(regularizers: List[Any]) -> regrad.CustomLossResult:
    """The same request on the local client: the reference for a Tinker-shaped one."""
    return regrad.forward_backward_custom(small_client(), data_from_texts(TEXTS), regularizers=regularizers).result()


@needs_compose
@pytest.mark.parametrize("combined", [False, True])
def test_a_timed_out_wait_does_not_cancel_a_tinker_request(combined: bool) -> None:
    client = _FakeTinkerClient(combined=combined, hold=True)
    future = regrad.forward_backward_custom(client, data_from_texts(TEXTS), regularizers=composed_specs())

    async def impatient() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(future, 0.01)

    asyncio.run(impatient())
    request, _ = client.requests[-1]
    assert not request.cancelled()
    client.answer()
    assert future.result(timeout=10).loss == pytest.approx(_local_result(composed_specs()).loss, rel=1e-6)


@needs_compose
@pytest.mark.parametrize("combined", [False, True])
def test_done_turns_true_on_tinker_futures_that_have_no_done(combined: bool) -> None:
    client = _FakeTinkerClient(combined=combined, hold=True)
    future = regrad.forward_backward_custom(client, data_from_texts(TEXTS), regularizers=composed_specs())
    assert not future.done()
    client.answer()
    if not combined:
        assert future.done()  # read from the inner future().done()
    deadline = time.monotonic() + 10  # the combined future has neither: a helper thread started by done() watches it
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert future.done()


@needs_compose
def test_composed_loss_threads_stop_when_a_tinker_request_fails() -> None:
    def square(d: Any, lps: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        return sum((lp**2).mean() for lp in lps), {}

    def cube(d: Any, lps: List[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        return sum((lp**3).mean() for lp in lps), {}

    before = set(threading.enumerate())
    client = _FakeTinkerClient(combined=True, hold=True)
    regs = [{"fn": square, "weight": 0.1, "name": "square"}, {"fn": cube, "weight": 0.1, "name": "cube"}]
    future = regrad.forward_backward_custom(client, data_from_texts(TEXTS), base_loss=None, regularizers=regs)
    client.answer(RuntimeError("server rejected the request"))
    with pytest.raises(RuntimeError, match="server rejected"):
        future.result()
    pool = [t for t in threading.enumerate() if t not in before and t.name.startswith("regrad_")]
    for thread in pool:
        thread.join(timeout=5)
    assert not [t.name for t in pool if t.is_alive()]


class _EagerClient(_FakeTinkerClient):
    """Returns the output itself, not a future."""

    def forward_backward_custom(self, data: Any, loss_fn: Any) -> Any:
        return super().forward_backward_custom(data, loss_fn).result()


class _AsyncClient:
    """`async def forward_backward_custom` (or only Tinker's `forward_backward_custom_async`), giving a future."""

    def __init__(self) -> None:
        self.inner = _FakeTinkerClient()

    async def forward_backward_custom(self, data: Any, loss_fn: Any) -> Any:
        return self.inner.forward_backward_custom(data, loss_fn)


class _AsyncOnlyClient:
    def __init__(self) -> None:
        self.inner = _FakeTinkerClient()

    async def forward_backward_custom_async(self, data: Any, loss_fn: Any) -> Any:
        return self.inner.forward_backward_custom(data, loss_fn)


@needs_compose
def test_what_a_duck_typed_client_returns_is_checked() -> None:
    data = data_from_texts(TEXTS)
    with pytest.raises(TypeError, match="_EagerClient.forward_backward_custom returned ForwardBackwardOutput, not a future"):
        regrad.forward_backward_custom(_EagerClient(), data, regularizers=composed_specs())
    for client in (_AsyncClient(), _AsyncOnlyClient()):  # outside an event loop: a named error, no stray coroutine
        with pytest.raises(TypeError, match="forward_backward_custom(_async)? is async"):
            regrad.forward_backward_custom(client, data, regularizers=composed_specs())

    async def in_async_code(client: Any) -> regrad.CustomLossResult:
        return await regrad.forward_backward_custom(client, data, regularizers=composed_specs())

    expected = _local_result(composed_specs())
    for client in (_AsyncClient(), _AsyncOnlyClient()):
        result = asyncio.run(in_async_code(client))
        assert isinstance(result.output, ForwardBackwardOutput)
        assert result.loss == pytest.approx(expected.loss, rel=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(result.grads, expected.grads))


@needs_compose
def test_in_async_code_a_client_with_both_methods_gets_the_request_at_the_call() -> None:
    """The sync method submits at once, so a request made right after (an optim_step) is queued after it;
    an `*_async` coroutine would only start when the loop next runs, after that request."""

    class Both(_FakeTinkerClient):
        async def forward_backward_custom_async(self, data: Any, loss_fn: Any) -> Any:
            raise AssertionError("not used: it would reorder the requests")

    client = Both()

    async def run() -> float:
        future = regrad.forward_backward_custom(client, data_from_texts(TEXTS), regularizers=composed_specs())
        assert len(client.requests) == 1
        return (await future).loss

    assert asyncio.run(run()) == pytest.approx(_local_result(composed_specs()).loss, rel=1e-6)


@needs_compose
def test_result_inside_the_event_loop_an_async_request_needs_is_refused_not_a_hang() -> None:
    expected = _local_result(composed_specs())

    async def run() -> regrad.CustomLossResult:
        future = regrad.forward_backward_custom(_AsyncOnlyClient(), data_from_texts(TEXTS), regularizers=composed_specs())
        with pytest.raises(RuntimeError, match="inside the event loop this request runs on.*await"):
            future.result(timeout=5)  # it waits for this loop, which result() would block
        return await future  # the request was left alone: awaiting it gives its result

    assert asyncio.run(run()).loss == pytest.approx(expected.loss, rel=1e-6)


def test_async_twins_give_the_request_future_as_tinker_does(tmp_path: Any) -> None:
    """`await client.X_async(...)` submits X and gives its future; the results match the sync calls'."""
    data = data_from_texts(TEXTS)
    adam = regrad.AdamParams(learning_rate=1e-2)
    sync, twin = small_client(), small_client()
    expected = [
        sync.forward(data).result().metrics,
        sync.forward_backward(data).result().metrics,
        sync.forward_backward_custom(data, nonlinear_loss).result().metrics,
        sync.optim_step(adam).result().metrics,
    ]

    async def run() -> List[Any]:
        futures = [
            await twin.forward_async(data),
            await twin.forward_backward_async(data),
            await twin.forward_backward_custom_async(data, nonlinear_loss),
            await twin.optim_step_async(adam),
        ]
        assert all(isinstance(f, RequestFuture) for f in futures)
        return [(await f).metrics for f in futures]

    assert asyncio.run(run()) == expected
    assert all(torch.equal(a, b) for a, b in zip(sync.model.parameters(), twin.model.parameters()))

    async def round_trip() -> str:
        saved = await (await twin.save_state_async(tmp_path / "state.pt"))
        twin.optim_step(adam)  # no gradients: only the step count moves (to 2), and load_state restores 1
        return await (await twin.load_state_async(saved))

    assert asyncio.run(round_trip()) == str(tmp_path / "state.pt")
    assert twin.step == 1
    assert all(torch.equal(a, b) for a, b in zip(sync.model.parameters(), twin.model.parameters()))


def test_timed_out_result_async_does_not_cancel_a_queued_request():
    worker = ThreadPoolExecutor(1)  # as LocalTrainingClient's request worker
    release = threading.Event()
    try:
        worker.submit(release.wait, 10)  # keeps the worker busy
        queued = RequestFuture(worker.submit(lambda: "done"))

        async def impatient():
            with pytest.raises(asyncio.TimeoutError):
                await queued.result_async(timeout=0.01)

        asyncio.run(impatient())
        release.set()
        assert queued.result(timeout=10) == "done"
    finally:
        release.set()
        worker.shutdown()


def test_timed_out_wait_does_not_cancel_an_async_request():
    async def main():
        loop = asyncio.get_running_loop()

        async def request():
            await asyncio.sleep(0.1)
            return "done"

        fut = RequestFuture(asyncio.run_coroutine_threadsafe(request(), loop), loop)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fut, 0.01)
        return await fut

    assert asyncio.run(main()) == "done"
