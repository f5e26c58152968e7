"""The CUDA module (regrad._cuda) against the CPU core, and the parts of it checkable without a GPU.

Tests marked `gpu` need a CUDA device, a CUDA build of torch and regrad built with REGRAD_CUDA=ON;
they skip otherwise. The rest run everywhere: the build's failure mode without nvcc, the error for
CUDA inputs without the module, and the shared formulas / RNG compiled for the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import regrad
from regrad import _core, _gpu, kernels
from regrad.errors import InputError, NonFiniteError

from conftest import ragged

ROOT = Path(__file__).resolve().parents[1]
HAVE_GPU = torch.cuda.is_available() and regrad._cuda is not None
gpu_only = pytest.mark.skipif(
    not HAVE_GPU,
    reason="needs a CUDA GPU, a CUDA build of torch and regrad._cuda (REGRAD_CUDA=ON pip install .)",
)
in_checkout = pytest.mark.skipif(  # the host builds read the checkout's headers and CMakeLists.txt, not the wheel
    not (ROOT / "src/cpp/include/regrad/formulas.hpp").is_file() or not (ROOT / "CMakeLists.txt").is_file(),
    reason="not run from a checkout (no CMakeLists.txt / src/cpp/include next to tests/)",
)
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


# ---------------------------------------------------------------- everywhere (no GPU needed)


def test_missing_cuda_module_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(regrad, "_cuda", None)
    with pytest.raises(InputError, match=r"REGRAD_CUDA=ON pip install \."):
        _gpu.cuda_module()


def test_cpu_inputs_stay_on_the_cpu_path(rng):
    arrays = ragged(rng, [5, 0, 7])
    assert not _gpu.on_cuda(arrays)
    assert not _gpu.on_cuda([torch.from_numpy(a) for a in arrays])
    assert not _gpu.on_cuda([]) and not _gpu.on_cuda(torch.zeros(3))
    res = kernels.l1([torch.from_numpy(a) for a in arrays])
    assert res.grads[0].device.type == "cpu"


def test_status_words_read_as_the_cpu_errors():
    """The GPU kernels' status words (read on any device) raise what the CPU core raises."""
    _gpu._raise_status(torch.tensor([0, -1, -1]), "l1")
    for words, message, where in (([1, 2, 7], "non-finite input at datum 2, element 7", (2, 7)),
                                  ([2, 3, -1], "the regularizer value of datum 3 is not finite", (3, -1)),
                                  ([2, -1, -1], "the regularizer value of the batch .* is not finite", (-1, -1)),
                                  ([7, 1, 2], r"the gradient at datum 1, element 2 is not finite \(overflow", (1, 2))):
        with pytest.raises(NonFiniteError, match=message) as info:
            _gpu._raise_status(torch.tensor(words), "regularizer 'l1'")
        assert (info.value.datum, info.value.position) == where
    with pytest.raises(ValueError, match="step overflow at datum 0, element 4"):
        _gpu._raise_status(torch.tensor([5, 0, 4]), "difference points")
    with pytest.raises(ValueError, match="step too small for richardson at datum 1, element 3: x \\+ h/2 rounds onto"):
        _gpu._raise_status(torch.tensor([6, 1, 3]), "difference points")


def test_host_masks_for_the_gpu_are_checked_as_on_the_cpu():
    """_device_mask (read on any device): NaN, complex and text masks named, as kernels' CPU path does."""
    tensors = [torch.zeros(3), torch.zeros(2)]
    batch = _gpu.CudaBatch(tensors, [(3,), (2,)], [0, 3, 5], 1, torch.float32, torch.device("cpu"))
    packed = _gpu._device_mask([np.array([1.0, 0.0, -np.inf]), [True, True]], batch)
    assert packed.dtype == torch.uint8 and packed.tolist() == [1, 0, 0, 1, 1]
    for bad, message in (([np.array([1.0, np.nan, 0.0]), [1, 1]], r"mask\[0\] is NaN at token 1"),
                         ([[1, 1, 1], torch.tensor([1 + 1j, 0j])], r"mask\[1\] has dtype torch.complex64"),
                         ([["a", "b", "c"], [1, 1]], r"mask\[0\] has dtype <U1"),
                         ([[1, 1], [1, 1]], r"mask\[0\] has shape \(2,\); datum 0 has 3 tokens")):
        with pytest.raises(InputError, match=message):
            _gpu._device_mask(bad, batch)
        with pytest.raises(InputError, match=message):  # the same words as the CPU path
            kernels.l1(tensors, mask=bad)
    with pytest.raises(NonFiniteError, match=r"the batch \(the mean over data\)"):
        _gpu._raise_status(torch.tensor([2, -1, -1]), "regularizer 'l1'", "mean")


