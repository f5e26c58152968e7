"""numerical_grad's `f0=`: fn's loss at the unperturbed log-probs, given by the caller (as scipy's
approx_derivative takes it) so the one-sided methods skip evaluating it again."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence

import numpy as np

from ._evaluate import _SHAPE, NotRealNumbers, Problem, _float_view, float_views, real_array
from .errors import InputError, NonFiniteError


def reads_f0(method: str, antithetic: Any = True) -> bool:
    """Whether a run evaluates fn at the unperturbed log-probs (and so can take f0 instead):
    forward differences, and SPSA / Gaussian smoothing without antithetic pairs."""
    return method == "forward" or (method in ("spsa", "gaussian") and isinstance(antithetic, (bool, np.bool_)) and not antithetic)


def given_f0(f0: Any, problem: Problem, method: str, antithetic: Any, vectorized: bool) -> Optional[List[Any]]:
    """f0 checked and laid out for the engine: [loss] (structure "batch"), one loss per datum
    ("datum"), one per-token array per datum ("token"); None when not given. Notes its precision."""
    if f0 is None:
        return None
    if not reads_f0(method, antithetic):
        pairs = " with antithetic pairs" if method in ("spsa", "gaussian") else ""
        raise InputError(
            f"f0 is read only by method='forward' and by 'spsa' / 'gaussian' with antithetic=False (one-sided "
            f"differences); method={method!r}{pairs} never evaluates fn at the unperturbed log-probs"
        )
    if problem.structure == "token":
        if vectorized:
            raise InputError(
                "f0 with structure='token' and vectorized=True saves no call: the one stacked call already holds "
                "the unperturbed copy; drop f0 or pass vectorized=False"
            )
        return _token_f0(f0, problem)
    if problem.structure == "batch":
        return [_one_loss(f0, "f0", problem)]
    count = len(problem.sizes)
    # a list (of numbers, 0-d or shape-(1,) losses: what a vectorized fn returns per datum) or a 1-D array
    if isinstance(f0, (str, bytes, Mapping)) or not hasattr(f0, "__len__") or getattr(f0, "ndim", 1) != 1 or len(f0) != count:
        raise InputError(
            f"f0 for structure='datum' must hold one loss per datum ({count}), got {_described(f0)}"
        )
    return [_one_loss(v, f"f0[{j}] (datum {j})", problem) for j, v in enumerate(f0)]


def _one_loss(value: Any, what: str, problem: Problem) -> float:
    """One real, finite loss: a number, a 0-d array or tensor, or one of shape (1,) (a vectorized fn's)."""
    if type(value) is float:
        loss = value
    elif _one_float_tensor(value):  # (fn's own output, the common case: ~1 us, not real_array's ~4)
        loss = value.item()
    else:
        try:
            a = real_array(value)
        except NotRealNumbers as err:
            raise InputError(f"{what} must be a real number, fn's loss at the unperturbed log-probs; got {err}") from None
        if a.size != 1 or a.ndim > 1:
            raise InputError(f"{what} must be one loss, got shape {tuple(a.shape)}")
        loss = float(a.reshape(()))
    if not math.isfinite(loss):
        raise NonFiniteError(f"{what} is {loss}, not a finite loss")
    problem.see_loss(value)
    return loss


def _one_float_tensor(value: Any) -> bool:
    """A CPU torch float tensor of one element, 0-d or shape (1,)."""
    torch = sys.modules.get("torch")
    return (torch is not None and type(value) is torch.Tensor and value.is_floating_point() and value.dim() <= 1
            and value.numel() == 1 and value.device.type == "cpu")


def _token_f0(f0: Any, problem: Problem) -> List[np.ndarray]:
    """One float32 / float64 array per datum, shaped like its log-probs. The common case (fn's own
    output: float tensors or arrays of the right shapes) in C-level passes, its values checked finite by
    the core's quotient pass; anything else checked here datum by datum (a per-datum Python pass cost
    as much as the call f0 saves)."""
    shapes = problem.batch.shapes
    if not isinstance(f0, (list, tuple)) or len(f0) != len(shapes):
        raise InputError(
            f"f0 for structure='token' must be a list of {len(shapes)} per-token loss arrays shaped like the "
            f"log-probs (what fn returns at them), got {_described(f0)}"
        )
    try:
        views = float_views(f0) if list(map(_SHAPE, f0)) == shapes else None
    except AttributeError:
        views = None
    if views is not None:
        if views:  # one look at the precision, as for fn's own per-token losses (an empty batch has none)
            problem.see_loss(views[0])
        return views
    out = []
    for j, (value, shape) in enumerate(zip(f0, shapes)):
        try:
            a = _float_view(value)
        except NotRealNumbers as err:
            raise InputError(f"f0[{j}] must be datum {j}'s per-token losses, got {err}") from None
        if a.shape != tuple(shape):
            raise InputError(f"f0[{j}] has shape {tuple(a.shape)}; datum {j}'s log-probs have shape {tuple(shape)}")
        bad = np.flatnonzero(~np.isfinite(a.reshape(-1)))
        if bad.size:
            raise NonFiniteError(f"f0[{j}] holds the non-finite loss {a.reshape(-1)[bad[0]]} at element {bad[0]} of datum {j}")
        problem.see_loss(value)
        out.append(np.require(a, None, ["C", "A"]))
    return out


def _described(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    shape = getattr(value, "shape", None)
    return f"a {type(value).__name__} of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"
