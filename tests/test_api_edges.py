"""Public-API edges found by a user-level audit: specs with array options compare by value, spec
option values are checked when the spec is built, kernels.l2(squared=) and numerical_grad(progress=)
take bools only, a batch mixing K is named, and a composed loss called without torch says what to
call instead."""

import sys

import numpy as np
import pytest
import torch

import regrad
from regrad import RegularizerSpec as S
from regrad.errors import InputError


def _f(data, lps):
    return float(sum(np.sum(np.asarray(lp)) for lp in lps))


@pytest.mark.parametrize("step", [np.full(3, 1e-3), [np.full(3, 1e-3)], torch.full((3,), 1e-3)])
def test_specs_with_array_options_compare_by_value(step):
    copy = [s.copy() for s in step] if isinstance(step, list) else step.clone() if hasattr(step, "clone") else step.copy()
    a = S.sync("a", 0.1, _f, grad="numerical", step=step)
    b = S.sync("a", 0.1, _f, grad="numerical", step=copy)
    c = S.sync("a", 0.1, _f, grad="numerical", step=np.full(3, 2e-3))
    d = S.sync("a", 0.1, _f, grad="numerical", step=np.full(4, 1e-3))  # another shape: unequal, not an error
    assert a == b and hash(a) == hash(b)
    assert a != c and a != d
    assert a in [b] and len({a, b, c}) == 2
    assert S.sync("a", 0.1, _f) == S.sync("a", 0.1, _f)
    assert S.sync("a", 0.1, _f) != S.sync("a", 0.2, _f)


def test_kernel_l2_refuses_non_bool_squared():
    x = [np.array([3.0, 4.0])]
    assert regrad.kernels.l2(x, squared=False).value == pytest.approx(5.0)
    assert regrad.kernels.l2(x, squared=np.bool_(True)).value == pytest.approx(25.0)
    with pytest.raises(TypeError, match="squared must be True or False"):
        regrad.kernels.l2(x, squared="False")


@pytest.mark.parametrize("opts, match", [
    ({"grad": "numerical", "method": "centrl"}, "method"),
    ({"grad": "numerical", "structure": "per_datum"}, "structure"),
    ({"grad": "numerical", "executor": 4}, "executor"),
    ({"grad": "spsa", "num_samples": 0}, "num_samples"),
    ({"grad": "spsa", "seed": -1}, "seed"),
    ({"grad": "numerical", "max_batch_bytes": 0}, "max_batch_bytes"),
    ({"grad": "spsa", "structure": "token"}, "token"),
    ({"grad": "numerical", "progress": "no"}, "progress"),
    ({"grad": "numerical", "vectorized": "no"}, "vectorized"),
])
def test_spec_numerical_option_values_are_checked_when_built(opts, match):
    with pytest.raises(ValueError, match=rf"regularizer 'reg'.*{match}"):
        S.sync("reg", 0.1, _f, **opts)


def test_good_numerical_options_still_build():
    S.sync("reg", 0.1, _f, grad="numerical", method="richardson", structure="datum", vectorized=True)
    S.sync("reg", 0.1, _f, grad="gaussian", num_samples=8, seed=3, sigma=0.1)
    S.from_dict({"fn": _f, "weight": 0.1, "name": "reg", "grad": "numerical",
                 "numerical_options": {"structure": "per_token", "progress": False}})


@pytest.mark.parametrize("progress", ["no", 1, 0.0])
def test_progress_must_be_a_bool_or_none(progress):
    with pytest.raises(InputError, match="progress must be True, False or None"):
        regrad.numerical_grad(_f, None, [np.zeros(3)], progress=progress)
    with pytest.raises(InputError, match="progress must be True, False or None"):
        regrad.numerical(_f, progress=progress)


