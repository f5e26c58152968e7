"""Documented error paths that no test exercised (from a coverage audit of the non-slow suite). They pass on
the current code: each pins the behaviour the docs or the code's own messages promise, so a later change
cannot break it silently. The line numbers are the uncovered lines they reach."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad import InputError, NonFiniteError, NumericalError, RegularizerError, RegularizerSpec  # noqa: E402
from regrad.clients import AdamParams, LocalTrainingClient  # noqa: E402
from regrad.data import Datum, ModelInput, data_from_texts, datum_from_text, input_tokens, loss_input  # noqa: E402
from regrad.losses import cross_entropy  # noqa: E402
from regrad.model import ByteLM, ByteLMConfig, default_model  # noqa: E402

TINY = ByteLMConfig(d_model=16, n_layers=1, n_heads=2, context=16)


def _square(data, lps):
    return sum((lp ** 2).sum() for lp in lps)


def _base(data, lps):
    return -sum(lp.sum() for lp in lps)


def _leaves():
    return [torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([-0.5], dtype=torch.float64, requires_grad=True)]


def _datum(n=3, weights=None):
    inputs = {"target_tokens": np.arange(2, 2 + n)}
    if weights is not None:
        inputs["weights"] = weights
    return Datum(ModelInput.from_ints(list(range(1, 1 + n))), inputs)


# ---- losses.cross_entropy (losses.py 29, 36, 58, 136)


@pytest.mark.parametrize("as_torch", [False, True])
def test_cross_entropy_refuses_top_k_log_probs_naming_the_datum(as_torch):
    lps = [np.zeros((3, 2)), np.zeros((3, 2))]
    lps = [torch.tensor(x) for x in lps] if as_torch else lps
    with pytest.raises(InputError, match=r"cross_entropy takes \[T_i\] log-probs .*; datum 0 has shape \(3, 2\)"):
        cross_entropy([_datum(weights=[1.0, 1.0, 1.0]), _datum(weights=[1.0, 1.0, 1.0])], lps)


def test_cross_entropy_weights_shaped_unlike_the_log_probs_name_the_datum():
    # docs/clients.md: "weights shaped unlike target_tokens" is an InputError naming the datum
    with pytest.raises(InputError, match=r"datum 1 has weights of shape \(2,\) but log-probs of shape \(3,\)"):
        cross_entropy([_datum(), _datum(weights=[1.0, 1.0])], [np.zeros(3), np.zeros(3)])


@pytest.mark.parametrize("as_torch", [False, True])
def test_cross_entropy_of_an_empty_batch_is_zero_with_perplexity_one(as_torch):
    loss, metrics = cross_entropy([], [])
    assert float(loss) == 0.0 and metrics == {"perplexity": 1.0}


# ---- RegularizerSpec (specs.py 157, 250)


def test_spec_built_directly_with_a_timeout_for_a_sync_fn_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"regularizer 'topo': timeout applies to async regularizers only"):
        RegularizerSpec("topo", 1.0, _square, timeout=5.0)


def test_spec_with_a_builtin_fn_that_has_no_signature_is_accepted():
    spec = RegularizerSpec.sync("m", 1.0, max)  # inspect.signature(max) raises: trusted, not refused
    assert spec.fn is max and spec.grad == "auto"


# ---- compose: what a term returns (grad.py 194, 280, 309, 321, 364, 481)


@pytest.mark.parametrize("fn, message", [
    (lambda d, lp: True, r"TypeError: returned a bool loss; expected a 0-d tensor or a float"),
    (lambda d, lp: (_square(d, lp), [1.0]), r"TypeError: returned metrics of type list; expected a dict of floats"),
    (lambda d, lp: (_square(d, lp), {"k": "1.5"}), r"TypeError: metric 'k' is a str, not a float"),
])
def test_compose_names_the_term_whose_return_value_is_not_a_loss(fn, message):
    loss_fn = regrad.compose(_base, [RegularizerSpec.sync("reg", 1.0, fn)])
    with pytest.raises(RegularizerError, match=rf"regularizer 'reg' failed: {message}") as info:
        loss_fn([None, None], _leaves())
    assert info.value.name == "reg" and loss_fn.last_output is None


def test_compose_packed_grad_fn_result_of_the_wrong_size_names_both_counts():
    spec = RegularizerSpec.with_grad("u", 1.0, _square, lambda d, lp: np.zeros(4))
    with pytest.raises(RegularizerError, match=r"'u' failed: InputError: packed gradient has 4 values; the batch has 3"):
        regrad.compose(_base, [spec])([None, None], _leaves())


def test_compose_token_structure_fn_returning_one_array_is_refused():
    spec = RegularizerSpec.sync("t", 1.0, lambda d, lp: np.zeros(3), grad="numerical", structure="token")
    with pytest.raises(RegularizerError, match=r"structure='token' expects a list of per-token loss arrays"):
        regrad.compose(_base, [spec])([None, None], _leaves())


def test_compose_autograd_term_that_ignores_a_datum_gives_it_a_zero_gradient():
    spec = RegularizerSpec.sync("first", 1.0, lambda d, lp: (lp[0] ** 2).sum(), grad="autograd")
    lps = _leaves()
    loss, _ = regrad.compose(lambda d, lp: lp[0].sum() * 0.0, [spec])([None, None], lps)
    loss.backward()
    assert lps[0].grad.tolist() == [-2.0, -4.0] and lps[1].grad.tolist() == [0.0]


# ---- numerical_grad options and the per-datum vectorized route (numerical.py 209, 220, 224; _evaluate.py 415, 763-766)


@pytest.mark.parametrize("step, message", [
    ([1e-4], r"step has 1 entries but the batch has 2 data"),
    ([np.full(2, 1e-4), np.full(2, 1e-4)], r"step\[1\] has shape \(2,\); datum 1 has \(1,\)"),
    (np.full(4, 1e-4), r"step has shape \(4,\); expected a scalar, one array per datum, or \[3\] packed"),
    (np.full((3, 1), 1e-4), r"step has shape \(3, 1\); expected a scalar"),
])
def test_per_element_step_of_the_wrong_layout_is_an_input_error_naming_it(step, message):
    # docs/numerical.md error table: bad options are an InputError naming the option
    with pytest.raises(InputError, match=message):
        regrad.numerical_grad(_square, None, [np.array([-1.0, -2.0]), np.array([-0.5])], step=step)


def test_a_0d_array_step_is_the_same_as_the_scalar():
    lps = [np.array([-1.0, -2.0]), np.array([-0.5])]
    a = regrad.numerical_grad(_square, None, lps, step=np.array(1e-4))
    b = regrad.numerical_grad(_square, None, lps, step=1e-4)
    assert all(np.array_equal(x, y) for x, y in zip(a.grads, b.grads))


def test_an_error_in_a_top_k_batch_names_token_and_column():
    lps = [np.array([[-1.0, -2.0], [-0.5, -0.25]]), np.array([[-0.3, -0.7]])]

    def fn(data, lp):
        if lp[1][0, 1] != -0.7:
            raise ValueError("hit")
        return float(sum(x.sum() for x in lp))

    with pytest.raises(NumericalError, match=r"perturbation 10 of 12: datum 1, token 0, column 1, step \+h"):
        regrad.numerical_grad(fn, None, lps)


def test_datum_vectorized_torch_fn_returning_nan_names_the_datum():
    lps = [torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64), torch.tensor([-0.3, -0.7], dtype=torch.float64)]

    def fn(datum, copies):
        losses = (copies ** 2).sum(-1)
        return losses + float("inf") if copies.shape[-1] == 2 else losses

    with pytest.raises(NonFiniteError, match=r"returned the non-finite loss inf for copy 0 of .*datum 1, token 0"):
        regrad.numerical_grad(fn, [None, None], lps, structure="datum", vectorized=True)


def test_datum_vectorized_fn_returning_integer_losses_still_runs():
    lps = [torch.tensor([-1.0, -2.0], dtype=torch.float64)]
    result = regrad.numerical_grad(lambda d, x: torch.zeros(x.shape[0], dtype=torch.int64), [None], lps,
                                   structure="datum", vectorized=True)
    assert result.grads[0].tolist() == [0.0, 0.0]  # counts are real numbers, read as float64


# ---- f0 for structure="token" given as lists (the per-datum checked path: _f0.py 99-111)


def test_token_f0_given_as_lists_saves_the_call_and_gives_the_same_gradient():
    lps = [np.array([-1.0, -2.0, -0.5]), np.array([-0.3, -0.7])]
    fn = lambda d, lp: [np.sin(x) * x for x in lp]  # noqa: E731
    plain = regrad.numerical_grad(fn, None, lps, structure="token", method="forward")
    given = regrad.numerical_grad(fn, None, lps, structure="token", method="forward",
                                  f0=[list(v) for v in fn(None, lps)])
    assert given.nfev == plain.nfev - 1
    assert all(np.array_equal(a, b) for a, b in zip(given.grads, plain.grads))


def test_token_f0_list_holding_nan_names_datum_and_element():
    lps = [np.array([-1.0, -2.0]), np.array([-0.3, -0.7])]
    with pytest.raises(NonFiniteError, match=r"f0\[1\] holds the non-finite loss nan at element 1 of datum 1"):
        regrad.numerical_grad(lambda d, lp: list(lp), None, lps, structure="token", method="forward",
                              f0=[[1.0, 2.0], [3.0, float("nan")]])


def test_token_f0_entry_that_is_not_numbers_names_the_datum():
    lps = [np.array([-1.0, -2.0]), np.array([-0.3, -0.7])]
    with pytest.raises(InputError, match=r"f0\[1\] must be datum 1's per-token losses, got str"):
        regrad.numerical_grad(lambda d, lp: list(lp), None, lps, structure="token", method="forward",
                              f0=[[1.0, 2.0], "ab"])


# ---- regrad.numerical (numerical.py 890, 898, 929-930, 1050-1054)


@pytest.mark.parametrize("options", [{"structure": "datum"}, {"structure": "per_token"}, {"vectorized": True}])
def test_numerical_wrapper_refuses_other_signatures(options):
    with pytest.raises(InputError, match=r"regrad.numerical wraps a plain fn\(data, logprobs_list\) -> loss"):
        regrad.numerical(_square, **options)


def test_numerical_wrapper_refuses_a_non_callable():
    with pytest.raises(InputError, match=r"fn must be callable, got int"):
        regrad.numerical(3)


@pytest.mark.parametrize("loss, named", [(None, "NoneType"), (torch.ones(2), r"Tensor of shape \(2,\)"), (1 + 2j, "complex")])
def test_numerical_wrapper_forward_refuses_a_loss_that_is_not_one_number(loss, named):
    with pytest.raises(NumericalError, match=rf"returned {named}; expected a scalar loss"):
        regrad.numerical(lambda d, lp: loss)(None, _leaves())


def test_numerical_wrapper_forward_takes_numbers():
    for loss, expected in ((1.5, 1.5), (np.float32(1.5), 1.5), (3, 3.0), (torch.tensor(1.5), 1.5)):
        assert float(regrad.numerical(lambda d, lp: loss)(None, _leaves()).detach()) == expected


def test_numerical_wrapper_non_finite_log_prob_datum_is_the_callers_index():
    # docs/numerical.md: errors number datums among the differentiated tensors and say which entry each is;
    # .datum is remapped to the caller's numbering
    fixed = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    moving = [torch.tensor([-0.5, -0.25], dtype=torch.float64, requires_grad=True),
              torch.tensor([-0.5, float("nan")], dtype=torch.float64, requires_grad=True)]
    loss = regrad.numerical(_square)(None, [fixed, *moving])
    with pytest.raises(NonFiniteError, match=r"datum 1, token 1 \[only .* 1 is logprobs_list\[2\]\]") as info:
        loss.backward()
    assert info.value.datum == 2 and info.value.position == 1


# ---- regrad.check (_check.py 75, 228)


def test_check_refuses_an_unknown_structure():
    with pytest.raises(InputError, match=r"structure must be one of .*, got 'tokens'"):
        regrad.check(_square, None, [np.array([-1.0])], structure="tokens")


def test_check_grad_fn_returning_a_ragged_gradient_names_grad_fn_and_datum():
    with pytest.raises(InputError, match=r"grad_fn .*: the gradient of datum 0 is not numeric"):
        regrad.check(_square, None, [np.array([-1.0, -2.0])], grad_fn=lambda d, lp: [[1.0, [2.0]]])


# ---- LocalTrainingClient (clients.py 95, 103, 276, 296, 308-309, 426, 540, 598, 665-666)


class _Frozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2), requires_grad=False)


class _Flat(torch.nn.Module):
    """Returns [B, T] instead of logits [B, T, V]."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return ids.float() + self.w


