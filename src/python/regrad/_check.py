"""`regrad.check`: a numerical gradient compared with a reference, like torch.autograd.gradcheck.

The reference is torch autograd of the same fn, or a user's gradient function (`grad_fn=`, the
`RegularizerSpec.with_grad` route), so a hand-written gradient can be checked too.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ._arrays import ArrayBatch, is_torch_tensor, reusable, torch_views
from ._evaluate import fn_name, split_loss
from .errors import InputError
from .grad import _check_real, _recording, requires_grad_error
from .numerical import (
    STRUCTURES, NumericalGrad, _numpy, _prepare_inputs, canonical_structure, check_datum_data, numerical_grad,
)

__all__ = ["CheckResult", "check"]


@dataclass
class CheckResult:
    """Numerical vs reference gradients (autograd, or the grad_fn given to `check`).

    passed: every element satisfies |numerical - reference| <= atol + rtol * |reference|, with the
    reference finite. max_abs_error / max_rel_error: one float per datum (relative error divides
    by max(|reference|, atol)). worst: (datum, flat index) of the largest absolute error, or None
    for an empty batch. against: "autograd" or the grad_fn's name.
    """

    passed: bool
    max_abs_error: List[float]
    max_rel_error: List[float]
    atol: float
    rtol: float
    worst: Optional[Tuple[int, int]]
    numerical: NumericalGrad
    reference: List[np.ndarray]
    against: str = "autograd"

    @property
    def autograd(self) -> List[np.ndarray]:
        """The reference gradients (the attribute's name from before `grad_fn=` existed)."""
        return self.reference

    def __bool__(self) -> bool:
        return self.passed


def check(
    fn: Callable[..., Any],
    data: Any,
    logprobs_list: Sequence[Any],
    *,
    grad_fn: Optional[Callable[..., Any]] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    **options: Any,
) -> CheckResult:
    """Compares numerical_grad(fn, ...) with torch autograd of the same fn, or with `grad_fn(data,
    logprobs_list) -> one gradient per datum` when given. Defaults: atol=1e-5, rtol=1e-3 in float64
    (gradcheck's), 1e-3 and 1e-2 in float32. `options` go to numerical_grad (structure applies to
    the autograd route too; grad_fn always gives the gradient of the total)."""
    data = reusable(data)
    batch = _prepare_inputs(logprobs_list).batch
    atol, rtol = _tolerances(atol, rtol, batch.dtype)
    structure = canonical_structure(options.get("structure", "batch"))
    if structure is None:
        raise InputError(f"structure must be one of {tuple(STRUCTURES)}, got {options.get('structure')!r}")
    if structure == "datum":
        check_datum_data(data, len(batch.shapes))
    inputs = _inputs(batch, need_torch=grad_fn is None)
    if grad_fn is None:
        reference, against = _autograd_reference(fn, data, batch, structure), "autograd"
    else:  # grad_fn gets copies: an in-place change must not move the caller's point (or fn's)
        copies = [x.clone() if hasattr(x, "clone") else x.copy() for x in inputs]
        reference, against = _user_reference(grad_fn, data, copies, batch), _name(grad_fn)
    result = numerical_grad(fn, data, inputs, **options)
    passed, abs_err, rel_err, worst = _compare(result.grads, reference, atol, rtol)
    return CheckResult(passed, abs_err, rel_err, atol, rtol, worst, result, reference, against)


def _tolerances(atol: Any, rtol: Any, dtype: np.dtype) -> Tuple[float, float]:
    """The defaults for the dtype, or the given values checked: finite numbers >= 0."""
    f64 = dtype == np.float64
    try:
        atol = (1e-5 if f64 else 1e-3) if atol is None else float(atol)
        rtol = (1e-3 if f64 else 1e-2) if rtol is None else float(rtol)
    except (TypeError, ValueError):
        raise InputError(f"atol and rtol must be numbers, got atol={atol!r}, rtol={rtol!r}") from None
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):
        raise InputError(f"atol and rtol must be finite and >= 0, got atol={atol}, rtol={rtol}")
    return atol, rtol


