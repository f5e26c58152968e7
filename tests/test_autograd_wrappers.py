"""The autograd wrappers (kernels, compose's total, regrad.numerical): float16 gradients scaled by a
float32 grad_output, jvp by double backward, the autograd route under inference_mode, forward-mode AD
refused (from an audit; each test failed before its fix)."""

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402

import regrad  # noqa: E402
from regrad import kernels  # noqa: E402
from regrad.compose import compose  # noqa: E402


def _loss(data, lps):
    return sum((lp.float() ** 2).sum() for lp in lps)


@pytest.mark.parametrize("scale", [65536.0, 1e-8])
def test_numerical_float16_grad_output_is_not_rounded_to_float16_first(scale: float) -> None:
    wrapped = regrad.numerical(lambda data, lps: float(_loss(data, lps)))
    x0 = torch.tensor([-0.01, -0.02, -0.05, 0.0, -5.0], dtype=torch.float16)
    x = x0.clone().requires_grad_(True)
    loss = wrapped([None], [x])
    assert loss.dtype == torch.float32
    (loss * scale).backward()
    y = x0.clone().requires_grad_(True)
    (_loss([None], [y]) * scale).backward()
    assert x.grad.dtype == torch.float16
    # same non-finite entries as torch (65504 is float16's max: -5.0 * 2 * 65536 overflows there too)
    assert torch.equal(torch.isfinite(x.grad), torch.isfinite(y.grad))
    finite = torch.isfinite(y.grad)
    assert not torch.isnan(x.grad).any()
    torch.testing.assert_close(x.grad[finite].float(), y.grad[finite].float(), rtol=2e-2, atol=0.0)


def _jvp_cases():
    cube = regrad.RegularizerSpec.sync("cube", 1.0, lambda d, lps: sum((lp ** 3).sum() for lp in lps))
    composed = compose(None, [cube, regrad.l2(0.5)])
    numerical = regrad.numerical(lambda d, lps: float(sum((np.asarray(lp) ** 3).sum() for lp in lps)))
    return {
        "kernel": (lambda a, b: kernels.l2([a, b], reduction="sum").value,
                   lambda a, b: (a ** 2).sum() + (b ** 2).sum()),
        "compose": (lambda a, b: composed([None, None], [a, b])[0],
                    lambda a, b: (a ** 3).sum() + (b ** 3).sum() + 0.5 * ((a ** 2).sum() + (b ** 2).sum()) / 2),
        "compose_2d": (lambda a, b: composed([None, None], [a.view(2, 2), b.view(1, 2)])[0],
                       lambda a, b: (a ** 3).sum() + (b ** 3).sum() + 0.5 * ((a ** 2).sum() + (b ** 2).sum()) / 2),
        "numerical": (lambda a, b: numerical([None, None], [a, b]), lambda a, b: (a ** 3).sum() + (b ** 3).sum()),
    }


@pytest.mark.parametrize("name", ["kernel", "compose", "compose_2d", "numerical"])
def test_jvp_by_double_backward_is_the_first_derivative_not_zero(name: str) -> None:
    ours, ref = _jvp_cases()[name]
    a = torch.tensor([-0.5, -1.0, -2.0, -0.25], dtype=torch.float64)
    b = torch.tensor([-0.75, -1.5], dtype=torch.float64)
    va = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    vb = torch.tensor([0.25, -1.0], dtype=torch.float64)
    got = torch.autograd.functional.jvp(ours, (a, b), (va, vb), strict=True)[1]
    want = torch.autograd.functional.jvp(ref, (a, b), (va, vb))[1]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # first derivatives under create_graph=True keep their values; a second derivative still raises
    xs = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ys = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    g = torch.autograd.grad(ours(*xs) * -2.5, xs, create_graph=True)
    r = torch.autograd.grad(ref(*ys) * -2.5, ys)
    for gi, ri in zip(g, r):
        torch.testing.assert_close(gi.detach(), ri, rtol=1e-6, atol=1e-9)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(sum((gi ** 2).sum() for gi in g), xs)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.functional.hessian(lambda t: ours(t, b), a)


def _cube(d, lps):
    return sum((lp ** 3).sum() for lp in lps)


async def _acube(d, lps):
    await asyncio.sleep(0)
    return sum((lp ** 3).sum() for lp in lps)


