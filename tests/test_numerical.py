"""The numerical-gradient engine: accuracy against torch autograd, structures, execution modes,
randomized estimators, the autograd.Function wrapper, and every bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import regrad
from regrad import NumericalGrad, _core, check, numerical, numerical_grad
from regrad.errors import InputError, NonFiniteError, NumericalError


def ragged(seed=0, lengths=(5, 3, 7), k=None, dtype=np.float64, kind="numpy"):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(t,) if k is None else (t, k)).astype(dtype) for t in lengths]
    return [torch.from_numpy(a) for a in arrays] if kind == "torch" else arrays


def smooth_torch(data, lps):
    """A smooth non-separable loss in torch: couples every log-prob through a log-sum-exp."""
    total = sum((torch.sin(lp) * lp).sum() for lp in lps)
    mix = torch.logsumexp(torch.cat([lp.reshape(-1) for lp in lps]), 0)
    return total + 0.5 * mix**2, {"mix": float(mix.detach())}


def autograd_grads(fn, lps):
    leaves = [lp.detach().clone().requires_grad_(True) for lp in lps]
    loss = fn(None, leaves)[0]
    return [g.numpy() for g in torch.autograd.grad(loss, leaves)]


def max_rel_error(numerical_grads, reference):
    scale = max(np.abs(r).max() for r in reference)
    return max(np.abs(np.asarray(g, dtype=np.float64) - r).max() for g, r in zip(numerical_grads, reference)) / scale


def as_numpy(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def packed(grads):
    return np.concatenate([np.asarray(g).reshape(-1) for g in grads])


# ---- accuracy against autograd ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,dtype,tol",
    [
        ("richardson", torch.float64, 1e-8),
        ("central", torch.float64, 1e-6),
        ("forward", torch.float64, 1e-4),
        ("central", torch.float32, 1e-3),
        ("richardson", torch.float32, 1e-3),
    ],
)
@pytest.mark.parametrize("k", [None, 3])
def test_smooth_function_matches_autograd(method, dtype, tol, k):
    lps = [t.to(dtype) for t in ragged(1, k=k, kind="torch")]
    result = numerical_grad(smooth_torch, None, lps, method=method)
    assert isinstance(result, NumericalGrad)
    assert [g.dtype for g in result.grads] == [dtype] * 3
    assert [g.shape for g in result.grads] == [lp.shape for lp in lps]
    reference = autograd_grads(smooth_torch, [lp.double() for lp in lps])
    assert max_rel_error(result.grads, reference) <= tol
    # The error estimate is an honest bound on the actual error (up to a small factor).
    actual = np.abs(packed(result.grads).astype(np.float64) - packed(reference))
    assert np.all(actual <= 10 * packed(result.error).astype(np.float64) + 1e-12)
    assert result.nfev == {"forward": 1, "central": 2, "richardson": 4}[method] * sum(lp.numel() for lp in lps) + (
        method == "forward"
    )


def test_numpy_inputs_give_numpy_outputs_and_fn_sees_numpy():
    seen = []

    def fn(data, lps):
        seen.append(type(lps[0]))
        return float(sum(np.sum(lp**2) for lp in lps))

    lps = ragged(2)
    result = numerical_grad(fn, None, lps)
    assert all(isinstance(g, np.ndarray) and g.dtype == np.float64 for g in result.grads)
    assert set(seen) == {np.ndarray}
    np.testing.assert_allclose(packed(result.grads), 2 * packed(lps), rtol=1e-8)


@pytest.mark.parametrize("structure", ["batch", "datum"])
@pytest.mark.parametrize("method", ["central", "forward", "richardson", "spsa"])
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_ndarray_subclass_inputs_are_read_as_plain_arrays(structure, method):
    """np.matrix passes the input checks, but its reshape(-1) stays 2-D: the scalar loop indexed rows
    (IndexError). It is read as a plain array view, on every route."""
    plain = np.array([[-0.5, -1.0], [-0.25, -2.0]])
    seen = []

    def fn(data, lps):
        seen.append(type(lps[0]))
        return float(sum(np.sum(lp**2) for lp in lps))

    def datum_fn(datum, lp):
        return fn(None, [lp])

    data = [0] if structure == "datum" else None
    f = datum_fn if structure == "datum" else fn
    got = numerical_grad(f, data, [np.matrix(plain)], structure=structure, method=method, num_samples=4)
    ref = numerical_grad(f, data, [plain], structure=structure, method=method, num_samples=4)
    assert type(got.grads[0]) is np.ndarray and got.grads[0].shape == plain.shape
    np.testing.assert_array_equal(got.grads[0], ref.grads[0])
    assert set(seen) == {np.ndarray}
    if method != "spsa":
        np.testing.assert_allclose(got.grads[0], 2 * plain, rtol=1e-5)


def test_fn_inputs_are_read_only_numpy():
    def fn(data, lps):
        lps[0][0] = 0.0
        return 0.0

    with pytest.raises(NumericalError, match="read-only"):
        numerical_grad(fn, None, ragged())


def test_float16_and_bfloat16_are_widened():
    lps16 = [torch.tensor([0.5, -1.25, 2.0], dtype=torch.float16)]
    result = numerical_grad(lambda d, lps: (lps[0].double() ** 2).sum(), None, lps16)
    assert result.grads[0].dtype == torch.float16
    assert result.dtype == "float32" and "float16" in result.dtype_note
    np.testing.assert_allclose(result.grads[0].double().numpy(), [1.0, -2.5, 4.0], rtol=1e-3)
    lpsb = [torch.tensor([0.5, -1.25], dtype=torch.bfloat16)]
    result = numerical_grad(lambda d, lps: (lps[0] ** 2).sum(), None, lpsb)
    assert result.grads[0].dtype == torch.bfloat16 and "bfloat16" in result.dtype_note
    np.testing.assert_allclose(result.grads[0].float().numpy(), [1.0, -2.5], rtol=1e-2)
    assert numerical_grad(lambda d, lps: (lps[0] ** 2).sum(), None, [torch.ones(2)]).dtype_note is None


def test_kink_gives_zero_at_zero():
    lps = [np.array([0.0, 1.5, -2.0, 0.0])]
    for method in ("central", "richardson"):
        result = numerical_grad(lambda d, lps: float(np.abs(lps[0]).sum()), None, lps, method=method)
        np.testing.assert_allclose(result.grads[0], [0.0, 1.0, -1.0, 0.0], atol=1e-9)


def test_step_override_scalar_and_per_element():
    lps = ragged(3)
    fn = lambda d, lps: float(sum(np.sum(lp**3) for lp in lps))  # noqa: E731
    exact = [3 * lp**2 for lp in lps]
    result = numerical_grad(fn, None, lps, step=1e-4)
    assert result.step_scale is None
    assert max_rel_error(result.grads, exact) < 1e-6
    steps = [np.full(lp.shape, 1e-3) for lp in lps]
    coarse = numerical_grad(fn, None, lps, step=steps)
    # Central truncation error is h^2 * f''' / 6 = 1e-6 for x^3.
    np.testing.assert_allclose(packed(coarse.grads) - packed(exact), 1e-6, rtol=1e-3)


def test_tuple_return_and_data_are_passed_through():
    data = ["a", "b", "c"]
    seen = []

    def fn(d, lps):
        seen.append(d)
        return sum(float(np.sum(lp)) for lp in lps), {"metric": 1.0}

    result = numerical_grad(fn, data, ragged())
    np.testing.assert_allclose(packed(result.grads), 1.0, rtol=1e-9)
    assert all(d is data for d in seen)


# ---- structures ---------------------------------------------------------------------------------


def per_token(x):
    return np.exp(-x) * np.sin(3 * x)


def test_structures_agree_on_separable_function():
    lps = ragged(4, lengths=(6, 2, 9))
    data = ["d0", "d1", "d2"]
    batch = numerical_grad(lambda d, lps: float(sum(per_token(lp).sum() for lp in lps)), data, lps)
    datum_calls = []

    def datum_fn(datum, lp):
        datum_calls.append((datum, lp.size))
        return float(per_token(lp).sum())

    datum = numerical_grad(datum_fn, data, lps, structure="datum")
    token = numerical_grad(lambda d, lps: [per_token(lp) for lp in lps], data, lps, structure="token")
    for other in (datum, token):
        np.testing.assert_allclose(packed(other.grads), packed(batch.grads), rtol=1e-8, atol=1e-9)
    assert (batch.structure, datum.structure, token.structure) == ("batch", "datum", "token")
    # Perturbing datum i re-evaluates only term i, with datum i's own data.
    assert datum.nfev == 2 * 17 and {c for c in datum_calls} == {("d0", 6), ("d1", 2), ("d2", 9)}
    assert token.nfev == 2


@pytest.mark.parametrize("alias,canonical", [("dense", "batch"), ("per_sequence", "datum"), ("per_token", "token")])
def test_design_aliases(alias, canonical):
    lps = ragged(5)
    fns = {
        "batch": lambda d, lps: float(sum(np.sum(lp**2) for lp in lps)),
        "datum": lambda d, lp: float(np.sum(lp**2)),
        "token": lambda d, lps: [lp**2 for lp in lps],
    }
    result = numerical_grad(fns[canonical], [None] * 3, lps, structure=alias)
    assert result.structure == canonical
    np.testing.assert_allclose(packed(result.grads), 2 * packed(lps), rtol=1e-8)


@pytest.mark.parametrize("method,calls", [("central", 2), ("forward", 2), ("richardson", 4)])
def test_token_structure_call_count_and_2d(method, calls):
    lps = ragged(6, k=4, kind="torch")
    count = []

    def fn(data, lps):
        count.append(1)
        return [torch.tanh(lp) * lp for lp in lps], {"n": 1.0}

    result = numerical_grad(fn, None, lps, structure="token", method=method)
    assert len(count) == calls == result.nfev
    x = packed([lp.numpy() for lp in lps])
    exact = np.tanh(x) + x * (1 - np.tanh(x) ** 2)
    np.testing.assert_allclose(packed(result.grads), exact, rtol=1e-4 if method == "forward" else 1e-7)


@pytest.mark.parametrize("method", ["central", "forward", "richardson"])
def test_token_outputs_in_any_float_layout(method):
    """fn's per-token losses may come back float32 or float64, mixed, or non-contiguous: same gradient."""
    lps = ragged(7, lengths=(5, 3, 8), k=2, dtype=np.float32)

    def contiguous(d, lps):
        return [np.sin(lp.astype(np.float64)) for lp in lps]

    def mixed(d, lps):
        return [np.sin(lp.astype(np.float64)) if j % 2 else np.sin(lp.astype(np.float64)).astype(np.float32)
                for j, lp in enumerate(lps)]

    def strided(d, lps):
        return [np.asfortranarray(np.sin(lp.astype(np.float64))) for lp in lps]

    reference = numerical_grad(contiguous, None, lps, structure="token", method=method)
    exact = np.cos(packed(lps).astype(np.float64))
    np.testing.assert_allclose(packed(reference.grads), exact, rtol=2e-2 if method == "forward" else 2e-3)
    assert all(g.dtype == np.float32 and g.shape == lp.shape for g, lp in zip(reference.grads, lps))
    np.testing.assert_array_equal(packed(numerical_grad(strided, None, lps, structure="token", method=method).grads),
                                  packed(reference.grads))
    np.testing.assert_allclose(packed(numerical_grad(mixed, None, lps, structure="token", method=method).grads),
                               exact, rtol=2e-2 if method == "forward" else 2e-3)


