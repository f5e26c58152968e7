"""Gradient routes: how one term's d(loss)/d(logprobs) is obtained, and "auto" selection.

Routes: "analytic" (the fn carries a `value_and_grad`, e.g. the C++ kernels), "user" (a grad_fn),
"autograd" (torch), "numerical" / "spsa" / "gaussian" (regrad.numerical_grad). "auto" picks
user grad_fn > analytic > autograd when the returned loss carries a graph > numerical.
Every route runs the term's fn once on the unperturbed log-probs for its value and metrics;
numerical routes add only the engine's perturbed evaluations.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import inspect
import itertools
import math
import threading
from dataclasses import dataclass, field
from itertools import repeat
from numbers import Real
from operator import attrgetter, is_not
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrays import ArrayBatch, as_working_batch, cast_back, listed, torch_views
from ._autograd import autocast_block, autocast_state, refuse_functorch
from ._f0 import reads_f0
from .errors import InputError, NonFiniteError

__all__ = ["ROUTES", "NUMERICAL_ROUTES", "NUMERICAL_OPTIONS", "TermResult", "analytic", "has_analytic"]

ROUTES = ("auto", "analytic", "autograd", "user", "numerical", "spsa", "gaussian")
NUMERICAL_ROUTES = ("numerical", "spsa", "gaussian")
# Keyword arguments passed through to regrad.numerical_grad.
NUMERICAL_OPTIONS = frozenset(
    {"method", "structure", "vectorized", "step", "max_batch_bytes", "executor", "progress", "seed",
     "num_samples", "sigma", "antithetic"}
)


def analytic(value_and_grad: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator giving `fn(data, logprobs_list)` an analytic route: `value_and_grad(data, arrays)`.

    `arrays` are numpy views of the log-probs (one per datum); it returns `(value, grads, metrics)`
    with grads either one array per datum or one packed 1-D array of all tokens in order.
    """

    def attach(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.value_and_grad = value_and_grad  # type: ignore[attr-defined]
        return fn

    return attach


def has_analytic(fn: Any) -> bool:
    """True when fn carries an analytic `value_and_grad` (built-in kernels, cross_entropy)."""
    return callable(getattr(fn, "value_and_grad", None))


@dataclass
class TermResult:
    """One term's value, metrics and gradient (packed 1-D in the batch dtype), and how it was obtained."""

    value: float
    custom: Dict[str, float]
    grad_method: str
    flat_grad: Optional[np.ndarray] = None
    grad_norm: Optional[float] = None
    nfev: Optional[int] = None
    grad_error: Optional[float] = None
    duration_ms: float = 0.0


@dataclass
class CallInputs:
    """The caller's batch, checked once per call and shared by every term (read-only)."""

    data: Sequence[Any]
    logprobs: List[Any]
    batch: ArrayBatch
    detached: List[Any] = field(default_factory=list)  # what fns see: detached tensors, or the arrays
    # names of auto terms found to need detached inputs (numpy-based fns); kept across calls
    needs_detached: Dict[str, bool] = field(default_factory=dict)
    call: int = 0  # the call's number on its composed loss, for events
    # per datum, the caller's float16 / bfloat16 dtype when the batch was widened to float32 (else empty):
    # every term then works on float32 copies, and gradients handed back are cast to these dtypes
    original_dtypes: List[Any] = field(default_factory=list)
    autocast: Tuple[Tuple[str, Any, bool], ...] = ()  # the caller's torch.autocast blocks, re-entered by each term

    @classmethod
    def build(
        cls, data: Sequence[Any], logprobs_list: Sequence[Any], needs_detached: Optional[Dict[str, bool]] = None,
        call: int = 0,
    ) -> "CallInputs":
        logprobs = listed(logprobs_list, "logprobs_list", "arrays")
        refuse_functorch(logprobs)
        data = listed(data, "data", "data (any objects)")
        if len(data) != len(logprobs):
            raise InputError(f"data has {len(data)} entries but logprobs_list has {len(logprobs)}; one per datum")
        batch, originals = as_working_batch(logprobs)  # float16 / bfloat16: float32 copies
        detached = batch.tensors if batch.tensors is not None else batch.arrays  # detached once, in as_array_batch
        autocast = autocast_state() if batch.is_torch else ()
        return cls(data, logprobs, batch, detached, {} if needs_detached is None else needs_detached, call, originals,
                   autocast=autocast)

    def __post_init__(self) -> None:
        self.sizes: List[int] = self.batch.sizes
        self.size: int = int(sum(self.sizes))
        self._original: Optional[np.ndarray] = None
        self._original_lock = threading.Lock()
        self._abandoned = False  # the call has returned: its memory is the caller's again
        self._handed: Optional[List[np.ndarray]] = None  # numpy views of what fns get (see handed_arrays)
        self.given: Optional[List[Any]] = None  # widened batch: the composed gradient in the caller's dtypes

    def abandon(self) -> None:
        """The call failed and returns: a term still running in the background (a thread cannot be
        stopped) must no longer put values back into the caller's memory, which the caller may reuse."""
        with self._original_lock:
            self._abandoned = True

    def restore_changed(self, saved: Optional[np.ndarray]) -> List[int]:
        """_restore_changed on the caller's memory, unless the call has already returned."""
        with self._original_lock:  # (abandon waits for a restore in progress)
            return [] if self._abandoned else _restore_changed(self.handed_arrays(), saved)

    def handed_arrays(self) -> List[np.ndarray]:
        """numpy views of the memory fns are handed (`detached`), which the in-place check watches.
        batch.arrays, except where as_array_batch copied a tensor (non-contiguous, unaligned): a change
        fn made to the tensor itself would go unseen in the copy."""
        if self._handed is None:
            if self.batch.copied:
                import torch

                self._handed = list(map(torch.Tensor.numpy, self.detached))
            else:
                self._handed = self.batch.arrays
        return self._handed

    def engine_copy(self) -> List[Any]:
        """A private copy of the log-probs for the numerical engine, whose own in-place check writes
        back into what it was handed (at the end of the run, or when a sibling's failure stops it)."""
        copies = [a.copy() for a in self.batch.arrays]
        if self.batch.is_torch:
            import torch

            return [torch.from_numpy(a) for a in copies]
        return copies

    def original(self) -> Optional[np.ndarray]:
        """The packed log-probs as the call received them: copied by the first term that runs user code,
        before it runs, and shared by the others (a term starting after a sibling changed the memory in
        place must not take that change for the original). None for an empty batch."""
        with self._original_lock:
            if self._original is None and self.batch.arrays:
                self._original = np.concatenate(self.handed_arrays(), axis=None)  # one C-level pass
            return self._original

    def describe(self, e: int) -> str:
        """Where packed element e lies: "datum j, token i" (and ", column k" for [T, K] log-probs)."""
        j = bisect.bisect_right(list(itertools.accumulate(self.sizes)), e)
        i = e - sum(self.sizes[:j])
        shape = self.batch.shapes[j]
        if len(shape) == 1:
            return f"datum {j}, token {i}"
        return f"datum {j}, token {i // shape[1]}, column {i % shape[1]}"

    def leaves(self) -> List[Any]:
        """Torch tensors requiring grad to differentiate a term with respect to (torch.autograd.grad):
        fresh leaves sharing the log-probs' memory (inference tensors: through numpy, as they cannot
        require grad). Never the caller's own tensors, even when they are leaves: their hooks
        (register_hook) would run inside this term's autograd.grad too, so a hook that scales or clips
        the gradient was applied twice (once here, once in the caller's backward)."""
        import torch

        if not self.batch.is_torch or any(map(torch.Tensor.is_inference, self.detached)):
            source = torch_views(self.batch.arrays)
        else:
            source = self.detached
        return [t.detach().requires_grad_(True) for t in source]

    def as_given(self, flat: np.ndarray) -> List[Any]:
        """A packed float32 gradient of a widened batch per datum in the caller's float16 / bfloat16 dtype;
        a value beyond that dtype's range raises NonFiniteError naming datum and element."""
        return cast_back(flat, self.batch, self.original_dtypes, "composed gradient")

    def pack_autograd(self, grads: List[Any]) -> np.ndarray:
        """`flatten` for torch.autograd.grad's result: tensors autograd already shaped like the leaves, so no checks."""
        if not grads:
            return self.flatten(grads)
        import torch

        return _to_numpy(torch.cat(grads).reshape(-1)).astype(self.batch.dtype, copy=False)

    def flatten(self, grads: Any) -> np.ndarray:
        """One term's gradient as a packed 1-D array in the batch dtype; checks count, shapes and real-number dtypes."""
        dtype = self.batch.dtype
        if isinstance(grads, np.ndarray) and grads.ndim == 1 and not _is_sequence_of_arrays(grads):
            if grads.size != self.size:
                raise InputError(f"packed gradient has {grads.size} values; the batch has {self.size} log-probs")
            _check_real(grads.dtype, "packed gradient")
            return grads.astype(dtype, copy=False)
        if grads is None or isinstance(grads, (str, bytes, Mapping)) or not isinstance(grads, Iterable):
            raise InputError(f"gradient has type {type(grads).__name__}; expected a list with one gradient per datum")
        parts = list(grads)
        if len(parts) != len(self.batch.shapes):
            raise InputError(f"gradient has {len(parts)} entries; expected one per datum ({len(self.batch.shapes)})")
        if not _same_shapes(parts, self.batch.shapes):
            for i, (g, shape) in enumerate(zip(parts, self.batch.shapes)):
                if g is None or isinstance(g, (str, bytes, Mapping)):
                    raise InputError(
                        f"gradient of datum {i} has type {type(g).__name__}; expected an array of shape {tuple(shape)}"
                    )
                if tuple(np.shape(g) if not hasattr(g, "shape") else g.shape) != tuple(shape):
                    raise InputError(f"gradient of datum {i} has shape {tuple(np.shape(g))}; the log-probs have {tuple(shape)}")
        if not parts:
            return np.zeros(0, dtype)
        if all(hasattr(g, "detach") for g in parts):  # torch: one cat instead of one conversion per datum
            import torch

            if any(d.is_complex or d == torch.bool for d in set(map(_DTYPE, parts))):  # (one look per dtype)
                i = next(i for i, g in enumerate(parts) if g.dtype.is_complex or g.dtype == torch.bool)
                raise InputError(f"gradient of datum {i} has dtype {parts[i].dtype}; expected real numbers (float)")
            # the shapes match the batch's, one rank for all: row-major [ΣT_i(, K)] is the packed order
            return _to_numpy(torch.cat(parts).reshape(-1)).astype(dtype, copy=False)
        arrays = [_to_numpy(g) for g in parts]
        for i, a in enumerate(arrays):
            _check_real(a.dtype, f"gradient of datum {i}")
        return np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype, copy=False)


