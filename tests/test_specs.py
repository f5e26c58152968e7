"""RegularizerSpec construction and validation, built-in kernel specs, and the dict form."""

from __future__ import annotations

import math

import numpy as np
import pytest

import regrad
from regrad import RegularizerSpec
from regrad.specs import KernelRegularizer, as_specs


def reg(data, logprobs_list):
    return 0.0, {}


async def async_reg(data, logprobs_list):
    return 0.0, {}


def grad_of_reg(data, logprobs_list):
    return [np.zeros_like(x) for x in logprobs_list]


def test_sync_spec_fields():
    spec = RegularizerSpec.sync("topology", 0.1, reg)
    assert (spec.name, spec.weight, spec.fn, spec.is_async, spec.grad) == ("topology", 0.1, reg, False, "auto")
    assert spec.timeout is None and spec.grad_fn is None and dict(spec.numerical_options) == {}


def test_sync_spec_passes_numerical_options():
    spec = RegularizerSpec.sync("r", 1, reg, grad="numerical", method="richardson", step=1e-4, structure="datum")
    assert dict(spec.numerical_options) == {"method": "richardson", "step": 1e-4, "structure": "datum"}
    assert isinstance(spec.weight, float)


def test_async_spec_fields():
    spec = RegularizerSpec.async_("kb", 0.05, async_reg, timeout=2.5)
    assert spec.is_async and spec.timeout == 2.5 and spec.grad == "auto"
    assert RegularizerSpec.async_("kb", 0.05, async_reg).timeout == 30.0
    assert RegularizerSpec.async_("kb", 0.05, async_reg, timeout=None).timeout is None


def test_with_grad_spec_uses_user_route():
    spec = RegularizerSpec.with_grad("mine", 0.2, reg, grad_of_reg)
    assert spec.grad == "user" and spec.grad_fn is grad_of_reg and not spec.is_async
    assert RegularizerSpec.with_grad("mine", 0.2, async_reg, grad_of_reg).is_async


def test_from_dict_seed_form_and_async_detection():
    spec = RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "topology"})
    assert spec == RegularizerSpec.sync("topology", 0.1, reg)
    aspec = RegularizerSpec.from_dict({"fn": async_reg, "weight": 0.05, "name": "kb", "timeout": 3})
    assert aspec.is_async and aspec.timeout == 3
    uspec = RegularizerSpec.from_dict({"fn": reg, "weight": 1, "name": "u", "grad_fn": grad_of_reg})
    assert uspec.grad == "user"
    nspec = RegularizerSpec.from_dict({"fn": reg, "weight": 1, "name": "n", "grad": "spsa", "numerical_options": {"num_samples": 8}})
    assert nspec.grad == "spsa" and dict(nspec.numerical_options) == {"num_samples": 8}


def test_objects_with_async_call_are_async():
    class Remote:
        async def __call__(self, data, logprobs_list):
            return 0.0, {}

    class Local:
        def __call__(self, data, logprobs_list):
            return 0.0, {}

    assert RegularizerSpec.from_dict({"fn": Remote(), "weight": 1, "name": "r"}).is_async
    assert RegularizerSpec.async_("r", 1, Remote()).is_async
    assert not RegularizerSpec.from_dict({"fn": Local(), "weight": 1, "name": "l"}).is_async
    with pytest.raises(TypeError, match=r"'r'.*async def.*async_"):
        RegularizerSpec.sync("r", 1, Remote())
    with pytest.raises(TypeError, match=r"'l'.*needs an `async def` fn"):
        RegularizerSpec.async_("l", 1, Local())


def test_plain_dicts_and_specs_mix():
    specs = as_specs([{"fn": reg, "weight": 0.1, "name": "a"}, regrad.l1(0.01, name="b")])
    assert [s.name for s in specs] == ["a", "b"]


@pytest.mark.parametrize(
    ("factory", "kind", "metrics"),
    [
        (regrad.l1, "l1", {"l1_total", "l1_mean", "l1_norm"}),
        (regrad.l2, "l2", {"l2_total", "l2_mean"}),
        (regrad.entropy, "entropy", {"entropy_total", "entropy_mean"}),
    ],
)
def test_builtin_specs_run_the_kernel(factory, kind, metrics):
    spec = factory(0.5)
    assert spec.name == kind and spec.weight == 0.5 and isinstance(spec.fn, KernelRegularizer)
    lps = [-np.linspace(0.1, 2.0, 5), -np.linspace(0.5, 1.5, 3)]
    value, custom = spec.fn(None, lps)
    expected = regrad.kernels.regularizer(kind, lps)
    assert value == pytest.approx(expected.value)
    assert set(custom) == metrics
    assert custom[f"{kind}_total"] == pytest.approx(float(np.sum(expected.per_datum)))
    assert custom[f"{kind}_mean"] == pytest.approx(float(np.mean(expected.per_datum)))
    v2, packed, custom2 = spec.fn.value_and_grad(None, lps)
    assert v2 == pytest.approx(value) and custom2 == pytest.approx(custom)
    np.testing.assert_allclose(packed, np.concatenate(expected.grads))


