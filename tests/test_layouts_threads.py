"""Input layouts and thread counts (audit of 2026-11-25): read-only numpy log-probs handed to torch code,
big-endian float16, and sums whose bits followed OpenBLAS's thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import regrad

torch = pytest.importorskip("torch")


def _frozen_pair(x: np.ndarray):
    """Two read-only log-prob arrays over an immutable bytes object (what np.frombuffer of file bytes gives)."""
    raw = np.concatenate([x, x]).tobytes()
    both = np.frombuffer(raw, dtype=np.float64)
    assert not both.flags.writeable
    return raw, [both[: x.size], both[x.size :]]


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # (the next test checks it)
def test_check_never_lets_fn_write_into_read_only_log_probs():
    """check() hands fn torch tensors, and torch has no read-only tensors: over a read-only array (a frozen
    array, np.memmap(mode="r"): there a write crashed the process with SIGSEGV) fn's in-place write reached
    the caller's frozen memory. It must meet regrad's in-place check on a copy instead."""
    x = np.linspace(-3.0, -0.1, 6)
    raw, arrays = _frozen_pair(x)
    reached = []

    def inplace(data, lps):  # a buggy fn: changes a log-prob tensor in place
        lps[-1].mul_(2.0)
        reached.append(raw != np.concatenate([x, x]).tobytes())
        return float(sum(np.sum(np.sin(t.numpy())) for t in lps))

    def grad_fn(data, lps):
        return [np.cos(t.numpy()) for t in lps]

    with pytest.raises(regrad.NumericalError, match="modified its input log-probs in place"):
        regrad.check(inplace, None, arrays, grad_fn=grad_fn)
    assert reached and not any(reached)  # every write landed in regrad's copy
    assert raw == np.concatenate([x, x]).tobytes()


def test_check_on_read_only_log_probs_gives_the_writable_arrays_result():
    x = np.linspace(-3.0, -0.1, 6)
    _, arrays = _frozen_pair(x)

    def fn(data, lps):
        return sum((torch.sin(t) * t).sum() for t in lps)

    frozen = regrad.check(fn, None, arrays)  # (torch's "not writable" UserWarning is an error under pytest)
    plain = regrad.check(fn, None, [x.copy(), x.copy()])
    assert frozen.passed and plain.passed
    for a, b in zip(frozen.numerical.grads, plain.numerical.grads):
        assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_compose_autograd_term_never_gets_tensors_over_read_only_numpy_memory():
    x = np.linspace(-3.0, -0.1, 6)
    _, arrays = _frozen_pair(x)
    shared = []

    def term(data, lps):
        shared.append(any(np.shares_memory(t.detach().numpy(), a) for t, a in zip(lps, arrays)))
        return sum((torch.sin(t) * t).sum() for t in lps)

    spec = regrad.RegularizerSpec.sync("t", 1.0, term, grad="autograd")
    with regrad.compose(base_loss=None, regularizers=[spec]) as loss_fn:
        total, grads, _ = loss_fn.evaluate([None, None], arrays)
        plain_total, plain_grads, _ = loss_fn.evaluate([None, None], [x.copy(), x.copy()])
    assert shared == [False, False]
    assert total == plain_total and all(np.array_equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("structure", ["batch", "token"])
def test_big_endian_float16_is_widened_like_native_float16(structure):
    """numerical_grad widens float16 log-probs to float32; a big-endian '>f2' array (float16 too) was refused
    with "has dtype float16; expected float32 or float64", and ['>f2', float16] as "float16 but ... has >f2"."""
    x = np.linspace(-3.0, -0.1, 6).astype(np.float16)

    def fn(data, lps):
        if structure == "token":
            return [np.sin(a) for a in lps]
        return float(sum(np.sum(np.sin(a.astype(np.float64))) for a in lps))

    native = regrad.numerical_grad(fn, None, [x, x], structure=structure)
    big = regrad.numerical_grad(fn, None, [x.astype(">f2"), x], structure=structure)
    assert big.dtype == native.dtype == "float32" and big.dtype_note == native.dtype_note
    for a, b in zip(big.grads, native.grads):
        assert a.dtype.name == "float16" and np.array_equal(a.astype(np.float32), b.astype(np.float32))
    with pytest.raises(regrad.InputError, match=r"logprobs_list\[1\] has dtype float64 but logprobs_list\[0\] has float16"):
        regrad.numerical_grad(fn, None, [x.astype(">f2"), x.astype(np.float64)], structure=structure)


_THREADS_SCRIPT = """
import json, sys
import numpy as np, regrad
rng = np.random.default_rng(5)
lens = (70000, 0, 50001)
lps = [rng.normal(-3.0, 1.0, n) for n in lens]

class Datum:
    def __init__(self, n):
        self.loss_fn_inputs = {"weights": rng.random(n)}

data = [Datum(n) for n in lens]
out = {"ce": float(regrad.losses.cross_entropy(data, lps)[0]).hex()}
with regrad.compose(base_loss=regrad.losses.cross_entropy, regularizers=[regrad.l1(0.01), regrad.entropy(0.1)]) as fn:
    metrics = fn.evaluate(data, lps)[2].flat()
out.update({k: float(v).hex() for k, v in metrics.items() if "duration" not in k and "grad_norm" not in k})
print(json.dumps(out))
"""


def _same_regrad_prefix() -> str:
    """Lines that make a child process import the regrad this process runs (an editable install's finder
    is in sys.meta_path; without it, the package's parent directory comes first on sys.path)."""
    if any("editable" in getattr(type(f), "__module__", "") for f in sys.meta_path):
        return ""
    root = os.path.dirname(os.path.dirname(regrad.__file__))
    return ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(type(f), '__module__', '')]\n"
            f"sys.path.insert(0, {root!r})\n")


def test_loss_values_are_the_same_bits_for_any_thread_count():
    """The kernels' sums are the same bits for any thread count; the composed loss's base value (cross-entropy's
    np.dot) went through BLAS, whose sums follow OpenBLAS's threads: base_loss/value, loss_total and perplexity
    moved in the last bits between OMP_NUM_THREADS=1 and 2. (The grad norms, telemetry only, stay BLAS's by
    choice: docs/compose.md.)"""
    results = {}
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _same_regrad_prefix() + _THREADS_SCRIPT], env=env,
                             capture_output=True, text=True, check=True)
        results[threads] = json.loads(out.stdout)
    assert results["1"] == results["2"]