def _check_real(dtype: np.dtype, what: str) -> None:
    """A gradient holds real numbers: a bool, complex, string or object dtype would be cast silently (True
    as 1.0, the imaginary part dropped, "2" parsed)."""
    if dtype.kind not in "fiu":
        raise InputError(f"{what} has dtype {dtype}; expected real numbers (float)")


def _same_shapes(parts: List[Any], shapes: List[tuple]) -> bool:
    """True when every part has a `shape` equal to its datum's: one C-level comparison, no per-datum loop."""
    try:
        return list(map(_SHAPE, parts)) == shapes
    except (AttributeError, TypeError, ValueError):  # lists, scalars, odd shapes: the checking loop decides
        return False


def _is_sequence_of_arrays(a: np.ndarray) -> bool:
    return a.dtype == object


def _to_numpy(g: Any) -> np.ndarray:
    if hasattr(g, "detach"):
        g = g.detach().cpu()
        return (g.float() if str(g.dtype) == "torch.bfloat16" else g).numpy()  # numpy has no bfloat16
    return np.asarray(g)


_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")

Known = Tuple[float, Dict[str, float]]  # a term's value and metrics, before its gradient


class Cancelled(Exception):
    """Raised inside a term's numerical evaluations once a sibling term has failed."""


# ---------------------------------------------------------------------------------------------
# Checking what a fn returned