def test_client_model_checks():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got int"):
        LocalTrainingClient(3)
    with pytest.raises(ValueError, match=r"model has no trainable parameters"):
        LocalTrainingClient(_Frozen())


def test_client_model_returning_no_logits_is_an_input_error_naming_the_shape():
    with LocalTrainingClient(_Flat()) as client:
        future = client.forward(data_from_texts(["hello"]), "cross_entropy")
        with pytest.raises(InputError, match=r"the model returned \(1, 4\); expected logits \[1, 4, vocab\]"):
            future.result()


def test_client_data_checks_at_submission():
    with LocalTrainingClient(default_model(0, TINY)) as client:
        with pytest.raises(InputError, match=r"datum 1 has no input tokens"):
            client.forward([datum_from_text("hi"), Datum(ModelInput.from_ints([]), {"target_tokens": []})],
                           "cross_entropy")
        with pytest.raises(InputError, match=r"datum 0: target_tokens has shape \(2, 0\); K must be at least 1"):
            client.forward([Datum(ModelInput.from_ints([1, 2]), {"target_tokens": np.zeros((2, 0), np.int64)})],
                           "cross_entropy")
        with pytest.raises(ValueError, match=r"cross_entropy takes no loss_fn_config \(got \{'x': 1\}\)"):
            client.forward_backward(data_from_texts(["hello"]), "cross_entropy", {"x": 1})


