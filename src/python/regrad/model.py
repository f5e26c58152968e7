"""The embedded default model: a small causal transformer language model over bytes, in pure torch.

No tokenizer and no weights to download: the vocabulary is the 256 byte values and the weights
are drawn from a seed, so `LocalTrainingClient()` works offline and is reproducible.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ByteLMConfig", "ByteLM", "default_model"]


@dataclass(frozen=True)
class ByteLMConfig:
    """Shape of a `ByteLM`: vocabulary, width, depth, heads and context length (tokens)."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    context: int = 128
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value, low = getattr(self, f.name), 0 if f.name == "n_layers" else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"ByteLMConfig.{f.name} must be an integer >= {low}, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (what save_state stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ByteLMConfig":
        """The inverse of `to_dict`; an unknown key is a ValueError naming it."""
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ByteLMConfig has no field(s) {unknown}")
        return cls(**config)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP, each with a residual."""

    def __init__(self, cfg: ByteLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Causal LM: input ids [B, T] (int64, 0..255) -> logits [B, T, vocab]; position t sees tokens <= t."""

    def __init__(self, config: ByteLMConfig = ByteLMConfig()) -> None:
        super().__init__()
        self.config = config
        self.context = config.context
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: small normal weights, residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab_size] of input ids [B, T] (int64), causal: position t sees ids <= t."""
        t = input_ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context ({self.context})")
        pos = torch.arange(t, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def default_model(seed: int = 0, config: ByteLMConfig = ByteLMConfig()) -> ByteLM:
    """A `ByteLM` whose weights are drawn from `seed` (same seed, same weights, on any machine)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")  # torch.manual_seed's range
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG stream untouched
        torch.manual_seed(seed)
        return ByteLM(config)