def test_token_non_finite_names_the_call():
    calls = []

    def fn(d, lps):
        calls.append(1)
        bad = len(calls) == 2  # the -h call
        return [np.where((np.arange(lp.size) == 3) & bad, np.inf, lp) for lp in lps]

    with pytest.raises(NonFiniteError, match=r"per-token loss \(inf\) at every log-prob at step -h \(call 2 of 2\), "
                       "datum 0, token 3"):
        numerical_grad(fn, None, ragged(), structure="token")
    calls.clear()
    with pytest.raises(NonFiniteError, match="at the unperturbed log-probs, datum 0, token 3"):
        numerical_grad(fn, None, ragged(), structure="token", method="forward")  # calls: +h, then x


@pytest.mark.parametrize("method", ["central", "forward", "richardson"])
@pytest.mark.parametrize("kind,k", [("torch", None), ("torch", 3), ("numpy", None), ("numpy", 2)])
def test_token_vectorized_one_call_same_bits(method, kind, k):
    """vectorized=True: one call, datum j as a contiguous [R, *shape_j] array of its copies (the
    points, then x for forward); the gradient and error are the two-call path's bits."""
    lengths = (5, 1, 9, 4)  # ragged; an equal-length batch takes another view path, tested below
    for lens in (lengths, (6, 6, 6)):
        lps = ragged(11, lengths=lens, k=k, kind=kind)
        seen = []

        def fn(d, xs):
            seen.append([tuple(x.shape) for x in xs])
            if kind == "torch":
                assert all(x.is_contiguous() and not x.requires_grad for x in xs)
                return [torch.sin(x) * x for x in xs]
            assert all(x.flags.c_contiguous and not x.flags.writeable for x in xs)
            return [np.sin(x) * x for x in xs]

        two = numerical_grad(fn, None, lps, structure="token", method=method)
        seen.clear()
        one = numerical_grad(fn, None, lps, structure="token", method=method, vectorized=True)
        rows = {"central": 2, "forward": 2, "richardson": 4}[method]
        assert seen == [[(rows,) + tuple(lp.shape) for lp in lps]]
        assert (one.ncalls, one.nfev, one.blocks, one.block_rows) == (1, two.nfev, 1, rows)
        np.testing.assert_array_equal(packed(one.grads), packed(two.grads))
        np.testing.assert_array_equal(packed(one.error), packed(two.error))
        assert all(type(g) is type(lp) and g.dtype == lp.dtype and g.shape == lp.shape for g, lp in zip(one.grads, lps))
        x = packed(lps)
        np.testing.assert_allclose(packed(one.grads), np.sin(x) + x * np.cos(x), rtol=1e-4 if method == "forward" else 1e-7)


@pytest.mark.parametrize("vectorized", [False, True])
def test_token_reads_torch_inputs_in_place(vectorized):
    """Plain torch inputs are read by address (views into one storage, tensors requiring grad);
    a negative view takes the copying path. Same bits as numpy inputs."""
    x = np.random.default_rng(4).normal(size=(40,))
    reference = numerical_grad(lambda d, xs: [v * v * v for v in xs], None, [x[:10], x[10:25], x[25:]],
                               structure="token", vectorized=vectorized)
    base = torch.from_numpy(x.copy())
    inputs = [base[:10], base[10:25].clone().requires_grad_(True), base[25:]]
    got = numerical_grad(lambda d, xs: [v * v * v for v in xs], None, inputs, structure="token", vectorized=vectorized)
    np.testing.assert_array_equal(packed(got.grads), packed(reference.grads))
    np.testing.assert_array_equal(packed(got.error), packed(reference.error))
    negated = [torch._neg_view(-t.detach()) for t in inputs]
    got = numerical_grad(lambda d, xs: [v * v * v for v in xs], None, negated, structure="token", vectorized=vectorized)
    np.testing.assert_array_equal(packed(got.grads), packed(reference.grads))
    negated_out = numerical_grad(lambda d, xs: [torch._neg_view(-(v * v * v)) for v in xs], None, inputs,
                                 structure="token", vectorized=vectorized)  # fn's outputs as negative views
    np.testing.assert_array_equal(packed(negated_out.grads), packed(reference.grads))


def test_token_vectorized_copies_hold_the_points():
    """Row k of each datum's block is x at point k (x itself last for forward), in the input dtype."""
    lps = ragged(3, lengths=(4, 2), dtype=np.float32)
    got = []
    numerical_grad(lambda d, xs: got.extend(np.array(x) for x in xs) or [x.copy() for x in xs], None, lps,
                   structure="token", vectorized=True, method="forward")
    h = np.sqrt(np.finfo(np.float32).eps) * np.maximum(1.0, np.abs(packed(lps).astype(np.float64)))
    for j, (block, lp) in enumerate(zip(got, lps)):
        assert block.dtype == np.float32 and block.shape == (2,) + lp.shape
        e0 = sum(len(x) for x in lps[:j])
        np.testing.assert_array_equal(block[0], (lp.astype(np.float64) + h[e0 : e0 + len(lp)]).astype(np.float32))
        np.testing.assert_array_equal(block[1], lp)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_token_vectorized_reuses_copies_across_calls_safely(kind):
    """The stacked copies (and fn's views of them) are kept per thread while shapes repeat: a second
    run on other values, a run with other shapes, and a run started inside fn itself (which gets a
    buffer of its own) each give the bits of a fresh run."""
    cube = lambda d, xs: [v * v * v for v in xs]  # noqa: E731
    first, second = ragged(5, lengths=(6, 3)), ragged(6, lengths=(6, 3))
    other = ragged(7, lengths=(2, 2, 5))
    if kind == "torch":
        first, second, other = ([torch.from_numpy(a) for a in lps] for lps in (first, second, other))
    fresh = {id(lps): numerical_grad(cube, None, lps, structure="token") for lps in (first, second, other)}
    seen = []
    for lps in (first, second, other, first):
        got = numerical_grad(lambda d, xs: seen.append(xs) or cube(d, xs), None, lps, structure="token", vectorized=True)
        np.testing.assert_array_equal(packed(got.grads), packed(fresh[id(lps)].grads))
    assert seen[0][0] is seen[1][0]  # same shapes: the same views again
    inner = []

    def nested(d, xs):  # fn running numerical_grad on the same shapes while its own copies are in use
        before = [np.array(as_numpy(x)) for x in xs]
        inner.append(numerical_grad(cube, None, second, structure="token", vectorized=True))
        assert all(np.array_equal(as_numpy(x), b) for x, b in zip(xs, before))
        return cube(d, xs)

    got = numerical_grad(nested, None, first, structure="token", vectorized=True)
    np.testing.assert_array_equal(packed(got.grads), packed(fresh[id(first)].grads))
    np.testing.assert_array_equal(packed(inner[0].grads), packed(fresh[id(second)].grads))