def split_output(out: Any) -> Tuple[Any, Dict[str, float]]:
    """`(loss, metrics)` from a fn's return value: a `(loss, dict)` tuple, or a bare loss."""
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"returned a tuple of {len(out)} items; expected (loss, metrics)")
        return out[0], metrics_dict(out[1])
    return out, {}


def metrics_dict(metrics: Any) -> Dict[str, float]:
    """A fn's metrics as {str: float}; None gives {}."""
    if metrics is None:
        return {}
    if type(metrics) is not dict and not isinstance(metrics, Mapping):  # skips typing's slow check for plain dicts
        raise TypeError(f"returned metrics of type {type(metrics).__name__}; expected a dict of floats")
    custom: Dict[str, float] = {}
    for key, value in metrics.items():
        number = metric_number(key, value)
        if not math.isfinite(number):  # telemetry is JSON: NaN / Infinity would make it invalid
            raise NonFiniteError(f"metric {key!r} is {number}")
        if str(key) in custom:
            raise TypeError(f"metric keys {key!r} and {str(key)!r} are the same key in telemetry (its keys are text)")
        custom[str(key)] = number
    return custom


def metric_number(key: Any, value: Any) -> float:
    """A metric value as a float: a real number (bools give 1.0 / 0.0) or a tensor / array holding one."""
    if hasattr(value, "detach"):  # a tensor metric: read it without touching its graph
        value = value.detach()
    if hasattr(value, "shape") and hasattr(value, "reshape"):  # tensors and arrays: one element, any shape
        size = int(np.prod(value.shape))
        if size != 1:
            raise TypeError(f"metric {key!r} has shape {tuple(value.shape)}; expected one number")
        value = value.reshape(-1)[0]
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r} is a {type(value).__name__}, not a float")
    if isinstance(value, (complex, np.complexfloating)) or getattr(getattr(value, "dtype", None), "is_complex", False):
        # (float() would keep the real part)
        raise TypeError(f"metric {key!r} is the complex number {value}; expected a real number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} is a {type(value).__name__}, not a float") from None
    except OverflowError:  # an int beyond float64
        raise NonFiniteError(f"metric {key!r} ({type(value).__name__}) is beyond the range of float64") from None