@pytest.mark.parametrize("structure", ["batch", "datum", "token"])
@pytest.mark.parametrize("value", [None, "no", "yes", 0.0, [True]])
def test_vectorized_must_be_a_bool(structure, value):
    """vectorized="no" ran the vectorized route (fn got [P, T] blocks) by its truth value; with
    structure="token", None and strings raised a bare TypeError / ValueError from int()."""
    lps = [np.array([-0.5, -1.0])]
    fn = (lambda d, xs: [x ** 2 for x in xs]) if structure == "token" else (lambda d, x: 1.0)
    with pytest.raises(InputError, match="vectorized must be True or False"):
        regrad.numerical_grad(fn, [0] if structure == "datum" else None, lps, structure=structure, vectorized=value)
    if not value:  # (truthy values are refused by regrad.numerical for another reason: it wraps plain fns)
        with pytest.raises(InputError, match="vectorized must be True or False"):
            regrad.numerical(_f, vectorized=value)
    token = regrad.numerical_grad(lambda d, xs: [x ** 2 for x in xs], None, lps, structure="token",
                                  vectorized=np.bool_(True))
    np.testing.assert_allclose(token.grads[0], 2 * lps[0], rtol=1e-8)  # numpy's bool is still a bool


def test_client_batch_mixing_k_is_named_by_regrad_losses():
    """The client returns [T, 3] and [T, 5] log-probs (K may differ there); compose needs one K and says so."""
    client = regrad.LocalTrainingClient(seed=0)
    base = regrad.data_from_texts(["the cat sat on the mat", "gradients flow back"])

    def top(d, k):
        t = np.asarray(d.loss_fn_inputs["target_tokens"])
        return regrad.Datum(d.model_input, {"target_tokens": np.stack([(t + i) % 256 for i in range(k)], 1)})

    data = [top(base[0], 3), top(base[1], 5)]
    try:
        shapes = [tuple(o["logprobs"].shape) for o in client.forward(data, "cross_entropy").result().loss_fn_outputs]
        assert [s[1] for s in shapes] == [3, 5]
        calls = []

        def mass(data, lps):
            calls.append(1)
            return sum(lp.exp().sum() for lp in lps), {}

        future = regrad.forward_backward_custom(client, data, base_loss=None,
                                                regularizers=[{"fn": mass, "weight": 0.1, "name": "mass"}])
        with pytest.raises(InputError, match=r"logprobs_list\[1\] has shape \(\d+, 5\) but logprobs_list\[0\] has \(\d+, 3\)"):
            future.result()
        assert not calls
    finally:
        client.close()


def test_composed_loss_called_without_torch_says_to_use_evaluate(monkeypatch):
    calls = []

    def reg(data, lps):
        calls.append(1)
        return _f(data, lps)

    loss_fn = regrad.compose(None, [S.sync("reg", 1.0, reg, grad="numerical")])
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"use loss_fn.evaluate\(data, logprobs_list\)"):
        loss_fn([0], [np.zeros(3)])
    assert not calls  # refused before any term ran
    value, grads, _ = loss_fn.evaluate([0], [np.arange(3.0)])  # the numpy path still works
    assert value == pytest.approx(3.0)
    np.testing.assert_allclose(grads[0], np.ones(3), rtol=1e-6)


def test_public_names_are_the_api_and_its_modules():
    """dir(regrad) shows the API and its submodules, not the helpers its __init__ imports (os, Any, Dict)."""
    import types

    public = {name for name in dir(regrad) if not name.startswith("_")}
    modules = {name for name in public if isinstance(getattr(regrad, name), types.ModuleType)}
    assert public - modules == {name for name in regrad.__all__ if name != "__version__"} - modules
    assert all(getattr(regrad, name).__name__ == f"regrad.{name}" for name in modules)


def test_non_finite_error_about_no_single_element_has_datum_and_position_none():
    # a NaN loss that fn returned is not about one input element: .datum / .position read None (they raised
    # AttributeError), while the core's errors keep theirs
    with pytest.raises(regrad.NonFiniteError) as info:
        regrad.numerical_grad(lambda d, lps: float("nan"), None, [np.ones(3)])
    assert info.value.datum is None and info.value.position is None
    with pytest.raises(regrad.NonFiniteError) as info:
        regrad.kernels.l1([np.ones(2), np.array([1.0, np.nan])])
    assert (info.value.datum, info.value.position) == (1, 1)