def test_difference_points_out_is_checked():
    """Points written into a caller's buffer match fresh ones; a buffer of the wrong dtype, size or
    layout is refused before anything is written."""
    lps = ragged(8, lengths=(4, 3), dtype=np.float32)
    fresh, _ = _core.difference_points(lps, "central", 1e-3, None, False, True)
    out = np.empty(14, np.float32)
    got, _ = _core.difference_points(lps, "central", 1e-3, None, False, True, out)
    assert got is out or np.shares_memory(got, out)
    np.testing.assert_array_equal(out, fresh)
    with pytest.raises(TypeError, match="dtype"):
        _core.difference_points(lps, "central", 1e-3, None, False, True, np.empty(14))
    with pytest.raises(ValueError, match="14"):
        _core.difference_points(lps, "central", 1e-3, None, False, True, np.empty(13, np.float32))
    with pytest.raises(ValueError, match="writable"):
        _core.difference_points(lps, "central", 1e-3, None, False, True, np.empty((14, 2), np.float32)[:, 0])


def test_token_vectorized_bad_outputs_are_named():
    lps = ragged(2, lengths=(3, 4), kind="torch")
    with pytest.raises(NumericalError, match=r"shape \(3,\) for datum 0 .* expected \(2, 3\), the shape of its stacked copies"):
        numerical_grad(lambda d, xs: [x[0] for x in xs], None, lps, structure="token", vectorized=True)
    with pytest.raises(NumericalError, match="returned a single array"):
        numerical_grad(lambda d, xs: xs[0], None, lps, structure="token", vectorized=True)

    def nan_in_x_row(d, xs):
        out = [x.abs() for x in xs]
        out[1][1, 2] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match=r"\(nan\) in row 1 \(x\) of the stacked copies, datum 1, token 2"):
        numerical_grad(nan_in_x_row, None, lps, structure="token", vectorized=True, method="forward")
    with pytest.warns(RuntimeWarning, match="narrower float"):
        mixed = numerical_grad(lambda d, xs: [x.double() if j else x.float() for j, x in enumerate(xs)], None, lps,
                               structure="token", vectorized=True)
    np.testing.assert_allclose(packed(mixed.grads), 1.0, rtol=5e-3)  # datum 0 rounded its losses to float32
    assert np.all(np.abs(packed(mixed.grads) - 1.0) <= packed(mixed.error))  # and .error covers it


_SIMD_SCRIPT = """
import sys
import warnings
import numpy as np
import regrad
rng = np.random.default_rng(5)
out = {}
for dt in (np.float32, np.float64):
    lps = [(-rng.exponential(2.0, size=n)).astype(dt) for n in (1, 17, 3000)]
    for method in ("central", "forward", "richardson"):
        r = regrad.numerical_grad(lambda d, lps: [np.exp(lp) * lp for lp in lps], None, lps, structure="token",
                                  method=method)
        out[f"{dt.__name__}_{method}"] = np.concatenate([np.concatenate(r.grads), np.concatenate(r.error)])
np.savez(sys.argv[1], **out)
"""


