"""torch.autograd helpers shared by the Functions whose backward hands out precomputed numbers (the
kernels' analytic gradient, compose's packed total, regrad.numerical's estimate). Torch is imported
on first use only, so importing regrad never imports it."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, List, Sequence, Tuple

SECOND_DERIVATIVE = (
    "regrad hands autograd a gradient computed as numbers (analytic kernel, composed total or "
    "numerical estimate), not a graph: second derivatives (create_graph=True, hessian, gradient "
    "penalties) are not available"
)


FORWARD_MODE = (
    "regrad hands autograd its gradient in reverse mode only (analytic kernel, composed total or numerical "
    "estimate): forward-mode AD (torch.autograd.forward_ad dual tensors, jacobian(strategy='forward-mode')) "
    "is not available; use reverse mode (backward(), torch.autograd.grad, jacobian())"
)


FUNCTORCH = (
    "regrad computes this loss outside torch's operators (C++ kernels, numpy, finite differences), so torch.func "
    "transforms (grad, vmap, jacrev, jvp, ...) cannot trace it; differentiate with loss.backward() or "
    "torch.autograd.grad instead"
)


def refuse_functorch(tensors: Sequence[Any]) -> None:
    """Raises FUNCTORCH for torch tensors inside a torch.func transform: there no tensor's memory can be
    read (torch's own error said only "Cannot access data pointer of Tensor that doesn't have storage");
    numpy inputs are fine. One global read outside transforms."""
    functorch = getattr(getattr(sys.modules.get("torch"), "_C", None), "_functorch", None)
    if functorch is not None and functorch.peek_interpreter_stack() is not None and any(
        hasattr(t, "detach") for t in tensors
    ):
        raise RuntimeError(FUNCTORCH)


def refuse_forward_mode(tensors: Sequence[Any]) -> None:
    """Raises FORWARD_MODE when a tensor carries a forward-mode tangent: regrad's value would carry
    none, which torch reads as a zero derivative. One global read when no dual level is open."""
    forward_ad = getattr(getattr(sys.modules.get("torch"), "autograd", None), "forward_ad", None)
    if forward_ad is None or getattr(forward_ad, "_current_level", -1) < 0:
        return
    for t in tensors:
        if hasattr(t, "detach") and forward_ad.unpack_dual(t).tangent is not None:
            raise RuntimeError(FORWARD_MODE)


def autocast_state() -> Tuple[Tuple[str, Any, bool], ...]:
    """The torch.autocast blocks on in this thread, as (device, dtype, cache_enabled): () when none (or torch
    is not imported). Autocast is per thread: fn computes in bfloat16 / float16 here and in float32 on
    another thread, or in a backward run outside the block."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    cache = torch.is_autocast_cache_enabled()
    try:
        on = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
    except TypeError:  # torch < 2.4 (pyproject allows 2.2): per-device functions, is_autocast_enabled() is CUDA's
        old = [("cpu", torch.is_autocast_cpu_enabled, torch.get_autocast_cpu_dtype),
               ("cuda", torch.is_autocast_enabled, torch.get_autocast_gpu_dtype)]
        return tuple((device, dtype(), cache) for device, enabled, dtype in old if enabled())
    return tuple((device, torch.get_autocast_dtype(device), cache) for device in on)


def autocast_block(state: Tuple[Tuple[str, Any, bool], ...], enabled: bool = True) -> contextlib.ExitStack:
    """Re-enters the autocast blocks `state` (autocast_state of another thread) in this thread; with
    enabled=False, turns those devices' autocast off instead (numerical differences, see grad._numerical)."""
    stack = contextlib.ExitStack()
    if state:
        import torch

        for device, dtype, cache in state:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache))
    return stack


class LazyFunction:
    """A torch.autograd.Function built by `factory` on first use."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._fn: Any = None

    def apply(self, *args: Any) -> Any:
        if self._fn is None:
            self._fn = self._factory()
        return self._fn.apply(*args)


def _no_higher_order_function() -> Any:
    import torch

    class NoHigherOrder(torch.autograd.Function):
        """g itself, tied to the input x it is the gradient for; differentiating it raises."""

        @staticmethod
        def forward(ctx: Any, g: Any, x: Any) -> Any:  # noqa: D401
            return g.clone()

        @staticmethod
        def backward(ctx: Any, grad_g: Any) -> Any:
            raise RuntimeError(SECOND_DERIVATIVE)

    return NoHigherOrder


_NoHigherOrder = LazyFunction(_no_higher_order_function)


def scaled_first_order(grad_output: Any, grads: Sequence[Any], inputs: Sequence[Any]) -> List[Any]:
    """What a backward of precomputed gradients returns: grad_output times each gradient (None kept).
    Each is tied to its input first (first_order_only) and the product is taken with recording on, so
    under create_graph=True its derivative in grad_output is the gradient itself (the double-backward
    trick of autograd.functional.jvp), not 0. A float16 / bfloat16 gradient, or one whose dtype differs
    from grad_output's, is multiplied in the wider dtype (at least float32) and rounded once: GradScaler's
    65536 would otherwise overflow float16 (1e-8 underflow) before the product."""
    import torch

    tied = first_order_only(list(grads), inputs)
    same = grad_output.dtype if grad_output.dtype.itemsize >= 4 else None  # (torch dtypes are singletons)
    if all(g is None or g.dtype is same for g in tied):  # the usual case: one product each
        return [None if g is None else grad_output * g for g in tied]
    out = []
    for g in tied:
        if g is None or g.dtype is same:
            out.append(None if g is None else grad_output * g)
        else:
            wide = torch.promote_types(torch.promote_types(grad_output.dtype, g.dtype), torch.float32)
            out.append((grad_output.to(wide) * g.to(wide)).to(g.dtype))
    return out


def first_order_only(grads: List[Any], inputs: Sequence[Any]) -> List[Any]:
    """Gradients a backward returns. Under create_graph=True (grad mode on inside backward) each is
    tied to its input, so a second derivative raises SECOND_DERIVATIVE instead of silently being
    zero (a constant gradient would otherwise look independent of the input to autograd)."""
    import torch

    if not torch.is_grad_enabled():
        return grads
    return [
        g if g is None or not getattr(x, "requires_grad", False) else _NoHigherOrder.apply(g, x)
        for g, x in zip(grads, inputs)
    ]