@pytest.mark.parametrize("params", [AdamParams(beta1=1.0), {"beta2": 1.5}])
def test_client_adam_betas_must_be_below_one(params):
    with LocalTrainingClient(default_model(0, TINY)) as client:
        with pytest.raises(ValueError, match=r"AdamParams betas must be < 1"):
            client.optim_step(params)


def test_client_custom_loss_metric_that_is_not_a_number_names_the_loss_fn():
    def my_loss(data, lps):
        return sum(lp.sum() for lp in lps), {"m": None}

    with LocalTrainingClient(default_model(0, TINY)) as client:
        future = client.forward_backward_custom(data_from_texts(["hello"]), my_loss)
        with pytest.raises(InputError, match=r"loss_fn 'my_loss' returned a metric that is not a number"):
            future.result()


@pytest.mark.parametrize("value, why", [("1.5", "is a str"), (torch.ones(2), r"has shape \(2,\)")])
def test_client_custom_loss_metric_follows_composes_rule(value, why):
    # a string is not parsed ("1.5" passed as 1.5), a 2-element tensor is not one number: as compose's metrics
    def my_loss(data, lps):
        return sum(lp.sum() for lp in lps), {"m": value, "ok": torch.tensor(2.0), "flag": True}

    with LocalTrainingClient(default_model(0, TINY)) as client:
        with pytest.raises(InputError, match=rf"metric 'm' {why}"):
            client.forward_backward_custom(data_from_texts(["hello"]), my_loss).result()
        good = client.forward_backward_custom(data_from_texts(["hello"]), lambda d, lps: my_loss(d, lps)[:1] + (
            {"ok": torch.tensor(2.0), "flag": True},)).result()
        assert good.metrics["ok"] == 2.0 and good.metrics["flag"] == 1.0