def test_token_path_same_bits_with_and_without_avx2(tmp_path):
    """The AVX2 build of the difference loops (no FMA) gives the baseline build's bits."""
    results = []
    for simd in ("baseline", "default"):
        path = tmp_path / f"{simd}.npz"
        env = dict(os.environ, REGRAD_SIMD=simd)
        run = subprocess.run([sys.executable, "-c", _SIMD_SCRIPT, str(path)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        results.append(dict(np.load(path)))
    assert results[0].keys() == results[1].keys() and len(results[0]) == 6
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)


# ---- execution modes ----------------------------------------------------------------------------


def square_sum_rows(block):
    """One loss per row, computed row by row so scalar and vectorized calls round identically."""
    return np.array([np.sum(np.sin(row) * row) for row in block.reshape(block.shape[0], -1)])


def batch_scalar(data, lps):
    return float(sum(np.sum(np.sin(lp) * lp) for lp in lps))


def batch_vectorized(data, lps):
    return sum(square_sum_rows(lp) for lp in lps)


@pytest.fixture(scope="module")
def dask_executor():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        yield client.get_executor()


@pytest.mark.parametrize("method", ["central", "forward", "richardson", "spsa", "gaussian"])
def test_vectorized_scalar_and_executors_give_identical_bits(method, dask_executor):
    lps = ragged(7, lengths=(4, 6), k=2)
    opts = dict(method=method, num_samples=8, seed=3)
    scalar = numerical_grad(batch_scalar, None, lps, **opts)
    vectorized = numerical_grad(batch_vectorized, None, lps, vectorized=True, **opts)
    small_blocks = numerical_grad(batch_vectorized, None, lps, vectorized=True, max_batch_bytes=3 * 20 * 8, **opts)
    with ThreadPoolExecutor(2) as pool:
        threaded = numerical_grad(batch_scalar, None, lps, executor=pool, **opts)
    dask = numerical_grad(batch_scalar, None, lps, executor=dask_executor, **opts)
    for other in (vectorized, small_blocks, threaded, dask):
        np.testing.assert_array_equal(packed(other.grads), packed(scalar.grads))
        np.testing.assert_array_equal(packed(other.error), packed(scalar.error))
    assert vectorized.blocks == 1 and small_blocks.blocks > 1


def test_datum_structure_vectorized_and_executor_identical(dask_executor):
    lps = ragged(8, lengths=(5, 1, 8))
    data = [0, 1, 2]
    scalar = numerical_grad(lambda d, lp: float(np.sum(np.sin(lp) * lp)), data, lps, structure="datum")
    vec = numerical_grad(lambda d, lp: square_sum_rows(lp), data, lps, structure="datum", vectorized=True)
    dask = numerical_grad(lambda d, lp: float(np.sum(np.sin(lp) * lp)), data, lps, structure="datum",
                          executor=dask_executor)
    np.testing.assert_array_equal(packed(vec.grads), packed(scalar.grads))
    np.testing.assert_array_equal(packed(dask.grads), packed(scalar.grads))
    assert vec.blocks == 3


@pytest.mark.parametrize("method", ["central", "forward", "richardson"])
@pytest.mark.parametrize("kind,k", [("numpy", None), ("torch", None), ("torch", 3), ("numpy", 2)])
def test_datum_one_block_per_datum_matches_smaller_blocks(method, kind, k):
    """Every datum in one block (the lean loop) gives the bits of several blocks per datum and of
    one call per copy, for ragged and equal lengths, and for a fn that returns a view of its input."""
    lengths = (5, 1, 8, 5)
    lps = ragged(10, lengths=lengths, k=k, kind=kind)
    data = ["a", "b", "c", "d"]
    whole = numerical_grad(lambda d, lp: square_sum_rows(as_numpy(lp)), data, lps, structure="datum",
                           vectorized=True, method=method)
    small = numerical_grad(lambda d, lp: square_sum_rows(as_numpy(lp)), data, lps, structure="datum",
                           vectorized=True, method=method, max_batch_bytes=3 * 8 * (k or 1) * 8)
    scalar = numerical_grad(lambda d, lp: float(np.sum(np.sin(as_numpy(lp)) * as_numpy(lp))), data, lps,
                            structure="datum", method=method)
    for other in (small, scalar):
        np.testing.assert_array_equal(packed(whole.grads), packed(other.grads))
        np.testing.assert_array_equal(packed(whole.error), packed(other.error))
    npoints = 4 if method == "richardson" else (1 if method == "forward" else 2)
    assert whole.blocks == 4 and small.blocks > 4 and whole.block_rows == 8 * npoints * (k or 1)
    first = lambda d, lp: lp.reshape(lp.shape[0], -1)[:, 0]  # noqa: E731  (a view into the engine's block)
    viewed = numerical_grad(first, data, lps, structure="datum", vectorized=True, method=method)
    reference = numerical_grad(lambda d, lp: float(lp.reshape(-1)[0]), data, lps, structure="datum", method=method)
    np.testing.assert_array_equal(packed(viewed.grads), packed(reference.grads))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_datum_one_block_boundary_is_the_largest_datum(dtype):
    """One block per datum exactly when the largest datum's P * T copies fit min(max_batch_bytes,
    4 MiB): at that many bytes one block each; one byte less, more blocks (the lean one-block loop
    must not take that case and overrun the limit); the same bits either way."""
    lengths = (3, 7, 5)
    lps = [np.linspace(-2.0, -0.5, t).astype(dtype) for t in lengths]
    data = [0, 1, 2]
    fn = lambda d, lp: square_sum_rows(lp) + d  # noqa: E731
    limit = 2 * 7 * 7 * np.dtype(dtype).itemsize
    at = numerical_grad(fn, data, lps, structure="datum", vectorized=True, max_batch_bytes=limit)
    below = numerical_grad(fn, data, lps, structure="datum", vectorized=True, max_batch_bytes=limit - 1)
    assert (at.blocks, at.block_rows) == (3, 14)
    assert below.blocks > 3 and below.block_rows < 14
    np.testing.assert_array_equal(packed(at.grads), packed(below.grads))
    np.testing.assert_array_equal(packed(at.error), packed(below.error))


def test_difference_diagonal_writes_one_element_per_row_and_checks_sizes():
    """Row r gets element r // P set to point r % P of its datum (offset into the packed points);
    everything else is left as it was. Mismatched dtypes and sizes are refused before writing."""
    points = np.arange(2 * 7, dtype=np.float32).reshape(2, 7) + 100
    buffer = np.zeros((6, 3), np.float32)
    _core.difference_diagonal(buffer, points, 4, 2)  # the datum holds packed elements 4..6
    expected = np.zeros((6, 3), np.float32)
    for r in range(6):
        expected[r, r // 2] = points[r % 2, 4 + r // 2]
    np.testing.assert_array_equal(buffer, expected)
    for npoints in (1, 2, 4):  # enough rows for the threaded loop
        size = 300
        many = np.arange(npoints * (size + 9), dtype=np.float64).reshape(npoints, size + 9)
        block = np.full((npoints * size, size), -1.0)
        _core.difference_diagonal(block, many, 9, npoints)
        rows = np.arange(npoints * size)
        reference = np.full((npoints * size, size), -1.0)
        reference[rows, rows // npoints] = many[rows % npoints, 9 + rows // npoints]
        np.testing.assert_array_equal(block, reference)
    with pytest.raises(TypeError, match="dtype"):
        _core.difference_diagonal(np.zeros((6, 3)), points, 4, 2)
    with pytest.raises(ValueError, match=r"elements \[5, 8\)"):
        _core.difference_diagonal(buffer, points, 5, 2)
    with pytest.raises(ValueError, match="7 rows of 2 points"):
        _core.difference_diagonal(np.zeros((7, 3), np.float32), points, 4, 2)
    with pytest.raises(ValueError, match="writable"):
        _core.difference_diagonal(buffer[:, :2], points, 4, 2)


def test_datum_one_block_reads_any_output_kind():
    """Torch outputs as negative views or requiring grad, and plain lists, read like a plain tensor."""
    lps = ragged(12, lengths=(3, 4), kind="torch")
    base = lambda lp: (lp * lp).sum(-1)  # noqa: E731
    reference = numerical_grad(lambda d, lp: base(lp), [0, 1], lps, structure="datum", vectorized=True)

    def grad_enabled(d, lp):
        with torch.enable_grad():
            return base(lp.clone().requires_grad_(True))

    kinds = [lambda d, lp: torch._neg_view(-base(lp)), grad_enabled, lambda d, lp: base(lp).tolist()]
    for fn in kinds:
        got = numerical_grad(fn, [0, 1], lps, structure="datum", vectorized=True)
        np.testing.assert_array_equal(packed(got.grads), packed(reference.grads))


def test_datum_one_block_per_datum_errors_name_the_datum():
    lps = ragged(11, lengths=(3, 4, 2))
    with pytest.raises(NumericalError, match=r"returned shape \(2,\).*datum 1.*shape \(8,\)"):
        numerical_grad(lambda d, lp: np.zeros(2) if d == 1 else square_sum_rows(lp), [0, 1, 2], lps,
                       structure="datum", vectorized=True)
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan for copy 3 of .*datum 2"):
        numerical_grad(lambda d, lp: np.where(np.arange(len(lp)) == 3, np.nan, 1.0) if d == 2 else square_sum_rows(lp),
                       [0, 1, 2], lps, structure="datum", vectorized=True)
    with pytest.raises(NumericalError, match=r"raised ZeroDivisionError.*datum 0"):
        numerical_grad(lambda d, lp: 1 / 0, [0, 1, 2], lps, structure="datum", vectorized=True)


def test_torch_vectorized_block_shapes_and_byte_limit():
    lps = ragged(9, lengths=(8, 5), k=3, kind="torch")
    limit = 4096
    seen = []

    def fn(data, lps):
        seen.append(([tuple(lp.shape) for lp in lps], sum(lp.numel() * lp.element_size() for lp in lps)))
        assert all(isinstance(lp, torch.Tensor) for lp in lps)
        return sum((lp**2).sum(dim=(1, 2)) for lp in lps)

    result = numerical_grad(fn, None, lps, vectorized=True, max_batch_bytes=limit)
    n = sum(lp.numel() for lp in lps)
    assert all(nbytes <= limit for _, nbytes in seen)
    assert sum(shapes[0][0] for shapes, _ in seen) == 2 * n
    assert all(shapes == [(shapes[0][0], 8, 3), (shapes[0][0], 5, 3)] for shapes, _ in seen)
    assert result.blocks == len(seen) > 1
    np.testing.assert_allclose(packed(result.grads), 2 * packed([lp.numpy() for lp in lps]), rtol=1e-8)


# ---- randomized estimators ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["spsa", "gaussian"])
def test_randomized_mean_converges_and_is_reproducible(method):
    lps = ragged(10, lengths=(6, 4))
    weights = np.linspace(-1, 1, 10)

    def fn(data, lps):
        x = np.concatenate(lps)
        return float(np.sum(weights * x) + 0.25 * np.sum(x**2))

    exact = weights + 0.5 * np.concatenate(lps)
    result = numerical_grad(fn, None, lps, method=method, num_samples=4000, seed=11)
    g = packed(result.grads)
    se = np.sqrt(packed(result.variance))
    assert np.all(np.abs(g - exact) <= 5 * se + 1e-6)
    np.testing.assert_allclose(packed(result.error), se)
    assert result.nfev == 8000 and result.num_samples == 4000 and result.seed == 11
    again = numerical_grad(fn, None, lps, method=method, num_samples=4000, seed=11)
    np.testing.assert_array_equal(packed(again.grads), g)
    other = numerical_grad(fn, None, lps, method=method, num_samples=4000, seed=12)
    assert not np.array_equal(packed(other.grads), g)
    one_sided = numerical_grad(fn, None, lps, method=method, num_samples=4000, seed=11, antithetic=False)
    assert one_sided.nfev == 4001
    assert np.all(np.abs(packed(one_sided.grads) - exact) <= 5 * packed(one_sided.error) + 1e-6)


def test_gaussian_smoothing_of_a_kink():
    # E[d/dx |x + sigma u|] at x = 0 is 0; at x = 2 sigma it is erf(sqrt(2)) ~ 0.954.
    lps = [np.array([0.0, 0.2])]
    result = numerical_grad(lambda d, lps: float(np.abs(lps[0]).sum()), None, lps, method="gaussian", sigma=0.1,
                            num_samples=4000, seed=1, structure="batch")
    g, se = result.grads[0], result.error[0]
    assert abs(g[0]) <= 5 * se[0]
    assert abs(g[1] - 0.9545) <= 5 * se[1] + 0.01


def test_datum_structure_randomized():
    lps = ragged(12, lengths=(3, 5))
    exact = 2 * packed(lps)
    result = numerical_grad(lambda d, lp: float(np.sum(lp**2)), [0, 1], lps, structure="datum", method="spsa",
                            num_samples=500)
    assert np.all(np.abs(packed(result.grads) - exact) <= 5 * packed(result.error) + 1e-6)


# ---- autograd.Function wrapper and check ----------------------------------------------------------


def test_numerical_wrapper_backward():
    lps = [lp.requires_grad_(True) for lp in ragged(13, kind="torch")]

    def fn(data, lps):
        # numpy inside: torch cannot differentiate this
        x = np.concatenate([lp.numpy() for lp in lps])
        return float(np.sum(np.cos(x))), {"n": float(x.size)}

    wrapped = numerical(fn, method="richardson")
    loss, metrics = wrapped(None, lps)
    assert metrics == {"n": 15.0} and loss.requires_grad and loss.dim() == 0
    (3 * loss).backward()
    for lp in lps:
        np.testing.assert_allclose(lp.grad.numpy(), -3 * np.sin(lp.detach().numpy()), rtol=1e-8)
    assert isinstance(wrapped.last_result, NumericalGrad)


def test_numerical_wrapper_mirrors_scalar_return_and_no_grad():
    fn = lambda d, lps: float(sum(np.sum(lp.numpy() ** 2) for lp in lps))  # noqa: E731
    lps = ragged(14, kind="torch")
    out = numerical(fn)(None, lps)
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    leaves = [lp.clone().requires_grad_(True) for lp in lps]
    loss = numerical(fn)(None, leaves)
    loss.backward()
    np.testing.assert_allclose(packed([lp.grad for lp in leaves]), 2 * packed(lps), rtol=1e-7)
    # numpy inputs: fn's value passes through untouched
    assert numerical(lambda d, lps: 1.5)(None, ragged()) == 1.5
    # a one-shot iterator of numpy arrays: fn gets them, not the exhausted iterator (it read 0.0)
    squares = lambda d, lps: float(sum(np.sum(np.asarray(a) ** 2) for a in lps))  # noqa: E731
    assert numerical(squares)(None, iter(ragged())) == squares(None, ragged())


def test_numerical_wrapper_differentiates_only_the_log_probs_that_require_grad():
    """Tensors that need no gradient are held fixed (no evaluations spent on them); the gradient of the
    others is the same; errors count datums among the differentiated ones and say so."""
    lps = ragged(16, kind="torch")
    calls = []

    def fn(data, lps):  # couples the data: the fixed ones still shape the loss
        calls.append(1)
        x = [lp.numpy() for lp in lps]
        return float(sum(np.sum(np.sin(a)) * (j + 1) for j, a in enumerate(x)) * np.sum(x[0] ** 2))

    leaves = [lp.clone().requires_grad_(j == 1) for j, lp in enumerate(lps)]
    wrapped = numerical(fn, method="richardson")
    wrapped(None, leaves).backward()
    calls_before = len(calls)
    full = [lp.clone().requires_grad_(True) for lp in lps]
    reference = numerical(fn, method="richardson")
    reference(None, full).backward()
    np.testing.assert_array_equal(leaves[1].grad.numpy(), full[1].grad.numpy())
    x0 = lps[0].numpy()
    np.testing.assert_allclose(leaves[1].grad.numpy(), 2 * np.cos(lps[1].numpy()) * np.sum(x0**2), rtol=1e-8)
    assert leaves[0].grad is None and leaves[2].grad is None
    result = wrapped.last_result
    assert result.grads[0] is None and result.error[2] is None and result.info["wrt"] == [1]
    assert result.nfev == 4 * lps[1].numel() and calls_before == 1 + result.nfev
    assert result.max_error == np.max(result.error[1].numpy())
    assert result.nfev < reference.last_result.nfev / 3

    def blows_up(data, lps):  # NaN once datum 2's first element moves up; datum 2 alone requires grad
        x = lps[2].numpy()
        return float("nan") if x[0] > -1.0 else float(np.sum(x))

    leaves = [lp.clone().requires_grad_(j == 2) for j, lp in enumerate(ragged(17, kind="torch"))]
    with torch.no_grad():
        leaves[2][0] = -1.0
    with pytest.raises((NumericalError, NonFiniteError), match=r"datum 0 is logprobs_list\[2\]"):
        numerical(blows_up)(None, leaves).backward()


def test_check_passes_and_fails():
    lps = ragged(15, k=2, kind="torch")
    result = check(smooth_torch, None, lps)
    assert result.passed and bool(result) and len(result.max_abs_error) == 3
    assert max(result.max_rel_error) < 1e-6

    def wrong(data, lps):  # autograd sees d/dx = 1, the values say 2x
        return sum((lp.detach() ** 2 + lp - lp.detach()).sum() for lp in lps)

    bad = check(wrong, None, lps)
    assert not bad.passed and bad.worst is not None
    per_datum = check(lambda d, lp: (lp**3).sum(), [0, 1, 2], lps, structure="datum", method="richardson")
    assert per_datum.passed

    class InfBackward(torch.autograd.Function):  # a backward with a division by zero
        @staticmethod
        def forward(ctx, x):
            return x * x

        @staticmethod
        def backward(ctx, g):
            return g / torch.zeros(1, dtype=g.dtype)

    infinite = check(lambda d, lps: sum(InfBackward.apply(lp).sum() for lp in lps), None, lps)
    assert not infinite.passed  # inf <= atol + rtol * inf must not pass


def test_numerical_wrapper_options_dtype_and_double_backward():
    with pytest.raises(InputError, match=r"unknown option\(s\) \['stepp'\]"):
        numerical(lambda d, lps: 0.0, stepp=1e-3)
    with pytest.raises(InputError, match="structure must be one of"):
        numerical(lambda d, lps: 0.0, structure="bogus")
    # a Python-float loss of float16 inputs is kept in float32 (float16 tops out at 65504)
    x = torch.full((4000,), -20.0, dtype=torch.float16, requires_grad=True)
    loss = numerical(lambda d, lps: float(-lps[0].double().sum()))(None, [x])
    assert loss.dtype == torch.float32 and loss.item() == 80000.0
    a = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(numerical(lambda d, lps: (lps[0] ** 3).sum())(None, [a]) ** 2, a, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):  # no silent second derivative without the Hessian term
        g.sum().backward()
    # a loss used as is: the gradient is constant to autograd, which would call the Hessian zero
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.functional.hessian(lambda t: numerical(lambda d, lps: (lps[0] ** 3).sum())(None, [t]), a)


# ---- progress -----------------------------------------------------------------------------------


def test_progress_only_when_asked(capsys):
    fn = lambda d, lps: float(sum(np.sum(lp) for lp in lps))  # noqa: E731
    numerical_grad(fn, None, ragged())
    assert capsys.readouterr().err == ""
    numerical_grad(fn, None, ragged(), progress=True)
    assert "regrad numerical_grad" in capsys.readouterr().err


def test_progress_auto_decides_after_the_first_call(monkeypatch, capsys):
    """progress=None shows a bar for a run predicted past AUTO_SECONDS from its first call; the scalar
    loop used to update only per ~256 calls, so a slow run of under 512 calls never showed one."""
    import importlib
    import types

    import regrad._progress as progress_module

    clock = [0.0]
    fake_time = types.SimpleNamespace(perf_counter=lambda: clock[0])
    monkeypatch.setattr(progress_module, "time", fake_time)
    monkeypatch.setattr(importlib.import_module("regrad.numerical"), "time", fake_time)
    monkeypatch.setattr(progress_module, "AUTO_SECONDS", 0.1)

    def slow(d, lps):  # 0.02 s of fake time per call: 30 calls, 0.6 s predicted after the first
        clock[0] += 0.02
        return float(sum(np.sum(lp) for lp in lps))

    spans = []
    pace = importlib.import_module("regrad.numerical")._Pace()
    for q0, q1 in pace.spans(30):
        spans.append((q0, q1))
        clock[0] += 0.02 * (q1 - q0)
    assert spans[0] == (0, 1) and spans[1] == (1, 6)  # then 0.1 s worth at 0.02 s per call
    assert spans[-1][1] == 30 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    numerical_grad(slow, None, ragged())
    assert "regrad numerical_grad" in capsys.readouterr().err


# ---- bad input ----------------------------------------------------------------------------------


def test_fn_raising_names_fn_and_perturbation():
    def exploding(data, lps):
        if lps[1][2] != ragged()[1][2]:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(NumericalError, match=r"'test_fn_raising.*exploding' raised RuntimeError: boom") as info:
        numerical_grad(exploding, None, ragged())
    assert "perturbation 14 of 30: datum 1, token 2, step +h" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(NumericalError, match="block of perturbations"):
        numerical_grad(lambda d, lps: 1 / 0, None, ragged(), vectorized=True)
    with pytest.raises(NumericalError, match=r"sample 0, \+ direction"):
        numerical_grad(lambda d, lps: 1 / 0, None, ragged(), method="spsa")
    with pytest.raises(NumericalError, match="step -h"), ThreadPoolExecutor(2) as pool:
        numerical_grad(lambda d, lps: 1 / 0 if lps[0][0] < ragged()[0][0] else 0.0, None, ragged(), executor=pool)


@pytest.mark.parametrize(
    "kwargs,fn,match",
    [
        ({}, lambda d, lps: np.zeros(3), r"returned shape \(3,\).*expects a scalar"),
        ({"vectorized": True}, lambda d, lps: 0.0, r"returned shape \(\).*one loss per perturbed copy, shape \(30,\)"),
        ({"vectorized": True}, lambda d, lps: np.zeros(2), r"shape \(2,\).*shape \(30,\)"),
        ({"structure": "token"}, lambda d, lps: 0.0, "returned a single scalar.*list of 3 per-token"),
        ({"structure": "token"}, lambda d, lps: [lp[:1] for lp in lps], r"shape \(1,\) for datum 0.*expected \(5,\)"),
        ({"structure": "token"}, lambda d, lps: [lps[0]], "returned 1 per-token loss arrays.*3 data"),
    ],
)
def test_wrong_return_shape(kwargs, fn, match):
    with pytest.raises(NumericalError, match=match):
        numerical_grad(fn, None, ragged(), **kwargs)


@pytest.mark.parametrize(
    "kwargs,value,match",
    [
        ({}, None, r"returned NoneType at perturbation 0 of 30.*expected a scalar loss"),
        ({}, "1.5", r"returned str at perturbation 0 of 30.*expected a scalar loss"),
        ({}, {"loss": 1.0}, r"returned dict at perturbation 0"),
        ({"method": "spsa"}, None, r"returned NoneType at perturbation 0 \(sample 0"),
        ({"vectorized": True}, None, r"returned NoneType at the block of perturbations \[0, 30\).*shape \(30,\)"),
        ({"structure": "datum", "vectorized": True}, None, r"returned NoneType at the block.*shape \(10,\)"),
        ({"structure": "datum"}, "x", r"returned str at perturbation 0 of 10: datum 0"),
    ],
)
def test_returns_without_numbers_are_named(kwargs, value, match):
    # numpy would read None as nan (a misleading "non-finite loss") and "1.5" as 1.5 (a silent success).
    data = [None] * 3 if kwargs.get("structure") == "datum" else None
    with pytest.raises(NumericalError, match=match):
        numerical_grad(lambda d, lps: value, data, ragged(), **kwargs)
    with pytest.raises(NumericalError, match=r"returned list .*\(datum 0\); expected per-token losses"):
        numerical_grad(lambda d, lps: [["x"] * lp.size for lp in lps], None, ragged(), structure="token")


_COMPLEX_T = lambda v: torch.as_tensor(v).to(torch.complex128) * (1 + 5j)  # noqa: E731
_BOOL_T = lambda v: torch.as_tensor(v) > 0  # noqa: E731


@pytest.mark.parametrize("structure,vectorized", [("batch", False), ("batch", True), ("token", False), ("token", True)])
@pytest.mark.parametrize("kind,convert", [
    ("complex", _COMPLEX_T), ("bool", _BOOL_T),
    ("complex", lambda v: np.asarray(v, np.complex128) * (1 + 5j)), ("bool", lambda v: np.asarray(v) < 0),
])
def test_complex_and_bool_losses_are_named_in_every_mode(structure, vectorized, kind, convert):
    """Only real numbers are losses: numpy and torch read True as 1.0 (a zero gradient) and dropped a
    complex value's imaginary part with a warning; a 0-d complex tensor escaped as a raw TypeError."""
    lps = ragged(kind="torch")
    if structure == "token":
        fn = lambda d, l: [convert(t ** 2) for t in l]  # noqa: E731
    elif vectorized:
        fn = lambda d, l: convert(sum((t ** 2).sum(-1) for t in l))  # noqa: E731
    else:
        fn = lambda d, l: convert(sum((t ** 2).sum() for t in l))  # noqa: E731
    with pytest.raises(NumericalError, match=f"returned .*{kind}.* at .*expected"):
        numerical_grad(fn, None, lps, structure=structure, vectorized=vectorized)


@pytest.mark.parametrize("value", [True, np.bool_(False), 1 + 0j])
def test_python_and_numpy_bool_and_complex_scalars_are_named(value):
    with pytest.raises(NumericalError, match=f"returned {type(value).__name__} at perturbation 0 of 30.*expected a scalar"):
        numerical_grad(lambda d, lps: value, None, ragged())


@pytest.mark.parametrize("bad", [[None], ["abc"], [[1.0, None, 2.0, 0.0, 0.0]]])
def test_token_losses_without_numbers_are_named_before_their_shape(bad):
    """[None] was reported as 'per-token losses of shape ()' and [1.0, None, ...] read as NaN."""
    x = [np.linspace(-1.0, 1.0, 5)]
    with pytest.raises(NumericalError, match=r"returned (NoneType|str|list) at .*\(datum 0\); expected per-token losses"):
        numerical_grad(lambda d, lps: bad, None, x, structure="token")


@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("data,got", [(5, "a int"), ({0: "a", 1: "b", 2: "c"}, "a dict"), ({0, 1, 2}, "a set"),
                                      (None, "None"), ([0, 1], "2 data")])
def test_datum_structure_names_data_that_is_not_one_per_array(data, got, vectorized):
    """A dict, a set or a number used to escape as a raw KeyError / TypeError, or as 'fn raised KeyError'
    although fn never ran."""
    calls = []
    with pytest.raises(InputError, match=f"structure='datum' needs one datum per log-prob array .*got {got} for 3"):
        numerical_grad(lambda d, lp: calls.append(1) or 0.0, data, ragged(), structure="datum", vectorized=vectorized)
    with pytest.raises(InputError, match=f"got {got} for 3"):
        check(lambda d, lp: (lp ** 2).sum(), data, ragged(kind="torch"), structure="datum")
    assert calls == []


def test_mixed_dtypes_are_named_as_given_not_as_widened():
    x64, x16 = np.array([0.5, 1.0]), np.array([0.5], np.float16)
    with pytest.raises(InputError, match=r"logprobs_list\[1\] has dtype float16 but logprobs_list\[0\] has float64"):
        numerical_grad(lambda d, lps: 0.0, None, [x64, x16])
    tb, t64 = torch.tensor([0.5], dtype=torch.bfloat16), torch.tensor([0.5], dtype=torch.float64)
    with pytest.raises(InputError, match=r"logprobs_list\[1\] has dtype float64 but logprobs_list\[0\] has bfloat16"):
        numerical_grad(lambda d, lps: 0.0, None, [tb, t64])


def test_integer_losses_are_real_numbers():
    """A counting loss (ints) is a real number: read as float64, never refused."""
    x = [np.array([0.25, 0.45, 1.5])]
    res = numerical_grad(lambda d, lps: int(np.sum(lps[0] > 0.5)), None, x, step=0.1)
    np.testing.assert_allclose(res.grads[0], [0.0, 5.0, 0.0])  # 0.45 ± 0.1 straddles 0.5: (2 - 1) / 0.2


@pytest.mark.parametrize("kwargs,neg", [
    ({}, lambda t: t.neg_()),  # the unperturbed data are the caller's tensors
    ({}, lambda t: (t.numpy().sort(), t)[1]),  # a write through numpy: no version counter sees it
    ({"structure": "datum"}, lambda t: t.neg_()),  # the perturbed private copy, negated an even number of times
    ({"vectorized": True, "max_batch_bytes": 240}, lambda t: t.neg_()),  # blocks after the first rewrite only diagonals
    ({"structure": "datum", "vectorized": True}, lambda t: t.neg_()),  # the lean one-block loop: the same rule
    ({"method": "forward", "structure": "token"}, lambda t: t.clamp_(min=-0.5)),  # the base call gets x itself
    # the engine's points, from which the token structure recomputes its steps: was a silently wrong gradient
    ({"structure": "token"}, lambda t: t.mul_(3.0)),
    ({"structure": "token", "vectorized": True}, lambda t: t.mul_(3.0)),
    ({"structure": "token", "method": "richardson"}, lambda t: t.mul_(3.0)),
    ({"method": "spsa", "antithetic": False}, lambda t: t.clamp_(min=-0.5)),
])
def test_fn_modifying_its_inputs_in_place_is_named(kwargs, neg):
    lps = ragged(21, kind="torch")
    before = [lp.clone() for lp in lps]
    structure = kwargs.get("structure", "batch")
    if structure == "datum":
        fn = lambda d, lp: neg(lp).exp().sum(-1)  # noqa: E731
    elif structure == "token":
        fn = lambda d, l: [neg(t) ** 2 for t in l]  # noqa: E731
    else:
        fn = lambda d, l: sum(neg(t).exp().sum(-1) for t in l)  # noqa: E731
    with pytest.raises(NumericalError, match="modified its input log-probs in place"):
        numerical_grad(fn, [0, 1, 2] if structure == "datum" else None, lps, **kwargs)
    for lp, b in zip(lps, before):  # the caller's values are intact or put back
        assert torch.equal(lp, b)


@pytest.mark.parametrize("kwargs", [
    {}, {"vectorized": True}, {"structure": "datum"}, {"structure": "datum", "vectorized": True},
    {"structure": "token"}, {"structure": "token", "vectorized": True}, {"method": "spsa"},
])
def test_inference_mode_gives_the_same_gradient(kwargs):
    """Called inside torch.inference_mode() (on inference tensors or not): the same bits as outside, and
    in-place changes still named (the engine's copies used to be inference tensors, without the version
    counter its checks read: "Inference tensors do not track version counter")."""
    lps = ragged(22, kind="torch")
    structure = kwargs.get("structure", "batch")
    data = [0, 1, 2] if structure == "datum" else None
    if structure == "datum":
        fn = lambda d, lp: (torch.sin(lp) * lp).sum(-1)  # noqa: E731
    elif structure == "token":
        fn = lambda d, l: [torch.sin(t) * t for t in l]  # noqa: E731
    else:
        fn = lambda d, l: sum((torch.sin(t) * t).sum(-1) for t in l)  # noqa: E731
    outside = numerical_grad(fn, data, lps, **kwargs)
    with torch.inference_mode():
        inference_lps = [lp.clone() for lp in lps]
        for given in (lps, inference_lps):
            inside = numerical_grad(fn, data, given, **kwargs)
            for a, b in zip(inside.grads + inside.error, outside.grads + outside.error):
                assert torch.equal(a, b)
        if structure == "token":
            with pytest.raises(NumericalError, match="modified its input log-probs in place"):
                numerical_grad(lambda d, l: [t.mul_(3.0) ** 2 for t in l], None, inference_lps, **kwargs)


def _unaligned(a):
    """a's values in memory one byte off the dtype's alignment (np.frombuffer at an odd offset)."""
    raw = np.frombuffer(b"\0" + np.ascontiguousarray(a).tobytes(), dtype=a.dtype, count=a.size, offset=1)
    assert not raw.flags.aligned
    return raw.reshape(a.shape)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("vectorized", [False, True])
def test_token_losses_in_unaligned_memory_are_copied_not_misread(kind, vectorized):
    """The core reads whole floats; fn's per-token losses at an odd address are copied first."""
    lps = ragged(23, kind=kind)

    def fn(d, l):
        outs = [np.asarray(t) ** 3 for t in l]
        outs = [_unaligned(o) for o in outs]
        return [torch.frombuffer(bytearray(b"\0" + o.tobytes()), dtype=torch.float64, offset=1).reshape(o.shape)
                if kind == "torch" else o for o in outs]

    result = numerical_grad(fn, None, lps, structure="token", vectorized=vectorized)
    for g, x in zip(result.grads, lps):
        np.testing.assert_allclose(np.asarray(g), 3 * np.asarray(x) ** 2, rtol=1e-6)


def test_non_finite_losses_and_inputs():
    with pytest.raises(NonFiniteError, match="non-finite loss nan at perturbation 0"):
        numerical_grad(lambda d, lps: float("nan"), None, ragged())
    with pytest.raises(NonFiniteError, match="non-finite loss inf for copy 0"):
        numerical_grad(lambda d, lps: np.full(30, np.inf), None, ragged(), vectorized=True)
    with pytest.raises(NonFiniteError, match="non-finite per-token loss.*datum 0, token 1"):
        numerical_grad(lambda d, lps: [np.where(np.arange(lp.size) == 1, np.nan, lp) for lp in lps], None, ragged(),
                       structure="token")
    lps = ragged()
    lps[2][4] = np.inf
    with pytest.raises(NonFiniteError, match="datum 2, token 4"):
        numerical_grad(lambda d, lps: 0.0, None, lps)


def test_step_underflow_and_bad_steps():
    with pytest.raises(NumericalError, match=r"step underflow at datum 0, token 0: x \+ h == x"):
        numerical_grad(lambda d, lps: 0.0, None, [np.array([1.0, 2.0])], step=1e-30)
    with pytest.raises(NumericalError, match="step underflow"):
        numerical_grad(lambda d, lps: 0.0, None, [np.array([1.0], np.float32)], step=1e-9)
    with pytest.raises(InputError, match="step must be positive"):
        numerical_grad(lambda d, lps: 0.0, None, ragged(), step=-1.0)
    with pytest.raises(InputError, match=r"step\[1\] has shape"):
        numerical_grad(lambda d, lps: 0.0, None, ragged(), step=[np.ones(5), np.ones(2), np.ones(7)])
    with pytest.raises(NumericalError, match="step underflow"):
        numerical_grad(lambda d, lps: 0.0, None, [np.array([1e6])], method="spsa", sigma=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("structure", ["batch", "token"])
def test_richardson_steps_that_round_onto_each_other_are_named(dtype, structure):
    """An absolute step of 1.2 ulp: x + h/2 rounds onto x + h, one step is left and the extrapolation
    was 0/0 (NaN gradient, no error). x + h != x, so it is not an underflow."""
    x = np.array([1.5, 0.25], dtype)
    h = 1.2 * float(np.spacing(dtype(1.5)))
    fn = (lambda d, l: [np.asarray(a, np.float64) ** 2 for a in l]) if structure == "token" else \
        (lambda d, l: float(np.sum(np.asarray(l[0], np.float64) ** 2)))
    with pytest.raises(NumericalError, match=r"step too small for richardson at datum 0, token 0: x \+ h/2 rounds onto"):
        numerical_grad(fn, None, [x], method="richardson", step=h, structure=structure)
    wider = numerical_grad(fn, None, [x], method="richardson", step=1e4 * h, structure=structure)
    np.testing.assert_allclose(wider.grads[0], 2 * x.astype(np.float64), rtol=1e-2)  # a step the dtype resolves works


@pytest.mark.parametrize("kwargs,x", [
    ({"step": 1e308}, np.array([0.5, -1.0])),  # was a gradient of exact zeros (the spacings' difference overflowed)
    ({"step": 1e308, "method": "richardson"}, np.array([0.5, -1.0])),  # was NaN
    ({"step": 1e39}, np.array([0.5, -1.0], np.float32)),  # x + h is inf in float32
    ({"step": 1e308, "structure": "token"}, np.array([0.5, -1.0])),
    ({"method": "spsa", "sigma": 1e308}, np.array([0.5, -1.0])),
])
def test_step_overflow_is_named(kwargs, x):
    fn = (lambda d, lps: [np.tanh(lp) for lp in lps]) if kwargs.get("structure") == "token" else \
        (lambda d, lps: float(np.tanh(lps[0]).sum()))
    with pytest.raises(NumericalError, match=r"step overflow at datum 0, token 0: .* x = 0.5 and h = 1e\+(308|39)"):
        numerical_grad(fn, None, [x], **kwargs)


def test_max_batch_bytes_too_small():
    with pytest.raises(NumericalError, match=r"max_batch_bytes=64 cannot hold one perturbed copy of the batch \(120"):
        numerical_grad(batch_vectorized, None, ragged(), vectorized=True, max_batch_bytes=64)
    with pytest.raises(NumericalError, match="datum 2"):
        numerical_grad(lambda d, lp: square_sum_rows(lp), [0, 1, 2], ragged(), structure="datum", vectorized=True,
                       max_batch_bytes=48)
    # token + vectorized hands fn every stacked row in one call (2 for central): the limit covers them all
    token_fn = lambda d, l: [np.asarray(a) ** 2 for a in l]  # noqa: E731
    with pytest.raises(NumericalError, match=r"max_batch_bytes=239 cannot hold the 2 stacked copies of the batch \(240"):
        numerical_grad(token_fn, None, ragged(), structure="token", vectorized=True, max_batch_bytes=239)
    fits = numerical_grad(token_fn, None, ragged(), structure="token", vectorized=True, max_batch_bytes=240)
    np.testing.assert_array_equal(packed(fits.grads), packed(numerical_grad(token_fn, None, ragged(), structure="token").grads))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "secant"}, "method must be one of"),
        ({"structure": "rows"}, "structure must be one of"),
        ({"structure": "token", "method": "spsa"}, "method 'spsa' applies"),
        ({"vectorized": True, "executor": ThreadPoolExecutor(1)}, "executor applies to vectorized=False"),
        ({"executor": object()}, "concurrent.futures.Executor"),
        ({"max_batch_bytes": 0}, "max_batch_bytes must be a positive integer"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"structure": "datum"}, "structure='datum' needs one datum per log-prob array"),
        ({"structure": ["batch"]}, r"structure must be one of .*got \['batch'\]"),  # was a raw "unhashable"
        ({"step": 10**400}, "step must be positive and finite; got an integer beyond float64"),  # a raw OverflowError
        ({"method": "spsa", "sigma": 10**400}, "sigma must be positive and finite; got an integer beyond"),
        ({"step": True}, "step must be a positive number or an array of them; got bool"),  # was read as 1.0
        ({"step": "0.001"}, "step must be a positive number .*got str"),  # was parsed
        ({"step": torch.ones(15, dtype=torch.bool)}, "step must be a positive number .*got Tensor of torch.bool"),
        ({"method": "gaussian", "sigma": "0.1"}, "sigma must be a positive number .*got str"),
        ({"step": [np.full(5, 1e-3), np.full(3, "x"), np.full(7, 1e-3)]}, r"step\[1\] must be a positive number"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        numerical_grad(lambda d, lps: 0.0, None, ragged(), **kwargs)
    if "executor" in kwargs and hasattr(kwargs["executor"], "shutdown"):
        kwargs["executor"].shutdown()


class _CopyingExecutor:
    """Runs each call on deep copies of its arguments, as a process or Dask executor would (the
    caller's Problem never sees what a chunk noted)."""

    def map(self, func, *columns):
        import copy

        return [func(*copy.deepcopy(args)) for args in zip(*columns)]


def _float32_sin(kind, vectorized):
    """sin-sum losses computed in float32 from float64 log-probs, for each structure's fn signature."""
    if kind == "token":
        return lambda d, lps: [np.sin(lp).astype(np.float32) for lp in lps]
    if kind == "datum":
        return lambda d, lp: np.sin(lp).sum(axis=-1).astype(np.float32) if vectorized else np.float32(np.sin(lp).sum())
    if vectorized:
        return lambda d, lps: sum(np.sin(lp).sum(axis=-1) for lp in lps).astype(np.float32)
    return lambda d, lps: torch.tensor(sum(np.sin(lp).sum() for lp in lps), dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "richardson"},
        {"method": "forward"},
        {"vectorized": True},
        {"structure": "datum"},
        {"structure": "datum", "vectorized": True},
        {"structure": "token"},
        {"structure": "token", "executor": "copying"},
        {"executor": "copying"},
        {"executor": "threads"},
    ],
)
def test_a_float32_loss_of_float64_log_probs_is_reported(kwargs):
    lps = [-np.random.default_rng(3).uniform(0.1, 3.0, size=n) for n in (40, 25)]
    fn = _float32_sin(kwargs.get("structure"), kwargs.get("vectorized", False))
    with ThreadPoolExecutor(2) as pool:
        executor = {"copying": _CopyingExecutor(), "threads": pool}.get(kwargs.get("executor"))
        opts = {**kwargs, "executor": executor} if executor else kwargs
        with pytest.warns(RuntimeWarning, match=r"narrower float than the float64 log-probs .*epsilon 1.2e-07"):
            result = numerical_grad(fn, [0, 1], lps, **opts)
        assert result.info["loss_eps"] == np.finfo(np.float32).eps
        actual = np.abs(packed(result.grads) - np.cos(np.concatenate(lps)))
        assert actual.max() > 1e-4  # the float64 step is far too small for float32 losses ...
        assert np.all(actual <= packed(result.error))  # ... and the error estimate now says so
        # the suggested step fixes it, and a step given is the caller's choice: no warning
        step = result.info["suggested_step_scale"] * np.maximum(1.0, np.abs(np.concatenate(lps)))
        better = numerical_grad(fn, [0, 1], lps, **{**opts, "step": step})
    better_actual = np.abs(packed(better.grads) - np.cos(np.concatenate(lps)))
    assert better_actual.max() < actual.max() / 10


