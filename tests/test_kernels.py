"""The C++ regularizer kernels against numpy formulas and torch autograd."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import regrad
from regrad import kernels

from conftest import ragged

TOL = {np.float32: dict(rtol=2e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def reference(kind, arrays, mask=None, reduction="mean"):
    """numpy value, per-datum values and gradient of the batch value, in float64."""
    per, grads = [], []
    for i, a in enumerate(arrays):
        x = a.astype(np.float64)
        keep = np.ones(x.shape[0], bool) if mask is None else np.asarray(mask[i]) > 0
        keep = keep.reshape((-1,) + (1,) * (x.ndim - 1)) * np.ones_like(x, dtype=bool)
        xm = np.where(keep, x, 0.0)
        if kind == "l1":
            v, g = np.abs(xm).sum(), np.sign(xm)
        elif kind == "l2":
            v, g = (xm**2).sum(), 2 * xm
        elif kind == "l2_norm":
            v = np.sqrt((xm**2).sum())
            g = xm / v if v > 0 else np.zeros_like(xm)
        else:
            v, g = -(np.exp(xm) * xm)[keep].sum(), np.where(keep, -np.exp(xm) * (1 + xm), 0.0)
        per.append(v)
        grads.append(g)
    scale = 1.0 / len(arrays) if reduction == "mean" else 1.0
    return sum(per) * scale, np.array(per), [g * scale for g in grads]


KINDS = ["l1", "l2", "l2_norm", "entropy"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [None, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_numpy(rng, kind, dtype, width, reduction):
    arrays = ragged(rng, [5, 1, 300, 40000], dtype, width)
    res = kernels.regularizer(kind, arrays, reduction=reduction)
    v, per, grads = reference(kind, arrays, reduction=reduction)
    tol = TOL[dtype]
    assert isinstance(res.value, float)
    np.testing.assert_allclose(res.value, v, rtol=tol["rtol"] * 10)
    np.testing.assert_allclose(res.per_datum, per, rtol=tol["rtol"] * 10)
    assert res.per_datum.dtype == dtype
    for g, ref, a in zip(res.grads, grads, arrays):
        assert g.dtype == dtype and g.shape == a.shape
        np.testing.assert_allclose(g, ref, **tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_autograd(rng, kind, dtype):
    arrays = ragged(rng, [3, 17, 64], np.float64, width=5)
    ours = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]
    res = kernels.regularizer(kind, ours)
    res.value.backward()
    terms = {
        "l1": lambda x: x.abs().sum(),
        "l2": lambda x: (x * x).sum(),
        "l2_norm": lambda x: torch.linalg.vector_norm(x),
        "entropy": lambda x: -(x.exp() * x).sum(),
    }[kind]
    ref = torch.stack([terms(x) for x in theirs]).mean()
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert res.value.dtype == dtype and res.value.shape == ()
    torch.testing.assert_close(res.value, ref.detach(), **tol)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, **tol)
    assert all(isinstance(g, torch.Tensor) and g.dtype == dtype for g in res.grads)


def test_backward_scales_by_incoming_gradient(rng):
    x = torch.tensor(ragged(rng, [10], np.float64)[0], requires_grad=True)
    (3.0 * kernels.l1([x]).value).backward()
    torch.testing.assert_close(x.grad, 3.0 * torch.sign(x.detach()))


def test_generator_input_keeps_the_gradient(rng):
    arrays = ragged(rng, [5, 3], np.float64)
    xs = [torch.tensor(a, requires_grad=True) for a in arrays]
    ys = [torch.tensor(a, requires_grad=True) for a in arrays]
    kernels.l2(x * 1.0 for x in xs).value.backward()  # a generator of non-leaf tensors
    (sum((y * y).sum() for y in ys) / 2).backward()
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("kind", ["l1", "l2", "entropy"])
def test_second_derivatives_raise_instead_of_being_zero(kind):
    x = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
    f = lambda t: kernels.regularizer(kind, [t], reduction="sum").value  # noqa: E731
    with pytest.raises(RuntimeError, match="second derivatives .* are not available"):
        torch.autograd.functional.hessian(f, x)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)  # first order under create_graph: still right
    ref = x.detach().clone().requires_grad_(True)
    {"l1": lambda t: t.abs().sum(), "l2": lambda t: (t * t).sum(), "entropy": lambda t: -(t.exp() * t).sum()}[kind](ref).backward()
    torch.testing.assert_close(g.detach(), ref.grad)
    with pytest.raises(RuntimeError, match="second derivatives"):  # a gradient penalty
        (g**2).sum().backward()


def test_l1_sign_of_zero_is_zero():
    res = kernels.l1([np.array([0.0, -0.0, 2.0, -3.0])], reduction="sum")
    np.testing.assert_array_equal(res.grads[0], [0.0, 0.0, 1.0, -1.0])
    assert res.value == 5.0


def test_l2_norm_gradient_at_zero_is_zero():
    res = kernels.l2([np.zeros(4)], squared=False)
    assert res.value == 0.0
    np.testing.assert_array_equal(res.grads[0], np.zeros(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", [None, 3])
def test_mask_excludes_tokens(rng, kind, width):
    arrays = ragged(rng, [6, 9, 4], np.float64, width)
    mask = [rng.random(len(a)) > 0.4 for a in arrays]
    res = kernels.regularizer(kind, arrays, mask=mask)
    v, per, grads = reference(kind, arrays, mask=mask)
    np.testing.assert_allclose(res.value, v, rtol=1e-12)
    np.testing.assert_allclose(res.per_datum, per, rtol=1e-12)
    for g, ref, m in zip(res.grads, grads, mask):
        np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-15)
        assert np.all(g[~m] == 0)


def test_masked_non_finite_is_ignored():
    res = kernels.l1([np.array([1.0, np.nan, -2.0])], mask=[[1, 0, 1]], reduction="sum")
    assert res.value == 3.0


def test_tinker_weights_as_mask(rng):
    x = ragged(rng, [5], np.float64)
    w = [np.array([0.0, 0.5, 1.0, 0.0, 2.0])]
    res = kernels.l2(x, mask=w, reduction="sum")
    np.testing.assert_allclose(res.value, (x[0][w[0] > 0] ** 2).sum())


def test_empty_datum_and_empty_batch():
    res = kernels.entropy([np.zeros(0), np.array([-1.0, -2.0])])
    np.testing.assert_allclose(res.per_datum, [0.0, -(np.exp([-1.0, -2.0]) * [-1.0, -2.0]).sum()])
    assert res.grads[0].shape == (0,)
    assert kernels.l1([], reduction="sum").value == 0.0
    with pytest.raises(ValueError, match="empty batch"):
        kernels.l1([], reduction="mean")


def test_contiguous_inputs_not_copied_and_strided_inputs_copied(rng):
    base = rng.normal(size=(10, 4))
    strided = base[:, 1]
    res = kernels.l1([strided], reduction="sum")
    np.testing.assert_allclose(res.value, np.abs(strided).sum())
    from regrad._arrays import as_array_batch

    contiguous = rng.normal(size=20)
    assert np.shares_memory(as_array_batch([contiguous]).arrays[0], contiguous)
    t = torch.tensor(contiguous)
    assert np.shares_memory(as_array_batch([t]).arrays[0], t.numpy())


# entropy takes -inf (probability 0): test_entropy_takes_minus_inf_as_probability_zero
@pytest.mark.parametrize("kind, bad", [(k, b) for k in KINDS for b in (np.nan, np.inf, -np.inf)
                                       if not (k == "entropy" and b == -np.inf)])
def test_non_finite_input_names_datum_and_position(kind, bad):
    x = [np.zeros(3), np.zeros((40000,))]
    x[1][31234] = bad
    with pytest.raises(regrad.NonFiniteError, match="datum 1, token 31234") as info:
        kernels.regularizer(kind, x)
    assert info.value.datum == 1 and info.value.position == 31234


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_entropy_takes_minus_inf_as_probability_zero(rng, dtype):
    """0 log 0 = 0 (scipy.special.entr, torch Categorical.entropy): -inf adds 0 and gets gradient 0."""
    from scipy.special import entr

    rows = rng.normal(size=(30000, 5))  # [T, K] distributions with masked-out vocabulary entries
    rows[:, 1:][rng.random((30000, 4)) < 0.3] = -np.inf  # column 0 stays finite: every row is a distribution
    logp = (rows - np.logaddexp.reduce(rows, axis=1, keepdims=True)).astype(dtype)
    tokens = np.log(rng.random(70001)).astype(dtype)  # [T] over 64k elements: the parallel chunked pass
    tokens[::7] = -np.inf
    for x in ([logp], [tokens]):
        res = kernels.entropy(x, reduction="sum")
        p = np.exp(x[0].astype(np.float64))
        assert res.value == pytest.approx(entr(p).sum(), rel=TOL[dtype]["rtol"])
        expected = np.where(p > 0, -p * (1 + np.log(np.where(p > 0, p, 1.0))), 0.0)
        np.testing.assert_allclose(res.grads[0], expected, **TOL[dtype])
        assert np.all(res.grads[0][np.isneginf(x[0])] == 0)
    bad = tokens.copy()
    bad[40000] = np.nan  # after many -inf in its chunk: the NaN is the one named
    with pytest.raises(regrad.NonFiniteError, match="datum 0, token 40000"):
        kernels.entropy([bad])
    bad[40000] = np.inf
    with pytest.raises(regrad.NonFiniteError, match="datum 0, token 40000"):
        kernels.entropy([bad])


def test_non_finite_in_2d_names_token_and_column():
    x = [np.zeros((4, 3))]
    x[0][2, 1] = np.nan
    with pytest.raises(regrad.NonFiniteError, match="datum 0, token 2, column 1"):
        kernels.l1(x)


def test_overflowing_value_is_reported():
    with pytest.raises(regrad.NonFiniteError, match="datum 0.*not finite"):
        kernels.entropy([np.array([100.0], np.float32)])
    # a float32 value summed in float64 above FLT_MAX (whatever the SIMD lanes did) is not returned as inf
    for kind, x in (("l1", np.full(2, -3e38, np.float32)), ("l2", np.full(8, -1e19, np.float32))):
        with pytest.raises(regrad.NonFiniteError, match="datum 0 is not finite") as info:
            kernels.regularizer(kind, [torch.from_numpy(x)])
        assert info.value.datum == 0
    # each datum fits float32, their sum does not
    with pytest.raises(regrad.NonFiniteError, match="value of the batch"):
        kernels.l1([np.full(1, -3e38, np.float32)] * 2, reduction="sum")
    assert kernels.l1([np.full(1, -3e38, np.float64)] * 2, reduction="sum").value == 6e38  # fine in float64


def test_big_endian_masks_and_empty_batches():
    x = np.array([-1.0, -2.0, -3.0])
    assert kernels.l2([x.astype(">f8")]).value == kernels.l2([x]).value == 14.0  # read as native
    masks = {
        "mask=1": (1, "mask must be a list"),
        "strings": ([np.array(["a", "b", "c"])], r"mask\[0\] has dtype <U1; expected booleans or numbers"),
        "None entries": ([[1, None, 1]], r"mask\[0\] has dtype object"),
    }
    for mask, match in masks.values():
        with pytest.raises(regrad.InputError, match=match):
            kernels.l1([x], mask=mask)
    assert kernels.l1([x], mask=[torch.tensor([1, 0, 1], dtype=torch.bfloat16)], reduction="sum").value == 4.0
    with pytest.raises(regrad.InputError, match="empty batch"):
        kernels.l1([], reduction="mean")
    with pytest.raises(ValueError, match="regularizer 'sparsity': reduction must be"):
        regrad.l1(0.1, name="sparsity", reduction="none")


def test_tiny_float64_torch_mask_weights_keep_their_tokens():
    """> 0 keeps a token: a torch float64 weight of 1e-50 was read through float32 (0: dropped), a numpy
    one was not."""
    x = [np.array([1.0, 2.0, 3.0])]
    w = np.array([1e-50, 1.0, -1e-50])
    assert kernels.l1(x, mask=[w], reduction="sum").value == 3.0
    assert kernels.l1(x, mask=[torch.from_numpy(w)], reduction="sum").value == 3.0


@pytest.mark.parametrize(
    "arrays, match",
    [
        ([np.zeros(3, np.int64)], r"logprobs_list\[0\] has dtype int64"),
        ([np.zeros(3, np.float32), np.zeros(3)], r"logprobs_list\[1\] has dtype float64"),
        ([np.zeros((2, 3)), np.zeros((2, 4))], r"logprobs_list\[1\] has shape \(2, 4\)"),
        ([np.zeros(3), np.zeros((3, 1))], r"logprobs_list\[1\] has shape"),
        ([np.zeros((2, 2, 2))], r"expected \[T\] or \[T, K\]"),
        ([[1.0, 2.0]], r"logprobs_list\[0\] is a list"),
        ([np.zeros(2), torch.zeros(2, dtype=torch.float64)], "mixes numpy arrays and torch tensors"),
        ([torch.zeros(2, dtype=torch.int32)], r"dtype torch.int32; expected float32 or float64 \(cast it first\)"),
        ([torch.zeros(2, dtype=torch.complex64)], r"dtype torch.complex64; expected float32 or float64"),
        ([np.zeros((3, 0))], r"shape \(3, 0\); K \(log-probs per token\) must be at least 1"),
        ([torch.zeros((3, 0), dtype=torch.float64)], r"shape \(3, 0\); K"),
        ([torch.zeros(3, dtype=torch.float64).to_sparse()], r"sparse_coo tensor; pass a dense one"),
        ([np.ma.masked_array([1.0, 1e6], mask=[False, True])], "numpy masked array"),
    ],
)
def test_bad_input_gets_named_error(arrays, match):
    with pytest.raises(regrad.InputError, match=match):
        kernels.l1(arrays)


def test_bad_arguments():
    with pytest.raises(regrad.InputError, match="single array"):
        kernels.l1(np.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        kernels.l1([np.zeros(3)], reduction="max")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.regularizer("l3", [np.zeros(3)])
    with pytest.raises(regrad.InputError, match=r"mask\[1\] has shape \(2,\); datum 1 has 3 tokens"):
        kernels.l1([np.zeros(2), np.zeros(3)], mask=[[1, 1], [1, 1]])
    with pytest.raises(regrad.InputError, match="mask has 1 entries"):
        kernels.l1([np.zeros(2), np.zeros(3)], mask=[[1, 1]])


def test_core_rejects_inconsistent_input_directly():
    from regrad import _core

    with pytest.raises(TypeError, match="not a numpy array"):
        _core.regularizer("l1", [[1.0]])
    with pytest.raises(ValueError, match="not C-contiguous"):
        _core.regularizer("l1", [np.zeros((4, 4))[:, 0]])
    with pytest.raises(ValueError, match="mask has 2 entries but the batch has 3 tokens"):
        _core.regularizer("l1", [np.zeros(3)], np.ones(2, np.uint8))


_DETERMINISM_SCRIPT = """
import hashlib
import numpy as np, regrad
rng = np.random.default_rng(7)
x = [rng.normal(size=n).astype(np.float32) for n in (3, 200000, 150001, 77)]
out = []
for k in ("l1", "l2", "l2_norm", "entropy"):
    r = regrad.kernels.regularizer(k, x)
    out.append(np.float64(r.value).tobytes().hex() + r.per_datum.tobytes().hex()[:64])
    out.append(hashlib.sha256(np.concatenate(r.grads).tobytes()).hexdigest())