def _compare(grads: Sequence[Any], reference: List[np.ndarray], atol: float, rtol: float
             ) -> Tuple[bool, List[float], List[float], Optional[Tuple[int, int]]]:
    """passed, per-datum max abs / rel errors and the worst element; a NaN difference counts as the largest."""
    abs_err: List[float] = []
    rel_err: List[float] = []
    passed, worst, worst_key = True, None, -1.0
    for j, (g, a) in enumerate(zip(grads, reference)):
        a = a.reshape(-1)
        with np.errstate(invalid="ignore", divide="ignore"):  # inf - inf and 0 / 0 are handled below
            diff = np.abs(_numpy(g).astype(np.float64).reshape(-1) - a)
            rel = np.where(diff == 0, 0.0, diff / np.maximum(np.abs(a), atol))
        if diff.size == 0:
            abs_err.append(0.0)
            rel_err.append(0.0)
            continue
        abs_err.append(float(diff.max()))  # NaN when any difference is NaN
        rel_err.append(float(rel.max()))
        # a non-finite reference fails: inf <= atol + rtol * inf would pass it
        passed = passed and bool(np.all(np.isfinite(a))) and bool(np.all(diff <= atol + rtol * np.abs(a)))
        key = np.where(np.isnan(diff), np.inf, diff)
        i = int(np.argmax(key))
        if key[i] > worst_key:
            worst, worst_key = (j, i), float(key[i])
    return passed, abs_err, rel_err, worst


def _name(grad_fn: Any) -> str:
    return "grad_fn" + fn_name(grad_fn)[2:]


def _inputs(batch: ArrayBatch, need_torch: bool) -> List[Any]:
    """What fn (and grad_fn) receive: torch tensors, or numpy arrays when torch is missing and not needed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        if need_torch:
            raise InputError("check() compares with torch autograd, and torch is not installed (pip install 'regrad[torch]'); "
                             "or give grad_fn= (`regrad check --grad-fn`) to compare with your own gradient") from None
        return list(batch.arrays)
    return torch_views(batch.arrays)


def _autograd_reference(fn: Callable[..., Any], data: Any, batch: ArrayBatch, structure: str) -> List[np.ndarray]:
    """torch.autograd.grad of fn's total with respect to fresh leaves holding the log-probs."""
    import torch

    if not sum(batch.sizes):  # an empty batch (or only empty data): no log-prob for a graph to reach
        return [np.zeros(a.shape) for a in batch.arrays]
    hint = "(or give grad_fn=, `regrad check --grad-fn`, to compare with your own gradient)"
    with _recording(torch):  # grad mode on and inference mode off (a caller's inference_mode has no graph)
        leaves = [torch.tensor(a).requires_grad_(True) for a in batch.arrays]
        try:
            total = _autograd_total(fn, data, leaves, structure)
        except RuntimeError as err:
            if not (requires_grad_error(err) and "numpy" in str(err)):  # not the numpy-fn case: fn's own error
                raise
            raise InputError(f"{fn_name(fn)} cannot take tensors that require grad ({err}); check() needs a torch fn "
                             f"for autograd {hint}") from err
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise InputError(f"{fn_name(fn)} does not return a torch loss with a graph; check() needs autograd {hint}")
        if total.numel() != 1:
            raise InputError(f"{fn_name(fn)} returned a loss of shape {tuple(total.shape)}; structure={structure!r} "
                             "needs a scalar loss")
        auto = torch.autograd.grad(total.reshape(()), leaves, allow_unused=True)
    return [np.zeros(a.shape) if g is None else g.detach().double().numpy() for g, a in zip(auto, batch.arrays)]


