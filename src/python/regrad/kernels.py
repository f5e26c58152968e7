"""Built-in regularizers (L1, L2, entropy) on ragged batches, computed by the C++ core.

Each call makes one fused pass: batch value, per-datum values and the gradient of the batch
value with respect to every log-prob. Inputs are a list of [T_i] or [T_i, K] numpy arrays or CPU
torch tensors (float32 or float64); results come back in the same type and dtype. float16 / bfloat16
inputs are computed in float32: value and per_datum in float32, grads cast back to the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np

from . import _core, _gpu
from ._autograd import LazyFunction, refuse_forward_mode, refuse_functorch, scaled_first_order
from ._arrays import ArrayBatch, as_working_batch, cast_back, reusable, split_packed, token_mask
from .errors import InputError

__all__ = ["KernelResult", "l1", "l2", "entropy", "regularizer"]

KERNELS = ("l1", "l2", "l2_norm", "entropy")


@dataclass
class KernelResult:
    """value: batch value (float, or 0-d tensor for torch input); per_datum: [B]; grads: like the input."""

    value: Any
    per_datum: Any
    grads: List[Any]


def l1(logprobs_list: Sequence[Any], *, reduction: str = "mean", mask: Optional[Sequence[Any]] = None) -> KernelResult:
    """Σ|x| per datum; gradient sign(x) with sign(0) = 0."""
    return regularizer("l1", logprobs_list, reduction=reduction, mask=mask)


def l2(
    logprobs_list: Sequence[Any],
    *,
    reduction: str = "mean",
    mask: Optional[Sequence[Any]] = None,
    squared: bool = True,
) -> KernelResult:
    """Σx² per datum (gradient 2x); with squared=False the norm √Σx² (gradient x/‖x‖, 0 at 0)."""
    if not isinstance(squared, (bool, np.bool_)):  # "False" would read as True (as regrad.l2 checks)
        raise TypeError(f"squared must be True or False, got {squared!r}")
    return regularizer("l2" if squared else "l2_norm", logprobs_list, reduction=reduction, mask=mask)


def entropy(
    logprobs_list: Sequence[Any], *, reduction: str = "mean", mask: Optional[Sequence[Any]] = None
) -> KernelResult:
    """-Σ exp(x)·x per datum (Σ_t H(p_t) for rows of log-distributions); gradient -exp(x)(1+x)."""
    return regularizer("entropy", logprobs_list, reduction=reduction, mask=mask)


def regularizer(
    kind: str, logprobs_list: Sequence[Any], *, reduction: str = "mean", mask: Optional[Sequence[Any]] = None
) -> KernelResult:
    """Runs built-in kernel `kind` (one of KERNELS); the common entry point of l1 / l2 / entropy."""
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}; expected one of {KERNELS}")
    logprobs_list = reusable(logprobs_list)  # read twice below (the batch, then the autograd inputs)
    refuse_functorch(logprobs_list)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if _gpu.on_cuda(logprobs_list):
        value_t, per_datum_t, grads = _gpu.regularizer(kind, logprobs_list, reduction, mask)
        return _with_grad(value_t, per_datum_t, grads, list(logprobs_list))
    batch, originals = as_working_batch(logprobs_list)  # float16 / bfloat16 computed in float32
    if reduction == "mean" and not batch.arrays:
        raise InputError("reduction='mean' over an empty batch (no data) is undefined; use reduction='sum'")
    packed_mask = token_mask(mask, batch)
    value, per_datum, packed = _core.regularizer(kind, batch.arrays, packed_mask, reduction, True)
    grads = split_packed(packed, batch)
    shown = cast_back(packed, batch, originals) if originals else grads  # (in the inputs' dtype)
    if not batch.is_torch:
        return KernelResult(float(value), per_datum.astype(batch.dtype, copy=False), shown)
    return _torch_result(value, per_datum, grads, list(logprobs_list), batch, shown)


def _torch_result(
    value: float, per_datum: np.ndarray, grads: List[Any], tensors: List[Any], batch: ArrayBatch,
    shown: Optional[List[Any]] = None,
) -> KernelResult:
    import torch

    dtype = torch.float32 if batch.dtype == np.float32 else torch.float64
    per_datum_t = torch.from_numpy(per_datum).to(dtype)
    value_t = torch.tensor(value, dtype=dtype)
    return _with_grad(value_t, per_datum_t, grads, tensors, shown)


def _with_grad(value_t: Any, per_datum_t: Any, grads: List[Any], tensors: List[Any],
               shown: Optional[List[Any]] = None) -> KernelResult:
    """Attaches the precomputed gradient to the 0-d value when autograd tracks the inputs. shown: the
    gradients the result holds when they differ from grads (float16 / bfloat16 inputs: grads stay float32
    for backward, so the product with grad_output is rounded once, by autograd's cast to the input's dtype)."""
    import torch

    refuse_forward_mode(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        value_t = _PrecomputedGrad.apply(value_t, grads, *tensors)
    return KernelResult(value_t, per_datum_t, grads if shown is None else shown)


def _precomputed_grad_function() -> Any:
    import torch

    class PrecomputedGrad(torch.autograd.Function):
        """A scalar whose gradient with respect to the inputs was computed in the forward pass."""

        @staticmethod
        def forward(ctx: Any, value: Any, grads: List[Any], *inputs: Any) -> Any:  # noqa: D401
            # The gradients are saved like the inputs: they are also KernelResult.grads, and an
            # in-place edit of one then fails the backward (torch's version check), as for any saved tensor.
            ctx.save_for_backward(*inputs, *grads)
            return value.clone()

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            saved = ctx.saved_tensors
            half = len(saved) // 2
            return (None, None, *scaled_first_order(grad_output, saved[half:], saved[:half]))  # numbers, not a graph

    return PrecomputedGrad


_PrecomputedGrad = LazyFunction(_precomputed_grad_function)