print(regrad.build_info()["max_threads"], "|".join(out))
"""


@pytest.mark.parametrize("simd", ["native", "baseline"])
def test_same_bits_for_any_thread_count(simd):
    results = {}
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, REGRAD_SIMD=simd)
        out = subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert out[0] == threads or not regrad.build_info()["openmp"]
        results[threads] = out[1]
    assert results["1"] == results["2"]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 50), min_size=1, max_size=6),
    width=st.sampled_from([None, 1, 4]),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31),
)
def test_random_ragged_batches(lengths, width, kind, dtype, seed):
    rng = np.random.default_rng(seed)
    arrays = ragged(rng, lengths, dtype, width, scale=3.0)
    res = kernels.regularizer(kind, arrays, reduction="sum")
    v, per, grads = reference(kind, arrays, reduction="sum")
    tol = TOL[dtype]
    np.testing.assert_allclose(res.per_datum, per, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    for g, ref in zip(res.grads, grads):
        np.testing.assert_allclose(g, ref, **tol)


_BASELINE_SCRIPT = """
import sys
import numpy as np, regrad
assert regrad.build_info()["simd"] == "baseline"
rng = np.random.default_rng(3)
out = {}
for dt in (np.float32, np.float64):
    x = [rng.normal(size=n).astype(dt) * 3 for n in (1, 13, 5000)]
    for k in ("l1", "l2", "entropy"):
        r = regrad.kernels.regularizer(k, x, mask=[np.ones(1), np.arange(13) % 2, np.ones(5000)])
        out[f"{k}_{dt.__name__}_value"] = np.array(r.value)
        out[f"{k}_{dt.__name__}_grad"] = np.concatenate(r.grads)
    x[2][::3] = -np.inf  # entropy: probability 0
    r = regrad.kernels.entropy(x)
    out[f"inf_{dt.__name__}_value"] = np.array(r.value)
    out[f"inf_{dt.__name__}_grad"] = np.concatenate(r.grads)