def test_builtin_options():
    assert regrad.l1(1.0, name="sparsity").name == "sparsity"
    assert regrad.l2(1.0, squared=False).fn.kind == "l2_norm"
    assert regrad.entropy(1.0, reduction="sum").fn.reduction == "sum"
    assert regrad.l1(1.0, grad="numerical", step=1e-3).grad == "numerical"
    data = [regrad.Datum([1, 2], {"weights": np.array([1.0, 0.0])})]
    value, _ = regrad.l1(1.0, mask="weights").fn(data, [np.array([-1.0, -5.0])])
    assert value == 1.0
    with pytest.raises(ValueError, match="reduction"):
        regrad.l1(1.0, reduction="max")


def test_builtin_fn_works_as_a_plain_tinker_loss():
    import torch

    lp = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    loss, metrics = regrad.l1(1.0).fn(None, [lp])
    loss.backward()
    assert loss.item() == pytest.approx(3.5) and metrics["l1_total"] == pytest.approx(3.5)
    assert lp.grad.tolist() == [-1.0, -1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Validation: every error names the spec


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_name_must_be_a_non_empty_string(name):
    with pytest.raises(ValueError, match="non-empty"):
        RegularizerSpec.sync(name, 0.1, reg)


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf, -math.inf, 10**400])
def test_weight_must_be_finite_and_non_negative(weight):
    with pytest.raises(ValueError, match=r"'topo'.*finite and >= 0"):
        RegularizerSpec.sync("topo", weight, reg)


@pytest.mark.parametrize("weight", [True, "0.1", None, [0.1]])
def test_weight_must_be_a_real_number(weight):
    with pytest.raises(TypeError, match=r"'topo'.*weight must be a real number"):
        RegularizerSpec.sync("topo", weight, reg)


def test_zero_weight_is_allowed():
    assert RegularizerSpec.sync("off", 0, reg).weight == 0.0
    assert math.copysign(1.0, RegularizerSpec.sync("off", -0.0, reg).weight) == 1.0  # no "weight": -0.0 in telemetry
    assert RegularizerSpec.sync("np", np.float32(0.5), reg).weight == 0.5


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match=r"'topo'.*fn must be callable"):
        RegularizerSpec.sync("topo", 0.1, "not a function")


@pytest.mark.parametrize(
    "fn",
    [lambda data: 0.0, lambda: 0.0, lambda data, lp, extra: 0.0, lambda *, data, logprobs_list: 0.0],
)
def test_fn_arity(fn):
    with pytest.raises(TypeError, match=r"'topo'.*cannot be called as fn\(data, logprobs_list\)"):
        RegularizerSpec.sync("topo", 0.1, fn)


def test_fn_arity_accepts_defaults_and_varargs():
    RegularizerSpec.sync("a", 0.1, lambda data, lp, extra=1: 0.0)
    RegularizerSpec.sync("b", 0.1, lambda *args: 0.0)


def test_grad_fn_arity():
    with pytest.raises(TypeError, match=r"'mine'.*grad_fn"):
        RegularizerSpec.with_grad("mine", 0.1, reg, lambda lp: lp)
    with pytest.raises(TypeError, match=r"'mine'.*grad_fn must be callable"):
        RegularizerSpec.with_grad("mine", 0.1, reg, None)


def test_async_flag_must_match_the_fn():
    with pytest.raises(TypeError, match=r"'kb'.*async def.*async_"):
        RegularizerSpec.sync("kb", 0.1, async_reg)
    with pytest.raises(TypeError, match=r"'kb'.*needs an `async def` fn"):
        RegularizerSpec.async_("kb", 0.1, reg)
    with pytest.raises(TypeError, match=r"'mine'.*async def` grad_fn"):

        async def agrad(data, lp):
            return lp

        RegularizerSpec.with_grad("mine", 0.1, reg, agrad)


def test_grad_route_validation():
    with pytest.raises(ValueError, match=r"'r'.*not a route"):
        RegularizerSpec.sync("r", 0.1, reg, grad="finite")
    with pytest.raises(ValueError, match=r"'r'.*grad='user' needs a grad_fn"):
        RegularizerSpec.sync("r", 0.1, reg, grad="user")
    with pytest.raises(ValueError, match=r"'r'.*grad_fn is used by grad='user' only"):
        RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "r", "grad": "autograd", "grad_fn": grad_of_reg})
    with pytest.raises(ValueError, match=r"'r'.*analytic"):
        RegularizerSpec.sync("r", 0.1, reg, grad="analytic")
    assert regrad.l1(0.1, grad="analytic").grad == "analytic"