def scalar_value(loss: Any, *, batched: bool = False) -> float:
    """The loss as a finite float; it must be a 0-d tensor / array or a real number (shape [1] if batched)."""
    if type(loss) is float:  # the analytic routes' case, without the array round trip below
        if not math.isfinite(loss):
            raise NonFiniteError(f"loss is {loss}")
        return loss
    if isinstance(loss, bool):
        raise TypeError("returned a bool loss; expected a 0-d tensor or a float")
    shape = tuple(getattr(loss, "shape", ()))
    expected: Tuple[int, ...] = (1,) if batched else ()
    if hasattr(loss, "shape") and shape != expected:
        raise TypeError(f"returned a loss of shape {shape}; expected a scalar (shape {expected})")
    if hasattr(loss, "detach"):
        import torch

        if loss.dtype.is_complex or loss.dtype == torch.bool:  # .item() would give True or a complex
            raise TypeError(f"returned a loss of dtype {loss.dtype}; expected real numbers (a float tensor)")
        value = float(loss.detach().reshape(()).item())
    elif isinstance(loss, Real) and not isinstance(loss, np.generic):  # int, float, Fraction
        try:
            value = float(loss)
        except OverflowError:  # an int beyond float64
            raise NonFiniteError(f"loss ({type(loss).__name__}) is beyond the range of float64") from None
    elif isinstance(loss, (np.ndarray, np.generic)):
        array = np.asarray(loss)
        if array.dtype.kind not in "fiu":  # numpy would read True as 1.0, "2" as 2.0, drop an imaginary part
            raise TypeError(f"returned a loss of dtype {array.dtype}; expected real numbers (a float)")
        value = float(array.reshape(()))
    else:
        raise TypeError(f"returned a {type(loss).__name__} loss; expected a 0-d tensor or a float")
    if not math.isfinite(value):
        raise NonFiniteError(f"loss is {value}")
    return value


def carries_graph(loss: Any) -> bool:
    """True when loss is a torch tensor that autograd can differentiate."""
    return bool(getattr(loss, "requires_grad", False))