def _host_compiler():
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


FORMULAS_CHECK = r"""
#include <cmath>
#include <cstdio>
#include "regrad/formulas.hpp"

struct HostMath {
    static double exp(double x) { return std::exp(x); }
};

int main() {
    // The scalar instantiation of the ops (what the GPU runs), printed for the Python side.
    const double xs[] = {-3.5, -1.0, -0.0, 0.0, 0.25, 2.0};
    for (double x : xs) {
        double v[4], g[4];
        regrad::formulas::L1::eval<HostMath>(x, v[0], g[0]);
        regrad::formulas::L2Squared::eval<HostMath>(x, v[1], g[1]);
        regrad::formulas::Entropy::eval<HostMath>(x, v[2], g[2]);
        regrad::formulas::Identity::eval<HostMath>(x, v[3], g[3]);
        std::printf("%.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g %.17g\n", x, v[0], g[0], v[1], g[1], v[2], g[2],
                    v[3], g[3]);
    }
    return 0;
}
"""

# The GPU's quotient kernel is formulas::quotient, scalar, one element per thread (--fmad=false).
# Here it is built for the host from the test's own scalar -O0 loop and must give the CPU engine's
# bits (its loops: baseline or AVX2, OpenMP), which the GPU tests then compare the device with.
QUOTIENTS_CHECK = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "regrad/formulas.hpp"

struct Abs {
    static double abs(double x) { return std::fabs(x); }
};

template <int NP>
void run(long n, const double* s, const double* f, const double* f0, double eps, double* out) {
    for (long e = 0; e < n; ++e) {
        double sk[NP], vk[NP];
        for (int k = 0; k < NP; ++k) {
            sk[k] = s[k * n + e];
            vk[k] = f[e * NP + k];
        }
        const auto q = regrad::formulas::quotient<NP, Abs>(sk, vk, NP == 1 ? f0[e] : 0.0, eps);
        out[e] = q.grad;
        out[n + e] = q.error;
    }
}