def test_numerical_option_validation():
    with pytest.raises(ValueError, match=r"'r'.*unknown numerical options \['stepsize'\]"):
        RegularizerSpec.sync("r", 0.1, reg, stepsize=1e-3)
    with pytest.raises(ValueError, match=r"'r'.*numerical options apply"):
        RegularizerSpec.sync("r", 0.1, reg, grad="autograd", step=1e-3)
    with pytest.raises(ValueError, match=r"'r'.*drop method"):
        RegularizerSpec.sync("r", 0.1, reg, grad="spsa", method="central")


@pytest.mark.parametrize("timeout", [0, -1.0, "5", True])
def test_timeout_validation(timeout):
    with pytest.raises(ValueError, match=r"'kb'.*timeout"):
        RegularizerSpec.async_("kb", 0.1, async_reg, timeout=timeout)


def test_from_dict_validation():
    with pytest.raises(ValueError, match=r"'topo'.*missing \['fn'\]"):
        RegularizerSpec.from_dict({"weight": 0.1, "name": "topo"})
    with pytest.raises(ValueError, match=r"'<unnamed>'.*missing \['name'\]"):
        RegularizerSpec.from_dict({"fn": reg, "weight": 0.1})
    with pytest.raises(ValueError, match=r"'topo'.*unknown keys \['wieght'\]"):
        RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "topo", "wieght": 1})
    with pytest.raises(ValueError, match=r"'topo'.*'timeout' applies to async"):
        RegularizerSpec.from_dict({"fn": reg, "weight": 0.1, "name": "topo", "timeout": 1})
    with pytest.raises(TypeError, match="RegularizerSpec or a dict"):
        RegularizerSpec.from_dict([reg, 0.1, "topo"])
    with pytest.raises(ValueError, match=r"'topo'.*finite"):
        RegularizerSpec.from_dict({"fn": reg, "weight": -1, "name": "topo"})


def test_composition_validation():
    with pytest.raises(ValueError, match=r"'a' is used twice"):
        regrad.compose(None, [{"fn": reg, "weight": 0.1, "name": "a"}, regrad.l1(0.1, name="a")])
    with pytest.raises(TypeError, match="a list of RegularizerSpecs or dicts; got a single RegularizerSpec"):
        regrad.compose(None, regrad.l1(0.1))
    with pytest.raises(ValueError, match=r"'topo'.*finite"):
        regrad.compose(None, [{"fn": reg, "weight": math.nan, "name": "topo"}])
    with pytest.raises(ValueError, match=r"base loss 'ce'.*weight 1"):
        regrad.compose(RegularizerSpec.sync("ce", 0.5, regrad.losses.cross_entropy))
    with pytest.raises(TypeError, match="base_loss must be callable"):
        regrad.compose("cross_entropy")
    for workers in (0, "3", 2.5):  # a string passed here and failed with a raw TypeError at the first call
        with pytest.raises(ValueError, match="max_workers must be a positive int"):
            regrad.compose(None, [], max_workers=workers)
    assert regrad.compose(None, [], max_workers=np.int64(2)).max_workers == 2
    with pytest.raises(TypeError, match="on_event"):
        regrad.compose(None, [], on_event="log")


def test_specs_are_immutable():
    spec = regrad.l1(0.1)
    with pytest.raises(AttributeError):
        spec.weight = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("single", [regrad.l1(0.1), {"fn": lambda d, lp: 0.0, "weight": 1.0, "name": "x"}, "l1", 3])
def test_compose_names_a_single_regularizer_not_in_a_list(single):
    """A dict would otherwise be iterated as its keys ("fn", "weight", "name") and a number not at all."""
    with pytest.raises(TypeError, match=f"regularizers must be a list .* got a single {type(single).__name__}: wrap it"):
        regrad.compose(None, single)


def test_auto_with_a_grad_fn_takes_the_user_route():
    # DESIGN §5: "auto" picks a user grad_fn first; it was refused as "grad_fn is used by grad='user' only"
    def cube(data, logprobs_list):
        return float(sum(np.sum(x**3) for x in logprobs_list)), {}

    def cube_grad(data, logprobs_list):
        return [3 * x**2 for x in logprobs_list]

    spec = RegularizerSpec.from_dict({"fn": cube, "weight": 0.5, "name": "c", "grad": "auto", "grad_fn": cube_grad})
    assert spec.grad == "user" and RegularizerSpec("d", 0.5, cube, grad_fn=cube_grad).grad == "user"
    xs = [np.linspace(-2.0, -0.5, 4), np.array([-1.0, -3.0])]
    _, grads, out = regrad.compose(None, [spec]).evaluate([None, None], xs)
    for g, x in zip(grads, xs):
        np.testing.assert_allclose(g, 1.5 * x**2, rtol=0, atol=0)
    assert out.regularizers["c"].grad_method == "user"