def test_client_load_state_of_another_byte_lm_shape_is_refused_naming_both(tmp_path):
    path = os.path.join(tmp_path, "state.pt")
    with LocalTrainingClient(default_model(0, TINY)) as client:
        client.save_state(path).result()
    with LocalTrainingClient(ByteLM(ByteLMConfig(d_model=16, n_layers=1, n_heads=2, context=8))) as other:
        before = [p.detach().clone() for p in other.model.parameters()]
        with pytest.raises(InputError, match=r"holds a model with config .*'context': 16.*this client has .*'context': 8"):
            other.load_state(path).result()
        assert all(torch.equal(a, b) for a, b in zip(before, other.model.parameters()))  # nothing copied


# ---- data helpers (data.py 114, 134, 164)


def test_data_helpers_name_the_datum():
    with pytest.raises(InputError, match=r"datum 4 is a dict, not a Datum with loss_fn_inputs"):
        loss_input({"weights": [1.0]}, "weights", 4)
    with pytest.raises(InputError, match=r"datum 2 has no model_input"):
        input_tokens(object(), 2)
    with pytest.raises(InputError, match=r"weights have shape \(2,\) but the text gives 4 targets"):
        datum_from_text("hello", weights=[1.0, 1.0])


# ---- regrad.forward_backward_custom's future (_futures.py 99, 154): a timed-out wait leaves the request going