def autograd_grads(loss: Any, leaves: List[Any]) -> Optional[List[Any]]:
    """d(loss)/d(leaves) by torch autograd; leaves the loss does not use get zeros. None when the
    graph reaches no leaf at all (a loss rebuilt from detached values, e.g. via numpy)."""
    import torch

    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    if all(map(is_not, grads, repeat(None))):  # every leaf used: no per-datum check
        return list(grads)
    if leaves and all(g is None for g in grads):
        return None
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def requires_grad_error(err: BaseException) -> bool:
    # torch's message when numpy()/__array__ meets a tensor that requires grad
    return isinstance(err, RuntimeError) and "requires grad" in str(err)


def resolve(spec: Any) -> str:
    """The route decided without running fn: user / analytic / autograd / numerical..., or "probe" for auto."""
    if spec.grad != "auto":  # (a grad_fn made it "user": RegularizerSpec.__post_init__)
        return spec.grad
    if has_analytic(spec.fn):
        return "analytic"
    if _vectorized(spec) or _structure(spec) != "batch":
        return "numerical"  # such fns do not return one scalar for the plain batch: nothing to probe
    return "probe"


# ---------------------------------------------------------------------------------------------
# The numerical routes (regrad.numerical_grad)


def _guarded(fn: Callable[..., Any], cancel: Optional[threading.Event]) -> Callable[..., Any]:
    """fn that stops the engine (raises Cancelled) once a sibling has failed."""
    if cancel is None:
        return fn

    def guarded(data: Any, logprobs_list: Any) -> Any:
        if cancel.is_set():
            raise Cancelled("a sibling term failed")
        return fn(data, logprobs_list)

    return _named_like(guarded, fn)


def _named_like(wrapper: Callable[..., Any], fn: Any) -> Callable[..., Any]:
    """wrapper under fn's name, so the engine's errors name the user's fn, not regrad's wrapper."""
    wrapper.__qualname__ = wrapper.__name__ = (
        getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    )
    return wrapper


def _numerical(
    spec: Any, route: str, fn: Callable[..., Any], inputs: CallInputs, cancel: Optional[threading.Event],
    outs: Optional[List[Any]] = None,
) -> Tuple[Any, Optional[int], Optional[float], str]:
    """(grads, nfev, error estimate, grad_method label) from regrad.numerical_grad. outs: what the
    value calls returned, handed on as f0 where the engine would evaluate fn at x again."""
    from . import numerical_grad  # type: ignore[attr-defined]  # the C++ engine's Python face

    options = dict(spec.numerical_options)
    if route in ("spsa", "gaussian"):
        options["method"] = route
    # the engine evaluates fn outside torch.autocast (as regrad.numerical's backward does): its steps suit the
    # float32 / float64 log-probs, and bfloat16 matmuls round away a perturbation that small (a float32 loss
    # then gave an all-zero gradient, without a warning); a value call made under autocast is no f0 for it
    autocast = autocast_state()  # this thread's: the caller's, or the one a pooled term re-entered
    if outs is not None and not autocast and reads_f0(options.get("method", "central"), options.get("antithetic", True)):
        if _structure(spec) == "datum":
            options["f0"] = [split_output(out)[0] for out in outs]
        elif _structure(spec) == "batch" or not _vectorized(spec):  # (token + vectorized: no call to save)
            options["f0"] = split_output(outs[0])[0]
    if options.get("method") in ("spsa", "gaussian") and inputs.call > 1:
        # fresh directions each call (a training step), reproducibly: call k of a composed loss uses seed + k - 1
        # (one seed for every step would repeat the same directions and so the same estimator error each step)
        options["seed"] = (int(options.get("seed", 0)) + inputs.call - 1) % 2**64  # (the engine's seed range)
    if options.get("executor") is None:  # a remote executor must get fn itself (picklable)
        fn = _guarded(fn, cancel)
    with autocast_block(autocast, enabled=False):
        result = numerical_grad(fn, inputs.data, inputs.engine_copy(), **options)
    nfev = getattr(result, "nfev", None)
    method = str(options.get("method", "central"))
    # spsa / gaussian are their own labels however they were asked for (grad="spsa" or method="spsa")
    label = method if method in ("spsa", "gaussian") else "numerical" if method == "central" else f"numerical:{method}"
    return result.grads, (None if nfev is None else int(nfev)), _max_abs(getattr(result, "error", None)), label


