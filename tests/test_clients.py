"""LocalTrainingClient and forward_backward_custom: Tinker's semantics, exactness, state, bad input."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch

import regrad
from regrad.clients import ForwardBackwardOutput, LocalTrainingClient
from regrad.data import Datum, ModelInput, data_from_texts, datum_from_text
from regrad.errors import InputError, NonFiniteError
from regrad.model import ByteLMConfig, default_model

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
        "float ids": ([Datum(ModelInput([104.9, 101.5]), {"target_tokens": np.array([3, 4])})], "datum 0: input token 104.9 is not an integer id"),  # type: ignore[list-item]
        "string input": ([good, Datum(ModelInput("hi"), {"target_tokens": np.array([3, 4])})], "datum 1: input token 'h' is not an integer id"),  # type: ignore[arg-type]
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
    class MasksByte0(torch.nn.Module):  # a model that forbids token id 0
        def __init__(self) -> None:
            super().__init__()
            self.body = default_model(0, SMALL)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            logits = self.body(ids)
            return torch.cat([torch.full_like(logits[..., :1], float("-inf")), logits[..., 1:]], -1)

    client = LocalTrainingClient(MasksByte0())
    plain = datum_from_text("the cat sat")
    ids, tgt = plain.model_input.to_ints(), np.asarray(plain.loss_fn_inputs["target_tokens"])
    padded = Datum(ModelInput(ids + [32]), {"target_tokens": np.append(tgt, 0), "weights": np.append(np.ones(len(tgt)), 0.0)})
    expected = client.forward([plain]).result().metrics["loss:sum"]
    assert client.forward([padded]).result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    assert client.forward_backward([padded]).result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(InputError, match="ModelInput.from_ints: input token 1.5 is not an integer id"):
        ModelInput.from_ints([1.5])


def test_optim_step_takes_adam_params_only_and_eps_above_zero() -> None:
    client = small_client()
    client.forward_backward(data_from_texts(TEXTS[:1])).result()
    for wrong in (3e-3, "fast", object()):  # silently running AdamW defaults would be wrong
        with pytest.raises(TypeError, match="optim_step takes AdamParams"):
            client.optim_step(wrong)
    with pytest.raises(ValueError, match="eps must be > 0"):  # eps = 0: 0 / 0 = NaN weights where grad is 0
        client.optim_step(regrad.AdamParams(eps=0.0))
    assert client.optim_step({"learning_rate": 1e-3}).result().metrics["optim/learning_rate"] == 1e-3


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