int main(int argc, char** argv) {
    const int np = std::atoi(argv[1]);
    const long n = std::atol(argv[2]);
    std::vector<double> s(4 * n), f(4 * n), f0(n), out(2 * n);
    std::FILE* in = std::fopen(argv[3], "rb");
    if (std::fread(s.data(), 8, np * n, in) != static_cast<size_t>(np * n)) return 2;
    if (std::fread(f.data(), 8, np * n, in) != static_cast<size_t>(np * n)) return 2;
    if (std::fread(f0.data(), 8, n, in) != static_cast<size_t>(n)) return 2;
    std::fclose(in);
    if (np == 1) run<1>(n, s.data(), f.data(), f0.data(), 1e-16, out.data());
    if (np == 2) run<2>(n, s.data(), f.data(), f0.data(), 1e-16, out.data());
    if (np == 4) run<4>(n, s.data(), f.data(), f0.data(), 1e-16, out.data());
    std::FILE* o = std::fopen(argv[4], "wb");
    std::fwrite(out.data(), 8, 2 * n, o);
    std::fclose(o);
    return 0;
}
"""


def _compile_host(tmp_path, name, source):
    src = tmp_path / f"{name}.cpp"
    src.write_text(source)
    exe = tmp_path / name
    built = subprocess.run(
        [_host_compiler(), "-std=c++17", "-O0", "-I", str(ROOT / "src/cpp/include"), str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr
    return exe


@pytest.mark.skipif(_host_compiler() is None, reason="needs a host C++ compiler")
@in_checkout
def test_shared_formulas_match_numpy(tmp_path):
    exe = _compile_host(tmp_path, "formulas_check", FORMULAS_CHECK)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = np.array([[float(v) for v in line.split()] for line in out.stdout.splitlines()])
    x = rows[:, 0]
    np.testing.assert_array_equal(rows[:, 1], np.abs(x))
    np.testing.assert_array_equal(rows[:, 2], np.sign(x))
    np.testing.assert_array_equal(rows[:, 3], x * x)
    np.testing.assert_array_equal(rows[:, 4], 2 * x)
    np.testing.assert_allclose(rows[:, 5], -np.exp(x) * x, rtol=1e-15)
    np.testing.assert_allclose(rows[:, 6], -np.exp(x) * (1 + x), rtol=1e-15)
    np.testing.assert_array_equal(rows[:, 8], x)


@pytest.mark.skipif(_host_compiler() is None, reason="needs a host C++ compiler")
@in_checkout
@pytest.mark.parametrize("method, npoints", [("forward", 1), ("central", 2), ("richardson", 4)])
def test_shared_quotients_are_the_cpu_engines_bits(tmp_path, rng, method, npoints):
    """The GPU's quotient formula, built for the host, gives _core.difference_quotients' bits (and
    matches the textbook quotient to rounding): the CPU/GPU bit-equality the gpu tests check."""
    exe = _compile_host(tmp_path, "quotients_check", QUOTIENTS_CHECK)
    n = 20000
    x = rng.normal(size=n) * 3
    h = 6e-6 * np.maximum(1.0, np.abs(x))
    s = np.stack([(x + frac * h) - x for frac in (1.0, -1.0, 0.5, -0.5)[:npoints]])  # the steps actually taken
    f = rng.normal(size=(n, npoints)) * 10.0 ** rng.integers(-3, 4, size=(n, 1))
    f0 = rng.normal(size=n)
    (tmp_path / "in.bin").write_bytes(s.tobytes() + f.tobytes() + f0.tobytes())
    subprocess.run([str(exe), str(npoints), str(n), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    host = np.fromfile(tmp_path / "out.bin", dtype=np.float64)
    grad, error = _core.difference_quotients(method, np.ascontiguousarray(s), f.reshape(-1), npoints, 1, f0, 1, 1e-16)
    np.testing.assert_array_equal(host[:n].view(np.uint64), grad.view(np.uint64))
    np.testing.assert_array_equal(host[n:].view(np.uint64), error.view(np.uint64))
    if method == "forward":
        reference = (f[:, 0] - f0) / s[0]
    else:
        reference = (f[:, 0] - f[:, 1]) / (s[0] - s[1])
    if method == "richardson":
        g2 = (f[:, 2] - f[:, 3]) / (s[2] - s[3])
        ratio2 = ((s[0] - s[1]) / (s[2] - s[3])) ** 2
        reference = (ratio2 * g2 - reference) / (ratio2 - 1)
    np.testing.assert_allclose(grad, reference, rtol=1e-9 if method == "richardson" else 1e-14)


@in_checkout
def test_cuda_build_without_nvcc_fails_with_a_clear_error(tmp_path):
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake")
    pybind11 = pytest.importorskip("pybind11")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT")}
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "").split(os.pathsep) if d and not os.path.exists(os.path.join(d, "nvcc"))
    )
    args = [
        cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DREGRAD_CUDA=ON",
        "-DSKBUILD_PROJECT_NAME=regrad", "-DSKBUILD_PROJECT_VERSION=0.1.0",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable))
    if ninja:
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode == 0:
        pytest.skip("cmake found a CUDA compiler outside PATH")
    assert "REGRAD_CUDA=ON but no CUDA compiler (nvcc) was found" in out.stderr + out.stdout


# ---------------------------------------------------------------- on a GPU


def _cuda_list(arrays, requires_grad=False):
    return [torch.from_numpy(a).cuda().requires_grad_(requires_grad) for a in arrays]


@pytest.mark.gpu
@gpu_only
def test_cuda_input_without_module_raises_input_error(monkeypatch, rng):
    monkeypatch.setattr(regrad, "_cuda", None)
    with pytest.raises(InputError, match="REGRAD_CUDA=ON"):
        kernels.l1(_cuda_list(ragged(rng, [4, 3])))


CASES = [
    pytest.param([7, 0, 40000, 1, 33000], None, id="ragged-multichunk"),
    pytest.param([5, 9, 1], 6, id="rows-K6"),
    pytest.param([30, 2], 16384 + 5, id="K-above-chunk"),
]


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", kernels.KERNELS)
@pytest.mark.parametrize("lengths,width", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpu_kernels_match_cpu(rng, dtype, kind, lengths, width, reduction):
    arrays = ragged(rng, lengths, dtype=dtype, width=width)
    if kind == "entropy":
        arrays = [-np.abs(a) for a in arrays]
    mask = [rng.integers(0, 2, size=n) for n in lengths]
    for m in (None, mask):
        cpu = kernels.regularizer(kind, arrays, reduction=reduction, mask=m)
        gpu = kernels.regularizer(kind, _cuda_list(arrays), reduction=reduction, mask=m)
        assert gpu.value.device.type == "cuda" and gpu.grads[0].device.type == "cuda"
        assert gpu.value.dtype == (torch.float32 if dtype == np.float32 else torch.float64)
        np.testing.assert_allclose(gpu.value.item(), cpu.value, **TOL[dtype])
        np.testing.assert_allclose(gpu.per_datum.cpu().numpy(), cpu.per_datum, **TOL[dtype])
        for g_gpu, g_cpu, a in zip(gpu.grads, cpu.grads, arrays):
            assert tuple(g_gpu.shape) == a.shape
            np.testing.assert_allclose(g_gpu.cpu().numpy(), g_cpu, **TOL[dtype])


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("kind", kernels.KERNELS)
def test_gpu_kernels_are_deterministic(rng, kind):
    tensors = _cuda_list([-np.abs(a) for a in ragged(rng, [70000, 3, 50000], dtype=np.float32)])
    first = kernels.regularizer(kind, tensors)
    for _ in range(5):
        again = kernels.regularizer(kind, tensors)
        assert torch.equal(again.value, first.value) and torch.equal(again.per_datum, first.per_datum)
        assert all(torch.equal(a, b) for a, b in zip(again.grads, first.grads))


@pytest.mark.gpu
@gpu_only
def test_gpu_non_finite_input_names_datum_and_position(rng):
    arrays = ragged(rng, [10, 20000, 5])
    arrays[1][17000] = np.nan
    arrays[1][18000] = np.inf
    with pytest.raises(NonFiniteError) as cpu_err:
        kernels.l2(arrays)
    with pytest.raises(NonFiniteError) as gpu_err:
        kernels.l2(_cuda_list(arrays))
    assert (gpu_err.value.datum, gpu_err.value.position) == (cpu_err.value.datum, cpu_err.value.position) == (1, 17000)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_entropy_takes_minus_inf_as_on_cpu(rng, dtype):
    arrays = [-np.abs(a) for a in ragged(rng, [10, 70000, 5], dtype=dtype)]
    arrays[1][::5] = -np.inf  # probability 0: adds 0, gradient 0
    cpu = kernels.entropy(arrays)
    gpu = kernels.entropy(_cuda_list(arrays))
    np.testing.assert_allclose(gpu.value.item(), cpu.value, rtol=1e-5 if dtype == np.float32 else 1e-12)
    for g, c in zip(gpu.grads, cpu.grads):
        np.testing.assert_allclose(g.cpu().numpy(), c, rtol=1e-5, atol=1e-7)
    arrays[1][40001] = np.nan
    with pytest.raises(NonFiniteError) as gpu_err:
        kernels.entropy(_cuda_list(arrays))
    assert (gpu_err.value.datum, gpu_err.value.position) == (1, 40001)


@pytest.mark.gpu
@gpu_only
def test_gpu_float32_value_beyond_flt_max_is_named_as_on_cpu():
    for kind, x in (("l1", np.full(2, -3e38, np.float32)), ("l2", np.full(8, -1e19, np.float32))):
        with pytest.raises(NonFiniteError, match="datum 0 is not finite") as info:
            kernels.regularizer(kind, _cuda_list([x]))
        assert info.value.datum == 0
    with pytest.raises(NonFiniteError, match="value of the batch") as info:  # each datum fits, the sum does not
        kernels.l1(_cuda_list([np.full(1, -3e38, np.float32)] * 2), reduction="sum")
    assert info.value.datum == -1
    assert kernels.l1(_cuda_list([np.full(1, -3e38, np.float64)] * 2), reduction="sum").value.item() == 6e38


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("magnitude", ["huge", "tiny", "denormal", "largest", "usual"])
def test_gpu_l2_norm_rescales_as_the_cpu(rng, dtype, magnitude):
    """Squares that overflow or underflow the dtype: the GPU redoes such a datum as BLAS nrm2 would,
    as the CPU does (it took sqrt of the lane sum: inf or 0); ordinary data are unchanged."""
    info = np.finfo(dtype)
    # "largest": near the top of the dtype, yet every norm fits it (sqrt(20000 / 3) ~ 82 < 1024); with
    # max / 16 the 20000-element datum's norm is ~5 max, a NonFiniteError on the CPU before the GPU runs
    scale = {"huge": np.sqrt(info.max) * 4, "tiny": np.sqrt(info.tiny) / 64, "denormal": info.tiny * 2**-10,
             "largest": info.max / 1024, "usual": 1.0}[magnitude]
    arrays = [(rng.uniform(-1, 1, size=n) * scale).astype(dtype) for n in (5, 13, 40, 20000)]
    arrays[2][::4] = 0.0
    arrays.append(np.zeros(3, dtype))
    if magnitude != "usual":
        arrays.append(rng.uniform(-1, 1, size=7).astype(dtype))  # an ordinary datum beside the rescaled ones
    mask = [rng.integers(0, 2, size=a.size) for a in arrays]
    for m in (None, mask):
        cpu = kernels.l2(arrays, squared=False, mask=m)
        gpu = kernels.l2(_cuda_list(arrays), squared=False, mask=m)
        np.testing.assert_allclose(gpu.per_datum.cpu().numpy(), cpu.per_datum, rtol=TOL[dtype]["rtol"])
        np.testing.assert_allclose(gpu.value.item(), cpu.value, rtol=TOL[dtype]["rtol"])
        for g_gpu, g_cpu in zip(gpu.grads, cpu.grads):
            np.testing.assert_allclose(g_gpu.cpu().numpy(), g_cpu, rtol=TOL[dtype]["rtol"], atol=1e-30)
    if magnitude == "largest":  # a norm beyond the dtype (8 * max / 4): the same error on both
        big = [np.full(64, info.max / 4, dtype)]
        for where in (big, _cuda_list(big)):
            with pytest.raises(NonFiniteError, match="value of datum 0 is not finite") as err:
                kernels.l2(where, squared=False)
            assert err.value.datum == 0


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype, x", [(np.float32, 84.2773), (np.float64, 703.226)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpu_entropy_gradient_that_overflows_is_named_as_on_cpu(dtype, x, reduction):
    """-exp(x)(1 + x) beyond the dtype while the value fits: NonFiniteError at that element (it was -inf)."""
    arrays = [np.full(3, -1.0, dtype), np.array([-2.0, -3.0, x, -4.0, -1.0], dtype)]
    with pytest.raises(NonFiniteError, match=r"gradient at datum 1, element 2 is not finite") as info:
        kernels.entropy(_cuda_list(arrays), reduction=reduction)
    assert (info.value.datum, info.value.position) == (1, 2)
    masked = kernels.entropy(_cuda_list(arrays), reduction=reduction, mask=[np.ones(3), [1, 1, 0, 0, 1]])
    assert all(torch.isfinite(g).all() for g in masked.grads)
    nan = [arrays[0], np.array([-2.0, np.nan, x, -4.0, -1.0], dtype)]  # a non-finite input is named first
    with pytest.raises(NonFiniteError, match="non-finite input at datum 1, element 1"):
        kernels.entropy(_cuda_list(nan), reduction=reduction)


@pytest.mark.gpu
@gpu_only
def test_gpu_mean_of_float64_values_whose_sum_overflows():
    """Each datum and the mean fit float64 though their sum does not: the GPU returns the mean, as the CPU."""
    arrays = [np.full(1, 1e308), np.full(1, 1.5e308), np.full(2, -2e307)]
    expected = float(np.mean([np.abs(a.astype(np.longdouble)).sum() for a in arrays]))
    assert kernels.l1(_cuda_list(arrays)).value.item() == pytest.approx(expected, rel=1e-15)
    with pytest.raises(NonFiniteError, match="value of the batch .the sum over data"):
        kernels.l1(_cuda_list(arrays), reduction="sum")


@pytest.mark.gpu
@gpu_only
def test_gpu_value_backward_and_side_stream(rng):
    arrays = ragged(rng, [100, 300], dtype=np.float64)
    tensors = _cuda_list(arrays, requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        res = kernels.entropy(tensors)
        (2.0 * res.value).backward()
    stream.synchronize()
    cpu = kernels.entropy(arrays)
    for t, g in zip(tensors, cpu.grads):
        np.testing.assert_allclose(t.grad.cpu().numpy(), 2.0 * g, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["forward", "central", "richardson"])
def test_gpu_difference_engine_matches_cpu_bits(rng, dtype, method):
    arrays = ragged(rng, [6, 0, 11], dtype=dtype, scale=3.0)
    tensors = _cuda_list(arrays)
    scale = _core.difference_step_scale(method, np.dtype(dtype).name)
    p_cpu, s_cpu = _core.difference_points(arrays, method, scale, None)
    p_gpu, s_gpu = _gpu.difference_points(tensors, method, scale)
    np.testing.assert_array_equal(p_gpu.cpu().numpy(), p_cpu)
    np.testing.assert_array_equal(s_gpu.cpu().numpy(), s_cpu)

    npoints, n = p_cpu.shape
    rows = 5
    outs_cpu = [np.empty((rows,) + a.shape, dtype) for a in arrays]
    outs_gpu = [torch.empty((rows,) + a.shape, dtype=t.dtype, device="cuda") for a, t in zip(arrays, tensors)]
    prev = None
    for q in range(0, n * npoints, rows):
        count = min(rows, n * npoints - q)
        full = prev is None
        pb, pc = prev if prev else (0, 0)
        _core.difference_block(arrays, outs_cpu, p_cpu, 0, npoints, q, count, full, pb, pc)
        _gpu.difference_block(tensors, outs_gpu, p_gpu, 0, npoints, q, count, full, pb, pc)
        for o_cpu, o_gpu in zip(outs_cpu, outs_gpu):
            np.testing.assert_array_equal(o_gpu[:count].cpu().numpy(), o_cpu[:count])
        prev = (q, count)

    f = rng.normal(size=n * npoints)
    f0 = rng.normal(size=n)
    g_cpu, e_cpu = _core.difference_quotients(method, s_cpu, f, npoints, 1, f0, 1, 1e-16)
    g_gpu, e_gpu = _gpu.difference_quotients(method, s_gpu, torch.from_numpy(f).cuda(), npoints, 1,
                                             torch.from_numpy(f0).cuda(), 1, 1e-16)
    np.testing.assert_array_equal(g_gpu.cpu().numpy(), g_cpu)
    np.testing.assert_array_equal(e_gpu.cpu().numpy(), e_cpu)


@pytest.mark.gpu
@gpu_only
def test_gpu_step_underflow_raises(rng):
    x = [torch.ones(4, dtype=torch.float32, device="cuda")]
    with pytest.raises(ValueError, match="step underflow at datum 0, element 0"):
        _gpu.difference_points(x, "central", 1e-12)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("scale", [2.0, 0.0, float("inf"), float("nan")])
def test_gpu_relative_step_is_checked_as_on_cpu(scale):
    """One check for both builders (check_point_steps): the GPU accepted a relative step above 1."""
    x = [torch.ones(4, dtype=torch.float64, device="cuda")]
    for build in (lambda: _gpu.difference_points(x, "central", scale),
                  lambda: _core.difference_points([x[0].cpu().numpy()], "central", scale)):
        with pytest.raises(ValueError, match=r"relative step must be in \(0, 1\]"):
            build()


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype,x,step", [(torch.float32, 3e38, 1e38), (torch.float64, 1.0, 1e301)])
def test_gpu_step_overflow_is_named_as_on_cpu(dtype, x, step):
    xs = [torch.tensor([0.5, x], dtype=dtype, device="cuda")]
    with pytest.raises(ValueError, match="step overflow at datum 0, element 1"):
        _gpu.difference_points(xs, "central", 1e-3, step=[1e-3, step])
    with pytest.raises(ValueError, match="step overflow at datum 0, token 1"):
        _core.difference_points([xs[0].cpu().numpy()], "central", 1e-3, np.array([1e-3, step]))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_gpu_random_stream_and_estimates_match_cpu(rng, kind, antithetic):
    exact = kind == "rademacher"  # Gaussian: CUDA's log/cos may round the last bit differently from libm
    u_cpu = _core.random_directions(kind, 7, 3, 1 << 33, 4096)
    u_gpu = _gpu.random_directions(kind, 7, 3, 1 << 33, 4096).cpu().numpy()
    if exact:
        np.testing.assert_array_equal(u_gpu, u_cpu)
    else:
        np.testing.assert_allclose(u_gpu, u_cpu, rtol=1e-14, atol=1e-15)

    arrays = ragged(rng, [9, 4, 13], dtype=np.float64)
    tensors = _cuda_list(arrays)
    n = sum(a.size for a in arrays)
    scale = np.full(n, 1e-3)
    rows = 6
    outs_cpu = [np.empty((rows,) + a.shape) for a in arrays]
    outs_gpu = [torch.empty((rows,) + a.shape, dtype=torch.float64, device="cuda") for a in arrays]
    _core.random_block(arrays, scale, kind, 11, 5, antithetic, outs_cpu, 2, rows)
    _gpu.random_block(tensors, torch.from_numpy(scale).cuda(), kind, 11, 5, antithetic, outs_gpu, 2, rows)
    for o_cpu, o_gpu in zip(outs_cpu, outs_gpu):
        if exact:
            np.testing.assert_array_equal(o_gpu.cpu().numpy(), o_cpu)
        else:
            np.testing.assert_allclose(o_gpu.cpu().numpy(), o_cpu, rtol=1e-15, atol=1e-17)

    f = rng.normal(size=2 * 8 if antithetic else 8)
    g_cpu, v_cpu = _core.random_estimate(kind, 11, scale, 5, f, antithetic, 0.3)
    g_gpu, v_gpu = _gpu.random_estimate(kind, 11, torch.from_numpy(scale).cuda(), 5, torch.from_numpy(f).cuda(),
                                        antithetic, 0.3)
    np.testing.assert_allclose(g_gpu.cpu().numpy(), g_cpu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v_gpu.cpu().numpy(), v_cpu, rtol=1e-10, atol=1e-12)


# ---- From a differential fuzz of the GPU path against the CPU one (on the host emulation): inputs whose
# data_ptr() is not their values, and the CPU path's named errors.


def _neg_view(values):
    """A contiguous tensor reading `values` whose memory holds -values (torch._neg_view; also what
    z.conj().imag of a one-element complex z is): its data_ptr() is the un-negated storage."""
    view = torch._neg_view(-values)
    assert view.is_neg() and view.is_contiguous()
    return view


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("kind", ["l1", "entropy"])
def test_gpu_kernels_read_negative_views_as_the_cpu(kind):
    """The kernels read the storage: l1's gradient came back +1 for -x, entropy's value -18.3 for 0.94."""
    x = -np.array([0.5, 1.0, 2.0])
    cpu = kernels.regularizer(kind, [x], reduction="sum")
    gpu = kernels.regularizer(kind, [_neg_view(torch.from_numpy(x).cuda())], reduction="sum")
    np.testing.assert_allclose(gpu.value.item(), cpu.value, rtol=1e-12)
    np.testing.assert_allclose(gpu.grads[0].cpu().numpy(), cpu.grads[0], rtol=1e-12)


@pytest.mark.gpu
@gpu_only
def test_gpu_engine_helpers_read_negative_views_as_the_cpu():
    x = np.array([1.0, 2.0, 3.0])
    tensors = [torch.from_numpy(x).cuda()]
    step = np.array([1e-3, 2e-3, 4e-3])
    p_cpu, s_cpu = _core.difference_points([x], "central", 1e-3, step)
    p_gpu, s_gpu = _gpu.difference_points(tensors, "central", 1e-3, step=_neg_view(torch.from_numpy(step).cuda()))
    np.testing.assert_array_equal(p_gpu.cpu().numpy(), p_cpu)

    out_cpu, out_gpu = [np.zeros((2, 3))], [torch.zeros((2, 3), dtype=torch.float64, device="cuda")]
    _core.difference_block([x], out_cpu, p_cpu, 0, 2, 0, 2, True)
    _gpu.difference_block(tensors, out_gpu, _neg_view(torch.from_numpy(p_cpu).cuda()), 0, 2, 0, 2, True)
    np.testing.assert_array_equal(out_gpu[0].cpu().numpy(), out_cpu[0])
    with pytest.raises(InputError, match="output buffer 0"):  # writing through it would store -value
        _gpu.difference_block(tensors, [_neg_view(torch.zeros((2, 3), dtype=torch.float64, device="cuda"))],
                              p_gpu, 0, 2, 0, 2, True)

    f = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    g_cpu, e_cpu = _core.difference_quotients("central", s_cpu, f, 2, 1)
    g_gpu, e_gpu = _gpu.difference_quotients("central", _neg_view(torch.from_numpy(s_cpu).cuda()),
                                             _neg_view(torch.from_numpy(f).cuda()), 2, 1)
    np.testing.assert_array_equal(g_gpu.cpu().numpy(), g_cpu)
    np.testing.assert_array_equal(e_gpu.cpu().numpy(), e_cpu)

    out_cpu, out_gpu = [np.zeros((2, 3))], [torch.zeros((2, 3), dtype=torch.float64, device="cuda")]
    _core.random_block([x], step, "rademacher", 3, 0, False, out_cpu, 0, 2)
    _gpu.random_block(tensors, _neg_view(torch.from_numpy(step).cuda()), "rademacher", 3, 0, False, out_gpu, 0, 2)
    np.testing.assert_array_equal(out_gpu[0].cpu().numpy(), out_cpu[0])


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("step", [np.zeros(0), [], "tensor"])
def test_gpu_empty_step_is_refused_as_on_cpu(step):
    """An empty step tensor has data_ptr() 0, which the module reads as "no step": the default step was used."""
    x = np.array([1.0, 2.0, 3.0])
    step = torch.zeros(0, dtype=torch.float64, device="cuda") if isinstance(step, str) else step
    with pytest.raises(ValueError, match="step has 0 entries"):
        _core.difference_points([x], "central", 1e-3, np.zeros(0))
    with pytest.raises(ValueError, match="step has 0 entries"):
        _gpu.difference_points([torch.from_numpy(x).cuda()], "central", 1e-3, step=step)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", ["K = 0", "mask not a list", "sparse"])
def test_gpu_input_errors_are_the_cpu_paths(case):
    """ValueError / TypeError / RuntimeError before, where the CPU path names the input (InputError)."""
    def both(arrays, **kw):
        for data in (arrays, _cuda_list(arrays)):
            with pytest.raises(InputError):
                kernels.l1(data, **kw)

    if case == "K = 0":
        both([np.zeros((3, 0))])
    elif case == "mask not a list":
        both([np.zeros(3)], mask=5)
    else:
        with pytest.raises(InputError, match="dense"):
            kernels.l1([torch.zeros(3).to_sparse()])
        with pytest.raises(InputError, match="dense"):
            kernels.l1([torch.zeros(3, device="cuda").to_sparse()])


@pytest.mark.gpu
@gpu_only
def test_gpu_tiny_float64_mask_weights_keep_their_tokens_as_on_cpu():
    x = np.array([1.0, 2.0, 3.0])
    w = np.array([1e-50, 1.0, -1e-50])  # > 0 keeps a token: 1e-50 is kept (float32 would round it to 0)
    for mask in ([w], [torch.from_numpy(w)], [torch.from_numpy(w).cuda()]):
        assert float(kernels.l1([torch.from_numpy(x).cuda()], mask=mask, reduction="sum").value) == 3.0