@pytest.mark.parametrize("structure, method", [("token", "central"), ("token", "richardson"), ("batch", "central"),
                                               ("token", "forward")])
def test_the_error_covers_a_loss_computed_in_float32_throughout(structure, method):
    """fn rounds its float64 inputs to float32 too (not only its result): every point then moves by up
    to eps32/2 * |x|. The error estimate counts that (before: sin(3x) on log-probs down to -13 was up to
    5,000x past the error, on 75% of the elements, central)."""
    rng = np.random.default_rng(0)
    lps = [-rng.exponential(3.0, size=n) for n in (40, 25)]
    f = (lambda t: torch.sin(3 * t)) if method != "forward" else (lambda t: torch.exp(t) * t)
    fn = (lambda d, l: [f(torch.tensor(x, dtype=torch.float32)) for x in l]) if structure == "token" else \
        (lambda d, l: sum(f(torch.tensor(x, dtype=torch.float32)).sum() for x in l))
    leaves = [torch.from_numpy(x).requires_grad_() for x in lps]
    reference = packed(torch.autograd.grad(sum(f(t).sum() for t in leaves), leaves))
    with pytest.warns(RuntimeWarning, match="narrower float"):
        result = numerical_grad(fn, None, lps, structure=structure, method=method)
    actual = np.abs(packed(result.grads) - reference)
    assert actual.max() > 1e-5  # float32 rounding dominates the differences
    assert np.mean(actual > packed(result.error)) <= 0.03
    assert np.max(actual / packed(result.error)) < 1.5


