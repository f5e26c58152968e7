"""Integer sizes from the overflow audit (each test failed before its fix): numpy-integer options that
wrapped in the engine's products, a buffer-size check whose product wrapped in int64, and block writers
that looped over the rows of an empty batch."""

import threading

import numpy as np
import pytest

from regrad import _core, numerical_grad
from regrad.errors import NumericalError

# ---- numpy integer options ------------------------------------------------------------------------
# num_samples=np.uint8(200) made 2 * 200 antithetic evaluations in uint8: 144, so 72 samples ran while the
# result reported 200 (only a RuntimeWarning said so); np.int8(100) gave "needs -56 loss evaluations", and
# max_batch_bytes=np.uint8(255) an OverflowError instead of the named NumericalError.


def _linear(d, lps):
    return np.sum(lps[0], axis=-1)  # vectorized: one loss per perturbed copy


@pytest.mark.parametrize("num_samples", [np.uint8(200), np.int8(100), np.int16(20000), np.uint16(40000)])
def test_numpy_integer_num_samples_runs_that_many_samples(num_samples):
    x = [np.linspace(-2.0, -0.1, 4)]
    got = numerical_grad(_linear, None, x, method="spsa", vectorized=True, num_samples=num_samples)
    ref = numerical_grad(_linear, None, x, method="spsa", vectorized=True, num_samples=int(num_samples))
    assert got.nfev == ref.nfev == 2 * int(num_samples)
    assert got.num_samples == int(num_samples)
    np.testing.assert_array_equal(got.grads[0], ref.grads[0])
    np.testing.assert_array_equal(got.variance[0], ref.variance[0])


def test_numpy_integer_max_batch_bytes_too_small_is_named():
    x = [np.linspace(-2.0, -0.1, 400)]  # one copy: 3200 bytes
    with pytest.raises(NumericalError, match=r"max_batch_bytes=255 cannot hold one perturbed copy"):
        numerical_grad(_linear, None, x, vectorized=True, max_batch_bytes=np.uint8(255))


# ---- output buffers whose size check wrapped ------------------------------------------------------
# block_buffers compared a.size() with rows * len: a [2**59, 0] buffer of a 32-element datum gives
# 2**59 * 32 = 2**64, which wraps to 0 == a.size(), so the core wrote rows the buffer does not have
# (a segfault with full=True, heap corruption from random_block on a fresh empty array). Here the buffer
# is a view of `base`, so the old code's writes landed there instead of crashing.


def _wrapping_buffer():
    base = np.zeros(64)
    return base, np.lib.stride_tricks.as_strided(base, shape=(2**59, 0), strides=(0, 8))


def test_difference_block_refuses_a_buffer_whose_row_count_wraps():
    x = [np.arange(1.0, 33.0)]
    points, _ = _core.difference_points(x, "central", 1e-3, None, False)
    base, buffer = _wrapping_buffer()
    with pytest.raises(ValueError, match="output buffer 0 has 0 elements; expected 576460752303423488 rows of 32"):
        _core.difference_block(x, [buffer], points, 0, 2, 0, 1, False, 0, 0)
    np.testing.assert_array_equal(base, 0.0)  # nothing written


def test_random_block_refuses_a_buffer_whose_row_count_wraps():
    base, buffer = _wrapping_buffer()
    with pytest.raises(ValueError, match="output buffer 0 has 0 elements"):
        _core.random_block([np.arange(1.0, 33.0)], np.ones(32), "rademacher", 0, 0, True, [buffer], 0, 1)
    np.testing.assert_array_equal(base, 0.0)


def test_block_buffers_still_take_rows_of_empty_data():
    x = [np.zeros(0), np.arange(3.0)]
    points, _ = _core.difference_points(x, "central", 1e-3, None, False)
    outs = [np.zeros((4, 0)), np.zeros((4, 3))]
    _core.difference_block(x, outs, points, 0, 2, 0, 4, True)
    assert outs[1][0, 0] == points[0, 0] and outs[1][1, 0] == points[1, 0]
    with pytest.raises(ValueError, match="output buffer 1 has 12 elements; expected 4 rows of 2"):
        _core.difference_block([np.zeros(0), np.arange(2.0)], outs, points[:, :2].copy(), 0, 2, 0, 1, True)


# ---- rows of an empty batch -----------------------------------------------------------------------
# With no elements (every datum empty) a full block and a random block still looped over every row of
# the buffers doing nothing, with the GIL released: 2**59 rows of [0] buffers never returned.


def _returns_within(seconds, call):
    done = threading.Event()

    def run():
        call()
        done.set()

    threading.Thread(target=run, daemon=True).start()  # (a hung call must not hang the test run)
    return done.wait(seconds)


def test_block_writers_return_at_once_for_an_empty_batch():
    x = [np.zeros(0)]
    buffer = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(2**59, 0), strides=(0, 8))
    points = np.zeros((2, 0))
    assert _returns_within(20, lambda: _core.difference_block(x, [buffer], points, 0, 2, 0, 0, True))
    assert _returns_within(20, lambda: _core.random_block(x, np.ones(0), "gaussian", 0, 0, True, [buffer], 0, 2**59))


# ---- random indices past int64 ------------------------------------------------------------------------
# random_block's perturbation q_begin + r and both random functions' element index index_offset + e were
# int64 sums: past 2**63 - 1 they wrapped (undefined behaviour), and a wrapped q gave row 1 the direction of
# sample -2**62 (as uint64) instead of 2**62, silently. Now refused, as the block writers' other wraps are.


def test_random_block_refuses_perturbations_past_int64():
    x = [np.arange(1.0, 5.0)]
    out = [np.zeros((2, 4))]
    with pytest.raises(ValueError, match="passes 2\\*\\*63 - 1"):
        _core.random_block(x, np.ones(4), "rademacher", 0, 0, True, out, 2**63 - 1, 2)
    with pytest.raises(ValueError, match="passes 2\\*\\*63 - 1"):
        _core.random_block(x, np.ones(4), "rademacher", 0, 2**63 - 2, True, out, 0, 1)
    np.testing.assert_array_equal(out[0], 0.0)  # nothing written
    _core.random_block(x, np.ones(4), "rademacher", 0, 2**63 - 5, True, out, 2**63 - 4, 2)  # the last ones fit
    u = _core.random_directions("rademacher", 0, 2**62 - 2, 2**63 - 5, 4)  # sample (2**63 - 4) // 2, + then -
    np.testing.assert_array_equal(out[0] - x[0], [u, -u])


def test_random_estimate_refuses_element_indices_past_int64():
    with pytest.raises(ValueError, match="passes 2\\*\\*63 - 1"):
        _core.random_estimate("rademacher", 0, np.ones(3), 2**63 - 2, np.arange(4.0), True)
    grad, _ = _core.random_estimate("rademacher", 0, np.ones(3), 2**63 - 4, np.arange(4.0), True)
    u0 = _core.random_directions("rademacher", 0, 0, 2**63 - 4, 3)
    u1 = _core.random_directions("rademacher", 0, 1, 2**63 - 4, 3)
    np.testing.assert_array_equal(grad, (-0.5 * u0 - 0.5 * u1) / 2)