def _autograd_total(fn: Callable[..., Any], data: Any, tensors: List[Any], structure: str) -> Any:
    """The total loss as a torch scalar with a graph, for each structure's fn signature."""
    import torch

    if structure == "datum":
        terms = [torch.as_tensor(split_loss(_call(fn, d, t))) for d, t in zip(data, tensors)]
        for j, v in enumerate(terms):
            if v.numel() != 1:
                raise InputError(f"{fn_name(fn)} returned a loss of shape {tuple(v.shape)} for datum {j}; "
                                 "structure='datum' needs a scalar loss per datum")
        return torch.stack([v.reshape(()) for v in terms]).sum()
    out = split_loss(_call(fn, data, tensors))
    if structure == "token":
        if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)) or len(out) != len(tensors):
            raise InputError(f"structure='token': {fn_name(fn)} must return per-token losses, one per datum "
                             f"({len(tensors)}); it returned {type(out).__name__}")
        return torch.stack([torch.as_tensor(p).sum() for p in out]).sum()
    return out


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), refusing an awaitable: check() calls fn synchronously (`regrad check` awaits async fns)."""
    out = fn(*args)
    if inspect.isawaitable(out):
        getattr(out, "close", lambda: None)()  # no "never awaited" warning
        raise InputError(f"{fn_name(fn)} returned an awaitable (an async fn); check() calls fn synchronously: "
                         "wrap it, e.g. lambda d, l: asyncio.run(fn(d, l)), or use `regrad check`, which awaits it")
    return out


def _user_reference(grad_fn: Callable[..., Any], data: Any, inputs: List[Any], batch: ArrayBatch) -> List[np.ndarray]:
    """grad_fn's gradients as float64 arrays shaped like the log-probs; names grad_fn and the datum on a mismatch."""
    name = _name(grad_fn)
    out = grad_fn(data, inputs)
    if inspect.isawaitable(out):
        getattr(out, "close", lambda: None)()  # no "never awaited" warning
        raise InputError(f"{name} returned an awaitable; check() calls grad_fn synchronously")
    if isinstance(out, np.ndarray) and out.ndim == 1 and out.dtype != object:  # packed, as compose accepts
        if out.size != sum(batch.sizes):
            raise InputError(f"{name} returned a packed gradient of {out.size} values; the batch has {sum(batch.sizes)} log-probs")
        bounds = np.cumsum(batch.sizes)[:-1]
        out = [p.reshape(s) for p, s in zip(np.split(out, bounds), batch.shapes)]
    try:
        if out is None or isinstance(out, (dict, str, bytes)):
            raise TypeError
        parts = list(out)
    except TypeError:
        raise InputError(f"{name} returned {type(out).__name__}; expected a list with one gradient per datum") from None
    if len(parts) != len(batch.shapes):
        raise InputError(f"{name} returned {len(parts)} gradients; expected one per datum ({len(batch.shapes)})")
    grads = []
    for j, (g, shape) in enumerate(zip(parts, batch.shapes)):
        if g is None:
            raise InputError(f"{name}: the gradient of datum {j} is None; give zeros for a datum the loss ignores")
        what = f"{name}: the gradient of datum {j}"
        if is_torch_tensor(g) and (g.is_complex() or str(g.dtype) == "torch.bool"):  # (before _numpy casts it)
            raise InputError(f"{what} has dtype {g.dtype}; expected real numbers (float)")
        try:
            a = np.asarray(_numpy(g))
        except (TypeError, ValueError) as err:
            raise InputError(f"{what} is not numeric ({err})") from None
        _check_real(a.dtype, what)  # as compose's grad_fn route: True is not 1.0, "2" is not parsed, no imaginary part dropped
        a = a.astype(np.float64)
        if a.shape != tuple(shape):
            raise InputError(f"{name}: the gradient of datum {j} has shape {a.shape}; its log-probs have {tuple(shape)}")
        grads.append(a)
    return grads