np.savez(sys.argv[1], **out)
"""


def test_baseline_loops_match_numpy(tmp_path):
    """The portable (non-AVX2) loops give the numpy reference too."""
    path = tmp_path / "baseline.npz"
    env = dict(os.environ, REGRAD_SIMD="baseline")
    run = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = np.load(path)
    rng = np.random.default_rng(3)
    mask = [np.ones(1), np.arange(13) % 2, np.ones(5000)]
    for dt in (np.float32, np.float64):
        x = [rng.normal(size=n).astype(dt) * 3 for n in (1, 13, 5000)]
        for k in ("l1", "l2", "entropy"):
            v, _, grads = reference(k, x, mask=mask)
            tol = TOL[dt]
            np.testing.assert_allclose(got[f"{k}_{dt.__name__}_value"], v, rtol=tol["rtol"] * 10)
            np.testing.assert_allclose(got[f"{k}_{dt.__name__}_grad"], np.concatenate(grads), **tol)
        x[2][::3] = -60.0  # exp underflows far below float32 resolution: the -inf entries' value and gradient, ~0
        v, _, grads = reference("entropy", x)
        g = np.concatenate(grads)
        g[1 + 13 :][::3] = 0.0
        np.testing.assert_allclose(got[f"inf_{dt.__name__}_value"], v, rtol=TOL[dt]["rtol"] * 10)
        np.testing.assert_allclose(got[f"inf_{dt.__name__}_grad"], g, **TOL[dt])


def test_build_info():
    info = regrad.build_info()
    assert set(info) >= {"version", "openmp", "max_threads", "cuda", "compiler", "simd"}
    assert info["version"] == regrad.__version__
    assert info["max_threads"] >= 1


def _hypot(values):
    """The exact-ish L2 norm of float64 values (math.hypot scales internally: no overflow or underflow)."""
    import math

    return math.hypot(*values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("magnitude", ["huge", "tiny", "denormal", "largest"])
def test_l2_norm_of_values_whose_squares_overflow_or_underflow(rng, dtype, magnitude):
    """The norm fits the dtype even where x² does not: it is computed as BLAS nrm2 would (was inf -> NonFiniteError,
    or 0 with a zero gradient)."""
    info = np.finfo(dtype)
    scale = {"huge": np.sqrt(info.max) * 4, "tiny": np.sqrt(info.tiny) / 64, "denormal": info.tiny * 2**-10,
             "largest": info.max / 16}[magnitude]
    arrays = [(rng.uniform(-1, 1, size=n) * scale).astype(dtype) for n in (5, 13, 40)]
    arrays[2][::4] = 0.0
    arrays.append(np.zeros(3, dtype))
    mask = [np.ones(5), np.arange(13) % 3 != 1, np.ones(40), np.ones(3)]
    res = kernels.l2(arrays, squared=False, mask=mask)
    keeps = [np.asarray(m) > 0 for m in mask]
    per = [_hypot(a.astype(np.float64)[k]) for a, k in zip(arrays, keeps)]
    np.testing.assert_allclose(res.per_datum.astype(np.float64), per, rtol=TOL[dtype]["rtol"])
    assert res.value == pytest.approx(sum(per) / len(per), rel=TOL[dtype]["rtol"])
    for g, a, k, v in zip(res.grads, arrays, keeps, per):
        expected = np.where(k, a.astype(np.float64) / v, 0.0) / len(arrays) if v > 0 else np.zeros(a.shape)
        np.testing.assert_allclose(g, expected, rtol=TOL[dtype]["rtol"], atol=1e-7)


@pytest.mark.parametrize("dtype, x", [(np.float32, 84.2773), (np.float64, 703.226)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_entropy_gradient_that_overflows_is_named(dtype, x, reduction):
    """-exp(x)(1 + x) beyond the dtype while the value -exp(x)·x still fits: named, not returned as -inf."""
    xl = np.longdouble(dtype(x))
    assert np.exp(xl) * xl < np.finfo(dtype).max < np.exp(xl) * (1 + xl)  # the reference: value fits, gradient not
    arrays = [np.full(3, -1.0, dtype), np.array([-2.0, -3.0, x, -4.0, -1.0], dtype)]
    with pytest.raises(regrad.NonFiniteError, match=r"gradient at datum 1, token 2 .* not finite") as info:
        kernels.entropy(arrays, reduction=reduction)
    assert (info.value.datum, info.value.position) == (1, 2)
    res = kernels.entropy(arrays, reduction=reduction, mask=[np.ones(3), [1, 1, 0, 0, 1]])  # masked: fine
    assert np.all(np.isfinite(np.concatenate(res.grads)))


def test_mean_of_float64_values_whose_sum_overflows():
    """Each datum and the mean fit float64 though their sum does not (was NonFiniteError 'value of the batch')."""
    arrays = [np.full(1, 1e308), np.full(1, 1.5e308), np.full(2, -2e307)]
    expected = float(np.mean([np.abs(a.astype(np.longdouble)).sum() for a in arrays]))
    assert kernels.l1(arrays).value == pytest.approx(expected, rel=1e-15)
    with pytest.raises(regrad.NonFiniteError, match="value of the batch .the sum over data"):
        kernels.l1(arrays, reduction="sum")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_unaligned_buffers_are_copied_not_misread(rng, dtype, kind):
    """np.frombuffer / torch.frombuffer at an odd offset give memory not aligned to the dtype: the Python layer copies
    it and the core refuses it by name (it read whole floats from it: undefined behaviour, flagged by UBSan)."""
    values = (rng.normal(size=13) * 2).astype(dtype)
    raw = bytearray(b"\0" + values.tobytes())
    a = np.frombuffer(raw, dtype=dtype, count=13, offset=1)
    t = torch.frombuffer(raw, dtype=torch.float32 if dtype == np.float32 else torch.float64, count=13, offset=1)
    assert not a.flags.aligned and t.data_ptr() % values.itemsize != 0
    v, _, (g,) = reference(kind, [values], reduction="sum")
    for x in (a, t):
        from regrad._arrays import as_array_batch

        assert as_array_batch([x]).arrays[0].flags.aligned
        res = kernels.regularizer(kind, [x], reduction="sum")
        assert float(res.value) == pytest.approx(v, rel=TOL[dtype]["rtol"] * 10)
        np.testing.assert_allclose(np.asarray(res.grads[0]), g, **TOL[dtype])
    from regrad import _core

    with pytest.raises(ValueError, match=r"logprobs_list\[0\] is not aligned to its dtype"):
        _core.regularizer(kind, [a], None, "sum", True)


def test_nan_and_complex_masks_are_named():
    """A NaN weight is neither kept (> 0) nor dropped (<= 0); a complex torch mask lost its imaginary part."""
    x = [np.array([1.0, -2.0, 3.0]), np.array([4.0, 5.0])]
    with pytest.raises(regrad.InputError, match=r"mask\[1\] is NaN at token 1"):
        kernels.l1(x, mask=[[1, 1, 1], [1.0, np.nan]])
    with pytest.raises(regrad.InputError, match=r"mask\[1\] is NaN at token 0"):
        kernels.l1(x, mask=[torch.ones(3), torch.tensor([np.nan, 1.0])])
    with pytest.raises(regrad.InputError, match=r"mask\[0\] has dtype torch.complex64"):
        kernels.l1(x, mask=[torch.tensor([1, 0, 1], dtype=torch.complex64), torch.ones(2)])
    inf_mask = [np.array([np.inf, -np.inf, 1.0]), np.ones(2)]  # +inf keeps, -inf drops: both well defined
    assert kernels.l1(x, mask=inf_mask, reduction="sum").value == 1.0 + 3.0 + 4.0 + 5.0


def test_threads_calling_at_once_get_the_serial_bits(rng):
    """The kernels release the GIL and share nothing between calls: concurrent calls match a serial run."""
    import threading

    batches = [ragged(rng, [0, 70001, 13, 5000], dt, scale=2.0) for dt in (np.float32, np.float64)]
    calls = [(k, b) for k in KINDS for b in range(2)]
    expected = [kernels.regularizer(k, batches[b]) for k, b in calls]
    wrong = []

    def work(offset):
        for j in range(len(calls)):
            c = (j + offset) % len(calls)
            res = kernels.regularizer(calls[c][0], batches[calls[c][1]])
            if res.value != expected[c].value or not all(
                np.array_equal(p, q) for p, q in zip(res.grads, expected[c].grads)
            ):
                wrong.append(calls[c])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert wrong == []


def test_editing_kernel_result_grads_in_place_fails_the_backward_instead_of_changing_it():
    # KernelResult.grads are the tensors the backward hands out: zeroing one in place made the
    # backward return zeros. They are now saved like any saved tensor, so torch's version check fires.
    x = [torch.tensor([-1.5, 2.0, -0.25], requires_grad=True), torch.tensor([0.5, -3.0], requires_grad=True)]
    result = regrad.kernels.l1(x)
    result.grads[0].mul_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        result.value.backward()
    fresh = regrad.kernels.l1(x, reduction="sum")  # untouched grads: the backward is the analytic sign(x)
    fresh.value.backward()
    for t in x:
        assert torch.equal(t.grad, torch.sign(t.detach()))
