"""Shared fixtures: seeded generators and ragged batches."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def masks_byte0_model(config):
    """A small default model that forbids token id 0 (its log-prob is -inf): padding at weight 0."""
    import torch

    from regrad.model import default_model

    class MasksByte0(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = default_model(0, config)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            logits = self.body(ids)
            return torch.cat([torch.full_like(logits[..., :1], float("-inf")), logits[..., 1:]], -1)

    return MasksByte0()


def ragged(rng: np.random.Generator, lengths, dtype=np.float64, width=None, scale=1.0):
    """A ragged batch of log-prob-like arrays ([T] or [T, K]) drawn from rng."""
    out = []
    for n in lengths:
        shape = (n,) if width is None else (n, width)
        out.append((rng.normal(size=shape) * scale).astype(dtype))
    return out