def _max_abs(error: Any) -> Optional[float]:
    """The engine's error estimate as one float (max over tokens when it is per token)."""
    if error is None:
        return None
    if isinstance(error, (list, tuple)):
        parts = [_to_numpy(e).reshape(-1) for e in error]
        return float(np.max(np.abs(np.concatenate(parts)), initial=0.0)) if parts else 0.0  # (every datum may be empty)
    try:
        return float(np.max(np.abs(_to_numpy(error))))
    except (TypeError, ValueError):
        return None


def _vectorized(spec: Any) -> bool:
    return bool(spec.numerical_options.get("vectorized", False))


def _structure(spec: Any) -> str:
    """The engine's structure, canonical: "batch" (also "dense"), "datum" ("per_sequence") or "token"."""
    structure = spec.numerical_options.get("structure", "batch")
    return {"dense": "batch", "per_sequence": "datum", "per_token": "token"}.get(structure, structure)


def _value_calls(spec: Any, inputs: CallInputs) -> List[Tuple[Any, Any]]:
    """The unperturbed call(s) giving a numerical term's value, in the fn's own signature.

    structure "datum": fn(datum, logprobs) once per datum; otherwise fn(data, logprobs_list) once.
    A vectorized fn gets a leading copy dimension of 1.
    """
    vectorized = _vectorized(spec)
    if _structure(spec) == "datum":
        return [(d, x[None] if vectorized else x) for d, x in zip(inputs.data, inputs.detached)]
    return [(inputs.data, [x[None] for x in inputs.detached] if vectorized else inputs.detached)]


def _value_from(spec: Any, outs: List[Any]) -> Known:
    """(value, metrics) from the value calls: summed over data ("datum"; metrics averaged) or tokens ("token")."""
    vectorized = _vectorized(spec)
    if _structure(spec) == "token":
        losses, custom = split_output(outs[0])
        if isinstance(losses, np.ndarray) or hasattr(losses, "detach"):
            raise TypeError("structure='token' expects a list of per-token loss arrays, one per datum")
        return scalar_value(sum(float(np.sum(_to_numpy(p))) for p in losses)), custom
    value = 0.0
    merged: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for out in outs:
        loss, custom = split_output(out)
        value += scalar_value(loss, batched=vectorized)
        for key, v in custom.items():
            merged[key] = merged.get(key, 0.0) + v
            counts[key] = counts.get(key, 0) + 1
    # each metric averaged over the data that report it (a metric only some data have is not diluted by the rest)
    return scalar_value(value), {key: total / counts[key] for key, total in merged.items()}


# ---------------------------------------------------------------------------------------------
# Running a term: sync and async drivers of the same steps



def compute_term(spec: Any, inputs: CallInputs, cancel: Optional[threading.Event] = None) -> TermResult:
    """Value, metrics and packed gradient of one synchronous term, by the spec's route."""
    route = resolve(spec)
    if route == "analytic":
        value, grads, metrics = spec.fn.value_and_grad(inputs.data, inputs.batch.arrays)
        return _finish(scalar_value(value), metrics_dict(metrics), grads, "analytic", inputs)
    with _unchanged(inputs):  # user code sees the caller's memory from here on
        if route == "user":
            loss, custom = split_output(spec.fn(inputs.data, inputs.detached))
            value = scalar_value(loss)
            return _finish(value, custom, spec.grad_fn(inputs.data, inputs.detached), "user", inputs)
        known: Optional[Known] = None
        outs: Optional[List[Any]] = None  # what fn returned at x (the engine's f0 where it reads one)
        if route in ("autograd", "probe"):
            probed = _probe(spec, inputs)
            if isinstance(probed, TermResult):
                return probed
            known, route = probed, "numerical"
            if known is not None:  # the probe's loss (a plain batch fn: the only kind probed)
                outs = [known[0]]
        if known is None:
            outs = [spec.fn(*call) for call in _value_calls(spec, inputs)]
            known = _value_from(spec, outs)
        grads, nfev, error, label = _numerical(spec, route, spec.fn, inputs, cancel, outs)
    return _finish(known[0], known[1], grads, label, inputs, nfev=nfev, grad_error=error)