@pytest.mark.parametrize("kind", ["auto", "autograd", "async"])
def test_autograd_route_survives_inference_mode(kind: str) -> None:
    if kind == "async":
        spec = regrad.RegularizerSpec.async_("cube", 1.0, _acube)
    else:
        spec = regrad.RegularizerSpec.sync("cube", 1.0, _cube, grad=kind)
    loss = compose(None, [spec])
    x = [torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64), torch.tensor([-0.25, -3.0], dtype=torch.float64)]
    with torch.inference_mode():
        value, grads, out = loss.evaluate([None, None], x)
    assert out.regularizers["cube"].grad_method == "autograd"
    assert value == pytest.approx(float(_cube(None, x)))
    for g, t in zip(grads, x):
        assert torch.equal(g, 3 * t ** 2)
    assert torch.is_inference_mode_enabled() is False


def _forward_cases():
    cube = regrad.RegularizerSpec.sync("cube", 1.0, lambda d, lps: sum((lp ** 3).sum() for lp in lps))
    composed = compose(None, [cube])
    numerical = regrad.numerical(lambda d, lps: float(sum((np.asarray(lp) ** 3).sum() for lp in lps)))
    return {
        "kernel": lambda t: kernels.l2([t], reduction="sum").value,
        "compose": lambda t: composed([None], [t])[0],
        "numerical": lambda t: numerical([None], [t]),
    }


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")  # torch's own vectorized jacobian
@pytest.mark.parametrize("name", ["kernel", "compose", "numerical"])
def test_forward_mode_ad_raises_instead_of_a_zero_tangent(name: str) -> None:
    f = _forward_cases()[name]
    x = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="forward-mode"):
        with fwAD.dual_level():
            f(fwAD.make_dual(x, torch.ones_like(x)))
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.autograd.functional.jacobian(f, x, strategy="forward-mode", vectorize=True)
    # reverse mode, and plain calls outside a dual level, are unchanged
    jac = torch.autograd.functional.jacobian(f, x)
    assert torch.isfinite(jac).all() and (jac != 0).all()
    with fwAD.dual_level():  # a dual level open but plain (tangent-free) inputs: fine
        assert torch.isfinite(f(x.clone()))


@pytest.mark.parametrize("name", ["kernel", "compose", "numerical", "numerical_grad"])
def test_torch_func_transforms_are_refused_by_name(name: str) -> None:
    """torch.func's tensors have no storage: regrad names the transform (it was "Cannot access data
    pointer of Tensor that doesn't have storage"); ordinary tensors inside a transform still work."""
    cases = {**_forward_cases(),
             "numerical_grad": lambda t: regrad.numerical_grad(lambda d, lps: float((lps[0] ** 3).sum()), None, [t]).nfev}
    f = cases[name]
    x = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(f)(x)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(f)(x[None].repeat(2, 1))
    # numpy inputs inside a transform are read as usual (its value is a constant to the transform)
    arrays = [x.numpy().copy()]
    value = {"kernel": lambda: kernels.l2(arrays, reduction="sum").value,
             "numerical_grad": lambda: regrad.numerical_grad(lambda d, lps: float((lps[0] ** 3).sum()), None, arrays).nfev,
             }.get(name)
    if value is not None:
        out = torch.func.grad(lambda a: a * float(value()))(torch.tensor(2.0, dtype=torch.float64))
        assert float(out) == pytest.approx(float(value()))


def test_numerical_wrapper_names_a_batch_backward_would_refuse_at_forward() -> None:
    """regrad.numerical checks the tensors that need a gradient as numerical_grad will in backward
    (here [T] beside [T, K]) when the loss is computed, before fn runs, instead of only in backward
    after the rest of the step; tensors that need no gradient are not differentiated, so they may differ."""
    calls = []

    def fn(data, lps):
        calls.append(len(lps))
        return sum((lp ** 2).sum() for lp in lps)

    wrapped = regrad.numerical(fn)
    a = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(regrad.InputError, match=r"logprobs_list\[1\] has shape \(3, 2\)"):
        wrapped(None, [a, b])
    assert calls == []  # named before fn ran
    c = b.detach()  # the same [3, 2] tensor, held fixed: fine, and only a is differentiated
    wrapped(None, [a, c]).backward()
    torch.testing.assert_close(a.grad, 2 * a.detach(), rtol=1e-6, atol=1e-8)
    d = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(regrad.InputError, match=r"datum 0 is logprobs_list\[0\], 1 is logprobs_list\[2\]"):
        wrapped(None, [a, c, d])  # a and d need gradients: named by their places in logprobs_list
    with torch.no_grad():  # no gradient needed: fn's own business
        assert float(wrapped(None, [a, b])) == pytest.approx(float((a ** 2).sum() + (b ** 2).sum()))
