"""Datum / ModelInput (Tinker's shape), the text readers, `cross_entropy` weights and the embedded ByteLM."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import regrad  # noqa: E402
from regrad.data import Datum, ModelInput, data_from_texts, input_tokens  # noqa: E402
from regrad.errors import InputError  # noqa: E402
from regrad.losses import cross_entropy  # noqa: E402
from regrad.model import ByteLM, ByteLMConfig, default_model  # noqa: E402


def _datum(weights: object, n: int = 3) -> Datum:
    return Datum(list(range(n)), {"target_tokens": np.arange(n), "weights": weights})


@pytest.mark.parametrize("torch_logprobs", [False, True])
@pytest.mark.parametrize("weights", [np.array(["1", "0", "1"]), np.array([1 + 5j, 1, 1]), np.array([1, None, 1], dtype=object)])
def test_cross_entropy_refuses_non_numeric_numpy_weights(weights: np.ndarray, torch_logprobs: bool) -> None:
    # numpy weights shaped like the log-probs skipped the dtype check: "1"/"0" strings were read as
    # numbers, complex weights lost their imaginary part, object arrays raised bare TypeErrors
    lp = np.array([-1.0, -2.0, -3.0])
    with pytest.raises(InputError, match=r"datum 0: loss_fn_inputs\['weights'\] must hold numbers"):
        cross_entropy([_datum(weights)], [torch.tensor(lp) if torch_logprobs else lp])


@pytest.mark.parametrize("scale", [1e-46, 1e39])
def test_cross_entropy_weights_outside_float32_range(scale: float) -> None:
    # float64 weights were cast to the float32 log-probs' dtype before normalizing: 1e-46 became 0
    # (numpy: value 0, torch: NaN) and 1e39 became inf (refused as a non-finite weight)
    w = np.array([1.0, 0.0, 3.0]) * scale
    lp = np.array([-0.5, -np.inf, -2.0], dtype=np.float32)
    expected = 0.25 * 0.5 + 0.75 * 2.0  # Σ w·(-lp) / Σ w, by hand
    value, metrics = cross_entropy([_datum(w)], [lp])
    assert value == pytest.approx(expected, rel=1e-6) and metrics["perplexity"] == pytest.approx(np.exp(expected))
    lp_t = torch.tensor(lp, requires_grad=True)
    loss, _ = cross_entropy([_datum(w)], [lp_t])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(lp_t.grad.numpy(), [-0.25, 0.0, -0.75], rtol=1e-6)
    value_c = regrad.compose(cross_entropy, []).evaluate([_datum(w)], [lp])[0]
    assert value_c == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_matches_a_float64_reference_over_ragged_data() -> None:
    rng = np.random.default_rng(1)
    lps = [-rng.random(5), -rng.random(2)]
    ws = [np.array([1.0, 0.0, 2.0, 0.5, 1.0]), [0.0, 3.0]]
    expected = -(np.dot(ws[0], lps[0]) + np.dot(ws[1], lps[1])) / (4.5 + 3.0)
    data = [_datum(ws[0], 5), _datum(ws[1], 2)]
    for arrays in (lps, [x.astype(np.float32) for x in lps]):
        assert cross_entropy(data, arrays)[0] == pytest.approx(expected, rel=1e-6)
        assert float(cross_entropy(data, [torch.tensor(x) for x in arrays])[0]) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_with_every_weight_zero_is_plus_zero_on_both_paths() -> None:
    # the torch path negated the weighted sum: all-zero weights gave -0.0 (numpy path: +0.0)
    lp = np.array([-1.0, -2.0, -3.0])
    value, _ = cross_entropy([_datum(np.zeros(3))], [lp])
    lp_t = torch.tensor(lp, requires_grad=True)
    loss, metrics = cross_entropy([_datum(np.zeros(3))], [lp_t])
    loss.backward()
    assert value == 0.0 and np.copysign(1.0, value) == 1.0
    assert loss.item() == 0.0 and np.copysign(1.0, loss.item()) == 1.0 and metrics["perplexity"] == 1.0
    np.testing.assert_array_equal(lp_t.grad.numpy(), np.zeros(3))


def test_data_from_texts_names_the_bad_text() -> None:
    with pytest.raises(InputError, match="list of texts, got a single str"):  # was: "text 't' is too short"
        data_from_texts("the cat sat")
    with pytest.raises(InputError, match="text 1 is a int, not a str"):  # was: AttributeError
        data_from_texts(["ok", 3])
    with pytest.raises(InputError, match="text 1 '' is too short"):
        data_from_texts(["ok", ""])
    (datum,) = data_from_texts(["héllo"])  # UTF-8 bytes, not characters
    raw = list("héllo".encode("utf-8"))
    assert input_tokens(datum) == raw[:-1] and datum.loss_fn_inputs["target_tokens"].tolist() == raw[1:]


def test_torch_tensor_token_ids_are_read_like_numpy_ones() -> None:
    # a torch int tensor was refused with "input token tensor(3) is not an integer id"
    ids = [3, 4, 250]
    assert input_tokens(Datum(torch.tensor(ids), {})) == ids
    assert ModelInput.from_ints(torch.tensor(ids)).to_ints() == ids == ModelInput.from_ints(np.array(ids)).to_ints()
    with pytest.raises(InputError, match="input token 1.5 is not an integer id"):
        ModelInput.from_ints(torch.tensor([1.5]))
    with pytest.raises(InputError, match="sequence of integer ids, got int"):
        ModelInput.from_ints(5)


def test_model_input_chunks_like_tinker() -> None:
    tinker_types = pytest.importorskip("tinker.types")
    ours, theirs = ModelInput.from_ints([1, 2, 3]), tinker_types.ModelInput.from_ints([1, 2, 3])
    assert [(c.tokens, c.type, c.length) for c in ours.chunks] == [(c.tokens, c.type, c.length) for c in theirs.chunks]
    assert ours.to_ints() == theirs.to_ints() and ours.length == theirs.length


def test_byte_lm_config_is_checked_and_round_trips() -> None:
    with pytest.raises(ValueError, match="n_heads must be an integer >= 1"):  # was: ZeroDivisionError
        ByteLMConfig(n_heads=0)
    with pytest.raises(ValueError, match="context must be an integer >= 1"):  # was: a torch error at forward
        ByteLM(ByteLMConfig(context=0))
    with pytest.raises(ValueError, match="mlp_ratio"):  # was: accepted, zero-width MLP
        ByteLMConfig(mlp_ratio=0)
    with pytest.raises(ValueError, match="not divisible"):
        ByteLMConfig(d_model=6, n_heads=4)
    cfg = ByteLMConfig(d_model=32, n_heads=2, context=16, n_layers=1)
    assert ByteLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="dropout"):
        ByteLMConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


def test_default_model_seed_is_an_integer_in_torch_range() -> None:
    with pytest.raises(ValueError, match="seed must be an integer"):  # was: silently the same as seed 1
        default_model(1.5)
    with pytest.raises(ValueError, match="seed must be an integer"):  # was: "Overflow when unpacking long long"
        default_model(2**64)
    a, b, c = default_model(7), default_model(7), default_model(8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_byte_lm_is_causal_and_takes_one_token() -> None:
    model = default_model(0, ByteLMConfig(d_model=32, n_heads=2, context=16))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        for t in range(15):
            x2 = x.clone()
            x2[:, t + 1 :] = (x2[:, t + 1 :] + 1) % 256  # change every later token
            torch.testing.assert_close(model(x2)[:, : t + 1], y[:, : t + 1])
        torch.testing.assert_close(model(x[:, :1]), y[:, :1])
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))
