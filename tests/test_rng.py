"""The counter-based RNG behind the randomized estimators (Philox4x32-10)."""

import numpy as np
import pytest

from regrad import _core


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10.
    assert _core.philox4x32([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _core.philox4x32([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_directions_are_pure_functions_of_seed_sample_index(kind):
    a = _core.random_directions(kind, 7, 3, 0, 1000)
    b = _core.random_directions(kind, 7, 3, 0, 1000)
    np.testing.assert_array_equal(a, b)
    # Any sub-range regenerates the same components (nothing is stored).
    np.testing.assert_array_equal(_core.random_directions(kind, 7, 3, 500, 10), a[500:510])
    assert not np.array_equal(a, _core.random_directions(kind, 8, 3, 0, 1000))
    assert not np.array_equal(a, _core.random_directions(kind, 7, 4, 0, 1000))


def test_rademacher_moments():
    u = _core.random_directions("rademacher", 1, 0, 0, 200_000)
    assert set(np.unique(u)) == {-1.0, 1.0}
    assert abs(u.mean()) < 0.01


def test_gaussian_moments():
    u = _core.random_directions("gaussian", 1, 0, 0, 200_000)
    assert abs(u.mean()) < 0.01
    assert abs(u.var() - 1.0) < 0.02
    assert abs(np.mean(u**4) - 3.0) < 0.1  # kurtosis of a normal
    # Neighbouring samples are uncorrelated.
    v = _core.random_directions("gaussian", 1, 1, 0, 200_000)
    assert abs(np.mean(u * v)) < 0.01