async def compute_term_async(spec: Any, inputs: CallInputs, cancel: Optional[threading.Event] = None) -> TermResult:
    """Value, metrics and packed gradient of an `async def` term; awaits fn (and an async grad_fn) here."""
    route = resolve(spec)
    loop = asyncio.get_running_loop()
    # this loop's thread runs fn: the caller's (asyncio.run of a sync call, acall), under its torch.autocast
    autocast = autocast_state()

    def blocking_fn(data: Any, logprobs_list: Any) -> Any:
        # the engine runs in a worker thread; each evaluation is awaited on this loop, outside autocast as
        # _numerical's (bfloat16 rounds away the engine's steps: an all-zero gradient for a float32 loss)
        coro = spec.fn(data, logprobs_list)
        if autocast:
            coro = _awaited(_InEachStep(coro, functools.partial(autocast_block, autocast, enabled=False)))
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    _named_like(blocking_fn, spec.fn)

    with _unchanged(inputs):
        if route == "user":
            loss, custom = split_output(await spec.fn(inputs.data, inputs.detached))
            value = scalar_value(loss)
            grads = spec.grad_fn(inputs.data, inputs.detached)
            if inspect.isawaitable(grads):
                grads = await grads
            return _finish(value, custom, grads, "user", inputs)
        known: Optional[Known] = None
        outs: Optional[List[Any]] = None  # what fn returned at x (the engine's f0 where it reads one)
        if route in ("autograd", "probe"):
            probed = await _probe_async(spec, inputs)
            if isinstance(probed, TermResult):
                return probed
            known, route = probed, "numerical"
            if known is not None:  # the probe's loss (a plain batch fn: the only kind probed)
                outs = [known[0]]
        if known is None:
            outs = [await spec.fn(*call) for call in _value_calls(spec, inputs)]
            known = _value_from(spec, outs)
        f0 = None if autocast else outs  # (a value call under autocast is no f0, see _numerical)
        grads, nfev, error, label = await asyncio.to_thread(_numerical, spec, route, blocking_fn, inputs, cancel, f0)
    return _finish(known[0], known[1], grads, label, inputs, nfev=nfev, grad_error=error)


@contextlib.contextmanager
def _unchanged(inputs: CallInputs) -> Iterator[None]:
    """Around user code handed the caller's log-probs as they are (user and numerical routes): if
    they differ from the values the call received, puts those back and fails the term (every term
    shares the memory)."""
    saved = inputs.original()
    try:
        yield
    finally:  # (on an error too: the caller keeps its values; not once the call has returned)
        changed = inputs.restore_changed(saved)
    if changed:
        raise RuntimeError(
            f"the log-probs of datum {changed[0]} changed in place while this term ran (by its fn, or by a term "
            "running beside it); they were put back. Use out-of-place operations (np.sort(a), x.neg(); "
            "not a.sort(), x.neg_())"
        )


def _restore_changed(arrays: List[np.ndarray], saved: Optional[np.ndarray]) -> List[int]:
    """The data whose log-probs differ bit for bit from the packed snapshot (so NaN == NaN and
    -0.0 != 0.0), each put back; one packed comparison in the usual case that nothing changed."""
    if saved is None:
        return []
    bits = np.dtype(f"u{saved.itemsize}")
    now = np.concatenate(arrays, axis=None)
    differs = now.view(bits) != saved.view(bits)
    if not differs.any():
        return []
    ends = np.cumsum([a.size for a in arrays])
    changed = sorted(set(np.searchsorted(ends, np.flatnonzero(differs), side="right").tolist()))
    for j in changed:
        start = int(ends[j]) - arrays[j].size
        np.copyto(arrays[j], saved[start:int(ends[j])].reshape(arrays[j].shape))
    return changed


def _skip_probe(spec: Any, inputs: CallInputs) -> bool:
    return spec.grad != "autograd" and (not inputs.batch.is_torch or inputs.needs_detached.get(spec.name, False))


