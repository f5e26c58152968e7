"""float16 / bfloat16 log-probs in compose and the kernels: computed in float32 as numerical_grad does
(each test failed before: compose and the kernels refused them with "expected float32 or float64")."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import regrad  # noqa: E402
from regrad import RegularizerError, RegularizerSpec, kernels  # noqa: E402
from regrad.errors import InputError, NonFiniteError  # noqa: E402

NARROW = [torch.float16, torch.bfloat16]
LENGTHS = (7, 3, 12)


def narrow_batch(dtype, width=None, seed=0):
    """Log-probs in (-4, -0.01), exactly representable in dtype (drawn in float64, rounded to dtype)."""
    gen = np.random.default_rng(seed)
    shape = (lambda n: (n,)) if width is None else (lambda n: (n, width))
    return [torch.from_numpy(-gen.uniform(0.01, 4.0, shape(n))).to(dtype) for n in LENGTHS]


def cubic(data, lps):
    return sum((x**3).sum() for x in lps), {"n": len(lps)}


def cubic_numpy(data, lps):
    return float(sum((np.asarray(x, np.float64) ** 3).sum() for x in lps))


async def cubic_async(data, lps):
    await asyncio.sleep(0)
    return sum((x**3).sum() for x in lps)


def every_route():
    return [
        regrad.l1(0.1), regrad.l2(0.2), regrad.l2(0.3, name="norm", squared=False), regrad.entropy(0.05),
        RegularizerSpec.sync("autograd", 0.5, cubic, grad="autograd"),
        RegularizerSpec.sync("numerical", 0.25, cubic_numpy, grad="numerical"),
        RegularizerSpec.with_grad("user", 0.125, cubic, lambda d, lps: [3 * x**2 for x in lps]),
        RegularizerSpec.async_("async", 0.5, cubic_async, timeout=None),
    ]


@pytest.mark.parametrize("width", [None, 4])
@pytest.mark.parametrize("dtype", NARROW)
def test_compose_on_narrow_log_probs_is_compose_on_their_float32_values(dtype, width):
    lps = narrow_batch(dtype, width)
    wide = [x.float() for x in lps]  # the same values, exactly
    data = [None] * len(lps)
    loss_fn = regrad.compose(None, every_route())
    ref_total, ref_grads, ref_out = loss_fn.evaluate(data, wide)

    total, grads, out = loss_fn.evaluate(data, lps)
    assert total == ref_total and out.to_dict().keys() == ref_out.to_dict().keys()
    assert [g.dtype for g in grads] == [dtype] * len(lps)
    for g, ref in zip(grads, ref_grads):
        assert torch.equal(g, ref.to(dtype))
    assert isinstance(out.loss_total, float) and out.regularizers["l1"].value == ref_out.regularizers["l1"].value

    leaves = [x.clone().requires_grad_(True) for x in lps]
    loss, metrics = loss_fn(data, leaves)
    assert loss.dtype == torch.float32 and loss.item() == np.float32(ref_total)
    assert metrics["loss_total"] == ref_total
    (loss * 3.0).backward()
    for x, ref in zip(leaves, ref_grads):
        assert x.grad.dtype == dtype
        assert torch.equal(x.grad, (ref * 3.0).to(dtype))  # one rounding: the float32 product, cast


@pytest.mark.parametrize("dtype", NARROW)
def test_user_terms_receive_float32_copies(dtype):
    seen = []

    def spy(data, lps):
        seen.append({x.dtype for x in lps})
        return sum((x**3).sum() for x in lps)

    async def spy_async(data, lps):
        return spy(data, lps)

    def spy_grad(data, lps):
        seen.append({x.dtype for x in lps})
        return [3 * x**2 for x in lps]

    specs = [RegularizerSpec.sync("auto", 1.0, spy), RegularizerSpec.sync("num", 1.0, spy, grad="numerical"),
             RegularizerSpec.with_grad("user", 1.0, spy, spy_grad), RegularizerSpec.async_("a", 1.0, spy_async)]
    lps = [x.requires_grad_(True) for x in narrow_batch(dtype)]
    regrad.compose(None, specs)([None] * 3, lps)
    assert seen and all(s == {torch.float32} for s in seen)
    assert all(x.grad is None for x in lps)  # the terms never touched the caller's tensors


def test_a_change_in_place_to_the_float32_copies_still_fails_the_term():
    def sorts(data, lps):
        lps[0].detach().numpy().sort()
        return 0.0

    with pytest.raises(RegularizerError, match="changed in place"):
        regrad.compose(None, [RegularizerSpec.sync("s", 1.0, sorts, grad="numerical")])(
            [None] * 3, narrow_batch(torch.bfloat16))


def test_narrow_numpy_log_probs_come_back_in_their_dtype():
    x = [np.array([-1.5, -0.25, -3.0], np.float16), np.array([-0.5, -2.0], np.float16)]
    total, grads, _ = regrad.compose(None, [regrad.l2(1.0, reduction="sum")]).evaluate([0, 1], x)
    assert total == 1.5**2 + 0.25**2 + 9 + 0.25 + 4
    assert [g.dtype for g in grads] == [np.float16, np.float16]
    np.testing.assert_array_equal(grads[0], 2 * x[0])


def test_ml_dtypes_bfloat16_arrays_are_widened_like_numerical_grad():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = [np.array([-1.5, -0.25, 0.0], ml_dtypes.bfloat16)]
    result = kernels.l1(x, reduction="sum")
    assert result.value == 1.75 and result.per_datum.dtype == np.float32
    assert result.grads[0].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(result.grads[0].astype(np.float32), [-1.0, -1.0, 0.0])
    _, grads, _ = regrad.compose(None, [regrad.l1(1.0, reduction="sum")]).evaluate([0], x)
    assert grads[0].dtype == ml_dtypes.bfloat16


def _formula(kind, x):
    """(per-datum value, gradient) in float64 from the definitions in docs/kernels.md."""
    x = x.astype(np.float64)
    if kind == "l1":
        return np.abs(x).sum(), np.sign(x)
    if kind == "l2":
        return (x * x).sum(), 2 * x
    if kind == "l2_norm":
        norm = np.sqrt((x * x).sum())
        return norm, x / norm
    return -(np.exp(x) * x).sum(), -np.exp(x) * (1 + x)


@pytest.mark.parametrize("kind", kernels.KERNELS)
@pytest.mark.parametrize("dtype", NARROW)
def test_kernels_on_narrow_input_match_the_formulas(kind, dtype):
    lps = [x.requires_grad_(True) for x in narrow_batch(dtype, width=3)]
    result = kernels.regularizer(kind, lps)  # reduction="mean" over B = 3
    values = [_formula(kind, x.detach().double().numpy()) for x in lps]
    assert result.value.dtype == torch.float32 and result.per_datum.dtype == torch.float32
    np.testing.assert_allclose(result.per_datum.numpy(), [v for v, _ in values], rtol=1e-6)
    np.testing.assert_allclose(result.value.item(), sum(v for v, _ in values) / 3, rtol=1e-6)
    result.value.backward()
    for x, g, (_, ref) in zip(lps, result.grads, values):
        assert g.dtype == dtype and x.grad.dtype == dtype
        torch.testing.assert_close(g.double(), torch.from_numpy(ref / 3).to(dtype).double(), rtol=1e-2, atol=0)
        assert torch.equal(x.grad, g)  # grad_output 1: the same cast of the same float32 gradient


def test_float16_kernel_numpy_result():
    x = [np.array([-1.5, -2.0], np.float16), np.array([-0.5], np.float16)]
    result = kernels.l2(x)
    assert result.value == (1.5**2 + 4 + 0.25) / 2
    assert result.per_datum.dtype == np.float32 and result.per_datum.tolist() == [6.25, 0.25]
    assert [g.dtype for g in result.grads] == [np.float16, np.float16]
    assert result.grads[0].tolist() == [-1.5, -2.0] and result.grads[1].tolist() == [-0.5]


def test_a_float16_value_beyond_65504_is_returned_in_float32():
    x = [np.full(1000, -70.0, np.float16)]  # Σ|x| = 70,000 > float16's max
    assert kernels.l1(x, reduction="sum").value == 70000.0


def test_a_gradient_beyond_float16_is_named_not_inf():
    x = [np.array([-1.0], np.float16), np.array([-1.0, -4.0e4], np.float16)]
    with pytest.raises(NonFiniteError, match=r"datum 1, element 1 is -80000.0, beyond the range .* float16") as err:
        kernels.l2(x, reduction="sum")
    assert (err.value.datum, err.value.position) == (1, 1)
    loss_fn = regrad.compose(None, [regrad.l2(1.0, reduction="sum")])
    with pytest.raises(NonFiniteError, match=r"datum 1, element 1 is -80000.0"):
        loss_fn.evaluate([0, 1], x)
    assert loss_fn.last_output is None


@pytest.mark.parametrize(
    "lps, match",
    [
        ([torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)],
         r"logprobs_list\[1\] has dtype float32 but logprobs_list\[0\] has bfloat16; use one dtype"),
        ([torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.bfloat16)],
         r"logprobs_list\[1\] has dtype bfloat16 but logprobs_list\[0\] has float16"),
        ([torch.zeros(2, dtype=torch.int64)],
         r"logprobs_list\[0\] has dtype torch.int64; expected float32 or float64 \(cast it first\)"),
        ([torch.zeros(2, dtype=torch.complex64)],
         r"logprobs_list\[0\] has dtype torch.complex64; expected float32 or float64 \(cast it first\)"),
        ([np.zeros(2, np.int32)], r"logprobs_list\[0\] has dtype int32; expected float32 or float64 \(cast it first\)"),
        ([np.zeros(2, np.complex128)], r"logprobs_list\[0\] has dtype complex128; expected float32 or float64"),
    ],
)
def test_mixed_and_unsupported_dtypes_are_named(lps, match):
    with pytest.raises(InputError, match=match):
        kernels.l1(lps)
    with pytest.raises(InputError, match=match):
        regrad.compose(None, [regrad.l1(1.0)])([None] * len(lps), lps)


def test_a_bf16_model_trains_through_compose():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 6).to(torch.bfloat16)
    inputs = torch.randn(5, 4).to(torch.bfloat16)
    targets = torch.tensor([0, 3, 5, 1, 2])
    lps = [torch.log_softmax(model(inputs), -1).gather(-1, targets[:, None]).reshape(-1)]
    assert lps[0].dtype == torch.bfloat16
    loss_fn = regrad.compose(regrad.losses.cross_entropy, [regrad.entropy(0.1)])
    data = [regrad.Datum(list(range(5)), {"target_tokens": targets.numpy()})]
    _, ref_grads, _ = loss_fn.evaluate(data, [lps[0].detach().float()])
    loss, _ = loss_fn(data, lps)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lps = [torch.log_softmax(model(inputs), -1).gather(-1, targets[:, None]).reshape(-1)]
    lps[0].backward(ref_grads[0].to(torch.bfloat16))
    for p, e in zip(model.parameters(), expected):
        assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, e)