@pytest.mark.parametrize("structure", ["batch", "datum"])
def test_a_remote_chunk_reports_float16_losses_as_float16(structure):
    """A process-like executor's chunks carry the precision they saw: float16 losses (eps 9.8e-4) used
    to come back as float32, and the error estimate shrank ~8000x below the real error."""
    lps = [np.linspace(-1, 1, 4)]
    fn = (lambda d, lp: np.float16(np.sum(np.sin(lp)))) if structure == "datum" else \
        (lambda d, lps: np.float16(np.sum(np.sin(lps[0]))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the narrow-loss warning, tested above)
        alone = numerical_grad(fn, [0], lps, structure=structure, step=1e-2)
        remote = numerical_grad(fn, [0], lps, structure=structure, step=1e-2, executor=_CopyingExecutor())
    assert alone.info["loss_eps"] == remote.info["loss_eps"] == np.finfo(np.float16).eps
    np.testing.assert_array_equal(remote.grads[0], alone.grads[0])
    np.testing.assert_array_equal(remote.error[0], alone.error[0])
    assert np.all(np.abs(remote.grads[0] - np.cos(lps[0])) <= remote.error[0])


def test_float64_losses_warn_nothing_and_float32_inputs_keep_their_eps(recwarn):
    lps = ragged(3)
    result = numerical_grad(lambda d, lps: float(sum(np.sin(lp).sum() for lp in lps)), None, lps)
    lps32 = ragged(3, dtype=np.float32)
    result32 = numerical_grad(lambda d, lps: np.float32(sum(np.sin(lp).sum() for lp in lps)), None, lps32)
    assert not recwarn.list and "loss_eps" not in result.info and "loss_eps" not in result32.info


class _BrokenExecutor:
    """An executor whose map runs the calls but hands back what a broken one would."""

    def __init__(self, mode):
        self.mode = mode

    def map(self, func, *columns):
        results = [func(*args) for args in zip(*columns)]
        return {
            "short": results[:-1],
            "long": results + results[:1],
            "none": [None] * len(results),
            "cut": [(r[0][:-1], r[1]) for r in results],  # (each result: the chunk's losses, the eps seen)
            "not iterable": None,
        }[self.mode]


@pytest.mark.parametrize("kwargs", [{}, {"structure": "datum"}, {"structure": "token"}, {"method": "spsa"}])
@pytest.mark.parametrize(
    "mode,match",
    [
        ("short", r"returned \d+ results for \d+ chunks"),
        ("long", "returned more than the"),
        ("none", "returned no numbers for chunk 0"),
        ("cut", r"returned shape \(\d+,\) for chunk 0; expected its \d+ losses"),
        ("not iterable", "returned NoneType, not an iterable"),
    ],
)
def test_broken_executor_is_named_not_read(kwargs, mode, match):
    fns = {"datum": lambda d, lp: float(np.sum(lp**2)), "token": lambda d, lps: [lp**2 for lp in lps]}
    fn = fns.get(kwargs.get("structure"), lambda d, lps: float(sum(np.sum(lp**2) for lp in lps)))
    with pytest.raises(InputError, match=f"executor _BrokenExecutor.map {match}"):
        numerical_grad(fn, [0, 1, 2], ragged(), executor=_BrokenExecutor(mode), **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_executor_same_bits(dtype):
    lps = ragged(4, lengths=(3, 6), k=2, dtype=dtype)
    fn = lambda d, lps: [np.sin(lp) * lp for lp in lps]  # noqa: E731
    direct = numerical_grad(fn, None, lps, structure="token")
    with ThreadPoolExecutor(2) as pool:
        mapped = numerical_grad(fn, None, lps, structure="token", executor=pool)
    np.testing.assert_array_equal(packed(mapped.grads), packed(direct.grads))
    np.testing.assert_array_equal(packed(mapped.error), packed(direct.error))
    assert mapped.grads[1].shape == (6, 2) and mapped.grads[0].dtype == dtype


@pytest.mark.parametrize("kwargs", [{}, {"structure": "datum"}, {"executor": "pool"}])
def test_generator_data_is_listed_once(kwargs):
    lps = ragged(5)
    weights = [1.0, 2.0, 3.0]
    if kwargs.get("structure") == "datum":
        fn = lambda w, lp: w * float(np.sum(lp**2))  # noqa: E731
    else:
        fn = lambda d, lps: float(sum(w * np.sum(lp**2) for w, lp in zip(d, lps)))  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        opts = {**kwargs, "executor": pool} if "executor" in kwargs else kwargs
        result = numerical_grad(fn, (w for w in weights), lps, **opts)
    for g, w, lp in zip(result.grads, weights, lps):
        np.testing.assert_allclose(g, 2 * w * lp, rtol=1e-7, atol=1e-9)
    # the torch wrapper calls fn twice (forward and backward) and check() three times
    wrapped = numerical(lambda d, lps: sum(w * (lp**2).sum() for w, lp in zip(d, lps)))
    leaves = [torch.from_numpy(lp).requires_grad_(True) for lp in lps]
    wrapped(iter(weights), leaves).backward()
    for leaf, w, lp in zip(leaves, weights, lps):
        np.testing.assert_allclose(leaf.grad.numpy(), 2 * w * lp, rtol=1e-7, atol=1e-9)
    checked = check(lambda d, lps: sum(w * (lp**2).sum() for w, lp in zip(d, lps)), iter(weights), lps)
    assert checked.passed and max(checked.max_abs_error) < 1e-6


def test_bad_logprobs():
    with pytest.raises(InputError, match="not a single array"):
        numerical_grad(lambda d, lps: 0.0, None, np.zeros(3))
    with pytest.raises(InputError, match="dtype int64"):
        numerical_grad(lambda d, lps: 0.0, None, [np.zeros(3, np.int64)])
    with pytest.raises(InputError, match="fn must be callable"):
        numerical_grad(3, None, ragged())


def test_empty_batch_calls_nothing():
    result = numerical_grad(lambda d, lps: 1 / 0, None, [np.zeros(0)])
    assert result.nfev == 0 and result.grads[0].shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_reports_the_step_scale_as_any_batch(dtype):
    # the c of the default step is known without data: the same figure as for a one-element batch
    for method in ("central", "forward", "richardson"):
        empty = numerical_grad(lambda d, lps: 0.0, None, [np.zeros(0, dtype)], method=method)
        one = numerical_grad(lambda d, lps: lps[0].sum(), None, [np.zeros(1, dtype)], method=method)
        assert empty.step_scale == one.step_scale and one.step_scale is not None
    assert numerical_grad(lambda d, lps: 0.0, None, [np.zeros(0, dtype)], step=1e-3).step_scale is None


def test_exported_from_package():
    for name in ("numerical_grad", "numerical", "check", "NumericalGrad"):
        assert name in regrad.__all__ and getattr(regrad, name) is not None