def _probe(spec: Any, inputs: CallInputs) -> Union[TermResult, Known, None]:
    """Runs fn on torch leaves: the autograd result, (value, metrics) if no graph, or None if not probed."""
    if _skip_probe(spec, inputs):  # (before importing torch: numpy batches run without it)
        return None
    import torch

    with _recording(torch):
        leaves = inputs.leaves()
        try:
            out = spec.fn(inputs.data, leaves)
        except RuntimeError as err:
            if not _retry_detached(spec, inputs, err):
                raise
            return None
        return _from_probe(spec, out, leaves, inputs)


def _recording(torch: Any) -> Any:
    """Grad mode on and inference mode off: under a caller's torch.inference_mode(), which
    enable_grad alone does not lift, fn's loss would carry no graph and the term would silently go
    numerical (or fail, for grad='autograd'), unlike the same term run on a pool thread."""
    stack = contextlib.ExitStack()
    if torch.is_inference_mode_enabled():
        stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


async def _probe_async(spec: Any, inputs: CallInputs) -> Union[TermResult, Known, None]:
    if _skip_probe(spec, inputs):  # (before importing torch: numpy batches run without it)
        return None
    import torch

    with _recording(torch):
        leaves = inputs.leaves()
    try:
        out = await _InEachStep(spec.fn(inputs.data, leaves), functools.partial(_recording, torch))
    except RuntimeError as err:
        if not _retry_detached(spec, inputs, err):
            raise
        return None
    with _recording(torch):
        return _from_probe(spec, out, leaves, inputs)


async def _awaited(awaitable: Any) -> Any:
    """awaitable as a coroutine (what run_coroutine_threadsafe takes)."""
    return await awaitable


class _InEachStep:
    """Awaits a coroutine inside context() during each of its steps only (grad mode on, autocast off). Both
    are per thread, not per task: a `with torch.enable_grad()` held across an await would leak into the
    tasks running meanwhile and, when they exit, turn recording off in the middle of this one."""

    def __init__(self, coro: Any, context: Callable[[], Any]) -> None:
        self._coro = coro
        self._context = context

    def __await__(self) -> Any:
        step, message = self._coro.send, None
        while True:
            try:
                with self._context():
                    yielded = step(message)
            except StopIteration as stop:
                return stop.value
            finally:  # an error thrown in (a cancellation) that comes back out must not cycle through this frame
                message = None
            try:
                message = yield yielded
                step = self._coro.send
            except GeneratorExit:
                self._coro.close()
                raise
            except BaseException as err:  # (a cancellation included) is thrown into the coroutine
                step, message = self._coro.throw, err


def _retry_detached(spec: Any, inputs: CallInputs, err: RuntimeError) -> bool:
    """A numpy-based fn rejected tensors that require grad: remember it and go numerical (auto only)."""
    if spec.grad == "autograd" or not requires_grad_error(err):
        return False
    inputs.needs_detached[spec.name] = True
    return True


def _from_probe(spec: Any, out: Any, leaves: List[Any], inputs: CallInputs) -> Union[TermResult, Known]:
    loss, custom = split_output(out)
    value = scalar_value(loss)
    if carries_graph(loss):
        grads = autograd_grads(loss, leaves)
        if grads is not None:
            return TermResult(value, custom, "autograd", inputs.pack_autograd(grads))
        if spec.grad == "autograd":
            raise TypeError(
                "grad='autograd' but the loss's autograd graph does not reach the log-probs (was it rebuilt "
                "from detached values, e.g. through numpy?); use grad='numerical'"
            )
    elif spec.grad == "autograd":
        raise TypeError("grad='autograd' but the loss carries no autograd graph (use grad='numerical')")
    # known value and metrics; only the gradient is left to the numerical route (auto: such a loss
    # would otherwise get an all-zero autograd gradient)
    return value, custom


def _finish(
    value: float,
    custom: Dict[str, float],
    grads: Any,
    method: str,
    inputs: CallInputs,
    *,
    nfev: Optional[int] = None,
    grad_error: Optional[float] = None,
) -> TermResult:
    return TermResult(value, custom, method, inputs.flatten(grads), nfev=nfev, grad_error=grad_error)
