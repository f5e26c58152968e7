"""Shared fixtures: seeded generators and ragged batches."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def ragged(rng: np.random.Generator, lengths, dtype=np.float64, width=None, scale=1.0):
    """A ragged batch of log-prob-like arrays ([T] or [T, K]) drawn from rng."""
    out = []
    for n in lengths:
        shape = (n,) if width is None else (n, width)
        out.append((rng.normal(size=shape) * scale).astype(dtype))
    return out