def test_composed_request_future_timeout_leaves_the_request_running():
    import concurrent.futures
    import threading

    release = threading.Event()

    def slow(data, lps):
        release.wait(30)
        return sum((lp ** 2).sum() for lp in lps)

    with LocalTrainingClient(default_model(0, TINY)) as client:
        future = regrad.forward_backward_custom(client, data_from_texts(["hello"]),
                                                regularizers=[RegularizerSpec.sync("slow", 0.1, slow)])
        with pytest.raises(concurrent.futures.TimeoutError):
            future.result(timeout=0.05)
        assert not future.done()
        release.set()
        result = future.result(timeout=60)  # the request went on: its own outcome, not the timeout
        assert np.isfinite(result.loss) and "slow" in result.telemetry.regularizers
        settled = future.future()  # made after the result: settled at once with the same value
        assert settled.done() and settled.result() is result


# ---- compose, parallel: an analytic term run in the calling thread fails while pooled terms run (compose.py 245-247)


def test_parallel_inline_analytic_term_failure_names_it_and_the_next_call_runs():
    def pooled(data, lps):
        return sum((lp ** 2).sum() for lp in lps)

    data = data_from_texts(["hello", "world!"])
    specs = [regrad.l1(0.1, mask="nope"), RegularizerSpec.sync("a", 0.1, pooled, grad="autograd"),
             RegularizerSpec.sync("b", 0.1, pooled, grad="autograd")]
    loss_fn = regrad.compose(cross_entropy, specs, parallel=True)
    leaves = [torch.full((4,), -1.0, dtype=torch.float64, requires_grad=True),
              torch.full((5,), -2.0, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(RegularizerError, match=r"regularizer 'l1' failed: InputError: datum 0 has no loss_fn_inputs\['nope'\]"):
        loss_fn(data, leaves)
    assert loss_fn.last_output is None
    specs[0] = regrad.l1(0.1)
    loss, _ = regrad.compose(cross_entropy, specs, parallel=True)(data, leaves)
    assert torch.isfinite(loss)
