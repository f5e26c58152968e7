"""Calling the user's loss on perturbed inputs: what fn receives, what it may return, and errors
that name fn and the perturbation. Shared by the finite-difference and randomized estimators.

The per-call helpers here are module-level and the objects picklable, so that chunks of calls
can run on any concurrent.futures.Executor, including a Dask `Client.get_executor()`.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import contextlib
import functools
import itertools
import math
import operator
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._arrays import ArrayBatch, _torch_float_dtypes, is_torch_tensor, plain_cpu_layout
from .errors import InputError, NonFiniteError, NumericalError

POINT_LABELS = {
    "forward": ("+h",),
    "central": ("+h", "-h"),
    "richardson": ("+h", "-h", "+h/2", "-h/2"),
}


_SHAPE = operator.attrgetter("shape")
_VERSION = operator.attrgetter("_version")  # a torch tensor's in-place modification counter
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def fn_name(fn: Any) -> str:
    """A readable name for fn in error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"fn {name!r}"


# Where a call happened, for error messages: a string, or a function building it (only on error).
Where = Union[str, Callable[[], str]]


def _text(where: Where) -> str:
    return where if isinstance(where, str) else where()


def _torch_from_numpy() -> Callable[[np.ndarray], Any]:
    import torch

    return torch.from_numpy


def _torch_tensor() -> type:
    """torch.Tensor (imported on first use)."""
    import torch

    return torch.Tensor


def _plain_loss(out: Any, tensor: Any) -> Any:
    """fn's loss as a Python number when fn returned a float, a numpy float or a 0-d `tensor`, alone
    or in a (loss, metrics) pair; else None (scalar_loss then checks and converts it)."""
    kind = type(out)
    if kind is tuple:
        out = split_loss(out)
        kind = type(out)
    if kind is float or kind is np.float64 or kind is np.float32:
        return float(out)
    if kind is tensor and out.dim() == 0 and out.is_floating_point():
        return out.item()
    return None


def _is_torch_scalar(x: Any) -> bool:
    return is_torch_tensor(x) and x.dim() == 0


def split_loss(out: Any) -> Any:
    """The loss part of fn's return value: element 0 of a (loss, metrics) pair, else the value."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0]
    return out


class NotRealNumbers(TypeError):
    """fn returned something that is not a real number or an array of them (None, a string, a dict,
    a bool, a complex number)."""


def real_array(value: Any) -> np.ndarray:
    """fn's value as float64. Only real numbers (floats, ints) count: numpy would read None as NaN,
    "1" as 1.0 and True as 1.0, and drop a complex value's imaginary part with a warning."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        if value.is_complex() or value.dtype == _torch_bool():
            raise NotRealNumbers(f"{type(value).__name__} of {value.dtype}")
        return value.detach().cpu().double().numpy()
    if value is None or isinstance(value, (str, bytes, Mapping)):
        raise NotRealNumbers(type(value).__name__)
    if type(value) is int:  # numpy reads an int past 64 bits as an object array: read it as the float it is
        try:
            return np.asarray(float(value))
        except OverflowError:
            raise NotRealNumbers("int beyond float64's range") from None
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as err:  # (ragged lists)
        raise NotRealNumbers(type(value).__name__) from err
    if a.dtype.kind not in "fiu":
        scalar_or_objects = a.ndim == 0 or a.dtype.kind == "O"
        raise NotRealNumbers(type(value).__name__ if scalar_or_objects else f"{type(value).__name__} of {a.dtype}")
    return a.astype(np.float64, copy=False)


def _torch_bool() -> Any:
    import torch

    return torch.bool


def float_views(values: Sequence[Any]) -> Optional[List[np.ndarray]]:
    """Per-token losses in C-level passes: numpy float arrays as they are, CPU float tensors without grad
    as numpy views; None for anything else (the caller's checked per-datum path)."""
    if all(type(v) is np.ndarray and v.dtype.kind == "f" for v in values):
        return list(values)
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        views = list(map(torch.Tensor.numpy, values))
    except (RuntimeError, TypeError):  # not tensors, grad, CUDA, negative views, bfloat16
        return None
    return views if all(v.dtype.kind == "f" for v in views) else None


def _float_view(value: Any) -> np.ndarray:
    """A float32/float64 numpy view of a CPU tensor or array when possible (no copy), else float64."""
    if is_torch_tensor(value) and value.dtype in _torch_float_dtypes():
        return value.detach().cpu().resolve_neg().numpy()  # (a negative view has no numpy() of its own)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value
    return real_array(value)


@dataclass
class Term:
    """A part of the loss that the engine perturbs on its own: all data (structure "batch") or one
    datum (structure "datum"). Elements [e0, e1) of the packed batch belong to it."""

    datums: List[int]
    e0: int
    e1: int

    @property
    def size(self) -> int:
        return self.e1 - self.e0


_NARROW_EPS: dict = {}  # dtype -> machine epsilon if narrower than float64, else 0.0 (filled on first sight)


def narrow_eps(value: Any) -> float:
    """Machine epsilon of a loss value's dtype when it is a float narrower than float64 (numpy or
    torch float32 / float16 / bfloat16), else 0.0 (Python floats, float64, lists)."""
    dtype: Any = getattr(value, "dtype", None)
    eps = _NARROW_EPS.get(dtype)
    if eps is None:
        if isinstance(dtype, np.dtype):
            eps = float(np.finfo(dtype).eps) if dtype.kind == "f" and dtype.itemsize < 8 else 0.0
        elif getattr(dtype, "is_floating_point", False) and getattr(dtype, "itemsize", 8) < 8:
            import torch

            eps = float(torch.finfo(dtype).eps)
        else:
            eps = 0.0
        if dtype is not None:
            _NARROW_EPS[dtype] = eps
    return eps


@dataclass
class Problem:
    """The prepared inputs of one numerical-gradient run (picklable)."""

    fn: Callable[..., Any]
    data: Any
    structure: str
    batch: ArrayBatch  # working arrays (widened if needed), C-contiguous, never modified
    offsets: np.ndarray  # int64 [B + 1] element offsets of the packed layout
    width: int
    # the largest machine epsilon of fn's losses seen so far when narrower than float64 (a float32
    # loss of float64 log-probs rounds at 1e-7, not 1e-16: the error estimate must use it)
    loss_eps: float = 0.0
    # the caller's losses at x (numerical_grad's f0=, see _f0.py): [loss] ("batch"), one per datum
    # ("datum"), one per-token array per datum ("token"); None: fn is called for them
    f0: Optional[List[Any]] = None

    def see_loss(self, value: Any) -> None:
        """Notes the precision of a loss value fn returned (one attribute read; no copy)."""
        eps = narrow_eps(value)
        if eps > self.loss_eps:
            self.loss_eps = eps

    @property
    def arrays(self) -> List[np.ndarray]:
        """numpy views of the log-probs (made on first use for a plain torch batch)."""
        return self.batch.arrays

    @property
    def is_torch(self) -> bool:
        return self.batch.is_torch

    @property
    def sizes(self) -> List[int]:
        """Elements per datum."""
        return self.batch.sizes

    @property
    def name(self) -> str:
        return fn_name(self.fn)

    def fn_view(self, a: np.ndarray) -> Any:
        """What fn receives for an array the engine owns: a torch view, or a read-only numpy view."""
        if self.is_torch:
            import torch

            return torch.from_numpy(a)
        v = a.view()
        v.flags.writeable = False
        return v

    def no_grad(self) -> Any:
        """torch.no_grad() for torch problems where grad mode is on (a no-op context otherwise)."""
        if self.is_torch:
            import torch

            if torch.is_grad_enabled():
                return torch.no_grad()
        return contextlib.nullcontext()

    def term_arrays(self, term: Term) -> List[np.ndarray]:
        return [self.arrays[j] for j in term.datums]

    def bind(self, term: Term, inputs: Sequence[Any]) -> Callable[[], Any]:
        """fn on the term's inputs as a call without arguments (batch: a fresh list on every call)."""
        if self.structure == "datum":
            return functools.partial(self.fn, self.data[term.datums[0]], inputs[0])
        return lambda: self.fn(self.data, list(inputs))

    def modified_error(self, where: Where) -> NumericalError:
        """fn changed the log-probs it was given in place, which the engine reuses between calls."""
        return NumericalError(
            f"{self.name} modified its input log-probs in place (found after {_text(where)}); the engine reuses "
            "them between calls, so later evaluations and the gradient would be wrong: use out-of-place "
            "operations (x.neg(), np.sort(a); not x.neg_(), a.sort())"
        )

    def fn_error(self, err: Exception, where: Where) -> NumericalError:
        """The error raised for an exception of fn at `where`."""
        return NumericalError(f"{self.name} raised {type(err).__name__}: {err} (at {_text(where)})")

    def invoke(self, term: Term, inputs: Sequence[Any], where: Where) -> Any:
        """Calls fn on the term's inputs; an exception names fn and `where`."""
        try:
            out = self.bind(term, inputs)()
        except Exception as err:
            raise self.fn_error(err, where) from err
        return split_loss(out)

    def invoke_unmodified(self, term: Term, inputs: Sequence[Any], where: Where, one_base: bool = False) -> Any:
        """invoke, for inputs whose values the engine reads again after the call (the token structure
        recomputes its steps from the points): an in-place torch op on them raises modified_error.
        one_base: the inputs are views of one tensor, which share its version counter (one read).
        numpy inputs are read-only views already."""
        if not self.is_torch or not inputs:
            return self.invoke(term, inputs, where)
        versions = (lambda: inputs[0]._version) if one_base else (lambda: list(map(_VERSION, inputs)))
        before = versions()
        out = self.invoke(term, inputs, where)
        if versions() != before:
            raise self.modified_error(where)
        return out

    def not_numbers(self, out: Any, where: Where, expected: str, err: Optional[NotRealNumbers] = None) -> NumericalError:
        """The error for a return value that holds no real numbers (None, a string, a bool, a complex, ...)."""
        what = str(err) if err is not None and str(err) else type(out).__name__
        return NumericalError(f"{self.name} returned {what} at {_text(where)}; expected {expected}")

    def scalar_loss(self, out: Any, where: Where) -> float:
        kind = type(out)
        if kind is float or kind is np.float64 or kind is np.float32:
            value = float(out)
        elif _is_torch_scalar(out) and out.is_floating_point():
            value = out.item()
        else:
            try:
                a = real_array(out)
            except NotRealNumbers as err:
                raise self.not_numbers(out, where, "a scalar loss (a float or a 0-d tensor)", err) from None
            if a.ndim != 0:
                raise NumericalError(
                    f"{self.name} returned shape {tuple(a.shape)} at {_text(where)}; structure={self.structure!r} "
                    "expects a scalar loss (for one loss per perturbed copy use vectorized=True, for "
                    "per-token losses structure='token')"
                )
            value = float(a)
        if not math.isfinite(value):
            raise NonFiniteError(f"{self.name} returned the non-finite loss {value} at {_text(where)}")
        return value

    def vector_loss(self, out: Any, count: int, where: Where) -> np.ndarray:
        """One loss per perturbed copy, float32 or float64 (a view where fn's output allows)."""
        try:
            a = _float_view(out)
        except NotRealNumbers as err:
            raise self.not_numbers(out, where, f"one loss per perturbed copy, shape ({count},)", err) from None
        if a.shape == (count,) and math.isfinite(np.add.reduce(a)):
            return a  # the common case: one reduction checks every value (an overflowing sum is re-checked below)
        where = _text(where) if a.shape != (count,) or not np.all(np.isfinite(a)) else ""
        if a.shape != (count,):
            raise NumericalError(
                f"{self.name} returned shape {tuple(a.shape)} for {where}; vectorized=True expects one loss per "
                f"perturbed copy, shape ({count},)"
            )
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise NonFiniteError(f"{self.name} returned the non-finite loss {a[bad[0]]} for copy {bad[0]} of {where}")
        return a

    def token_values(self, out: Any, where: str, stacked: Optional[List[tuple]] = None) -> Any:
        """Checks per-token losses (one array shaped like each datum's log-probs, or like its
        `stacked` copies) and returns numpy views of them (float32 / float64 when fn's are; the core
        checks finiteness and dtype). Stacked plain contiguous CPU float tensors of one dtype: their
        addresses and dtype instead, which token_quotients reads without a numpy view per datum."""
        shapes = stacked if stacked else self.batch.shapes
        if not isinstance(out, (list, tuple)):
            single = "scalar" if np.ndim(out) == 0 else "array"
            raise NumericalError(
                f"{self.name} returned a single {single} at {where}; structure='token' expects a list of "
                f"{len(shapes)} per-token loss arrays shaped like {'its inputs' if stacked else 'the log-probs'}"
            )
        if len(out) != len(shapes):
            raise NumericalError(
                f"{self.name} returned {len(out)} per-token loss arrays at {where}; the batch has {len(shapes)} data"
            )
        # The common case in C-level passes: arrays or tensors of the right shapes, then numpy views
        # of CPU tensors without grad. Anything else takes the checked per-datum path.
        try:
            same = list(map(_SHAPE, out)) == shapes
        except AttributeError:
            same = False
        if not same:
            self._check_token_shapes(out, shapes, where, bool(stacked))
        if self.is_torch and stacked:
            layout = plain_cpu_layout(out)
            if layout is not None:
                return layout[1], "float64" if layout[0] == np.float64 else "float32"
        views = float_views(out)
        if views is not None:
            return views
        return [self._token_floats(p, f"{where} (datum {j})") for j, p in enumerate(out)]

    def _token_floats(self, p: Any, where: str) -> np.ndarray:
        try:
            return _float_view(p)
        except NotRealNumbers as err:
            raise self.not_numbers(p, where, "per-token losses (an array of real numbers)", err) from None

    def _check_token_shapes(self, out: Sequence[Any], shapes: List[tuple], where: str, stacked: bool) -> None:
        for j, (p, s) in enumerate(zip(out, shapes)):
            if not hasattr(p, "shape"):  # None, a string, a list: what it holds before what shape it has
                p = self._token_floats(p, f"{where} (datum {j})")
            if tuple(p.shape) != s:
                what = "its stacked copies" if stacked else "its log-probs"
                raise NumericalError(
                    f"{self.name} returned per-token losses of shape {tuple(np.shape(p))} for datum {j} at {where}; "
                    f"expected {tuple(s)}, the shape of {what}"
                )

    def packed_views(self, row: np.ndarray) -> List[Any]:
        """What fn receives for a packed [n] row the engine owns: per-datum views shaped like the log-probs."""
        if self.is_torch:
            import torch

            parts = torch.from_numpy(row).split_with_sizes(self.sizes)
            return list(parts) if len(self.batch.shapes[0]) == 1 else [p.view(s) for p, s in zip(parts, self.batch.shapes)]
        view = row.view()
        view.flags.writeable = False
        bounds = self.offsets.tolist()
        return [view[bounds[j] : bounds[j + 1]].reshape(s) for j, s in enumerate(self.batch.shapes)]

    def stacked_views(self, points: np.ndarray, shapes: List[tuple]) -> List[Any]:
        """What a vectorized per-token fn receives: datum j's copies as one contiguous [rows, *shape_j]
        view of the stacked points (`shapes`; read-only for numpy)."""
        rows = shapes[0][0] if shapes else 0
        if self.is_torch:
            import torch

            flat = torch.from_numpy(points)
            if len(set(shapes)) == 1:  # equal shapes: one view and one unbind
                return list(flat.view((len(shapes),) + shapes[0]).unbind(0))
            parts = flat.split_with_sizes([rows * s for s in self.sizes])
            if len(shapes[0]) == 2:  # [T] data
                return [p.view(rows, -1) for p in parts]  # integer arguments parse faster than a shape tuple
            return [p.view(s) for p, s in zip(parts, shapes)]
        view = points.view()
        view.flags.writeable = False
        bounds = (self.offsets * rows).tolist()
        return [view[bounds[j] : bounds[j + 1]].reshape(s) for j, s in enumerate(shapes)]

    def describe_element(self, e: int) -> str:
        j = int(np.searchsorted(self.offsets, e, side="right") - 1)
        i = e - int(self.offsets[j])
        if self.width == 1:
            return f"datum {j}, token {i}"
        return f"datum {j}, token {i // self.width}, column {i % self.width}"

    def describe_difference(self, q: int, term: Term, method: str) -> str:
        labels = POINT_LABELS[method]
        e = term.e0 + q // len(labels)
        return f"perturbation {q} of {term.size * len(labels)}: {self.describe_element(e)}, step {labels[q % len(labels)]}"


class BufferPool:
    """One flat allocation reused for every block of a run (blocks of different terms included).
    shared() keeps one per thread across runs (up to KEEP_BYTES), so repeated training steps do
    not pay the page faults of a fresh allocation."""

    KEEP_BYTES = 64 << 20
    _local = threading.local()

    def __init__(self) -> None:
        self._flat = np.empty(0, np.uint8)
        self._key: Any = None  # (rows, dtypes and shapes) of the views last handed out
        self._views: List[np.ndarray] = []

    @classmethod
    def shared(cls) -> "BufferPool":
        """This thread's pool, or a fresh one while it is in use (fn calling numerical_grad itself)."""
        pool = getattr(cls._local, "pool", None)
        if pool is None:
            pool = cls._local.pool = cls()
        if pool._busy:
            return cls()
        pool._busy = True
        return pool

    _busy = False

    def release(self) -> None:
        """Ends a run; drops a large buffer so a one-off big run does not pin memory."""
        self._busy = False
        self._key, self._views = None, []
        if self._flat.nbytes > self.KEEP_BYTES:
            self._flat = np.empty(0, np.uint8)

    def flat(self, nbytes: int) -> np.ndarray:
        """The flat buffer, at least nbytes long (views handed out earlier may no longer be valid)."""
        if nbytes > self._flat.nbytes:
            self._flat = np.empty(nbytes, np.uint8)
            self._key, self._views = None, []
        return self._flat

    def views(self, arrays: Sequence[np.ndarray], rows: int) -> List[np.ndarray]:
        """[rows, *shape] buffers for the arrays (the same views again while rows and shapes repeat)."""
        key = (rows, [(a.dtype, a.shape) for a in arrays])
        if key == self._key:
            return self._views
        sizes = [rows * a.nbytes for a in arrays]
        if sum(sizes) > self._flat.nbytes:
            self._flat = np.empty(sum(sizes), np.uint8)
        out, start = [], 0
        for a, nbytes in zip(arrays, sizes):
            out.append(self._flat[start : start + nbytes].view(a.dtype).reshape((rows,) + a.shape))
            start += nbytes
        self._key, self._views = key, out
        return out


class StackedPoints:
    """The buffer a vectorized per-token fn reads (every datum's [R, *shape] copies, flat) and fn's
    views of it, kept per thread while the shapes repeat: a training step then reuses both instead
    of making B views (~1 us each) again. Like BufferPool's blocks, fn must copy what it keeps."""

    _local = threading.local()

    def __init__(self) -> None:
        self.key: Any = None  # (dtype, is_torch, rows, shapes) of the buffer and views
        self.points = np.empty(0)
        self.views: List[Any] = []
        self.shapes: List[tuple] = []  # [rows, *shape_j] of each view
        self.term = Term([], 0, 0)  # every datum
        self.busy = False

    @classmethod
    def acquire(cls, problem: Problem, rows: int) -> "StackedPoints":
        """This thread's buffer sized for `rows` copies of every datum (a fresh one while it is in use)."""
        held = getattr(cls._local, "held", None)
        if held is None:
            held = cls._local.held = cls()
        if held.busy:
            held = cls()
        held.busy = True
        batch = problem.batch
        key = (batch.dtype, batch.is_torch, rows, batch.shapes)
        if key != held.key:
            n = int(problem.offsets[-1])
            held.points = np.empty(rows * n, batch.dtype)
            held.shapes = [(rows,) + s for s in batch.shapes]
            held.views = problem.stacked_views(held.points, held.shapes)
            held.term = Term(list(range(len(held.shapes))), 0, n)
            held.key = key if held.points.nbytes <= BufferPool.KEEP_BYTES else None
        return held

    def untouched(self) -> bool:
        """Whether fn, in a run that succeeded, left its views fit for the next run on this thread. torch:
        no autograd state (requires_grad_(), then a .grad from a backward) that the next fn would inherit;
        in-place changes of shape or values are refused by the run itself (the version counter). numpy:
        the shapes (fn may assign .shape to a view). One C-level pass, ~0.5 us for 8 views."""
        views = self.views
        if views and hasattr(views[0], "requires_grad"):
            return not any(map(_REQUIRES_GRAD, views))
        return list(map(_SHAPE, views)) == self.shapes

    def release(self, keep: bool = True) -> None:
        """Ends a run; keep=False (the run failed, or fn changed its views) drops the buffer and views,
        so the next run on this thread makes fresh ones instead of inheriting what fn did to them."""
        self.busy = False
        if self.key is None or not keep:  # too large to keep, or not as handed out
            self.key = None
            self.points, self.views = np.empty(0), []


# ---- chunks of calls (run in the caller's thread or on an executor) -------------------------------


def difference_scalar_chunk(
    problem: Problem, term: Term, points: np.ndarray, method: str, q_begin: int, q_end: int
) -> np.ndarray:
    """Losses at perturbations [q_begin, q_end), one call each: the perturbed datum is a private
    copy in which one element is set, fn is called, and the element is restored."""
    npoints = len(POINT_LABELS[method])
    offsets = problem.offsets.tolist()
    inputs: List[Any] = [problem.fn_view(problem.arrays[j]) for j in term.datums]
    losses: List[Any] = []
    flight = take_chunk_flight()
    with problem.no_grad():
        q = q_begin
        while q < q_end:  # perturbations come in element order: one pass per datum they touch
            j = bisect.bisect_right(offsets, term.e0 + q // npoints) - 1
            stop = min(q_end, (offsets[j + 1] - term.e0) * npoints)
            losses += _datum_losses(problem, term, inputs, j - term.datums[0], points, npoints, method, q, stop, flight)
            q = stop
    return np.array(losses, np.float64)


def _datum_losses(
    problem: Problem, term: Term, inputs: List[Any], slot: int, points: np.ndarray, npoints: int, method: str,
    q_begin: int, q_end: int, flight: Optional["_InFlight"] = None,
) -> List[Any]:
    """Losses at perturbations [q_begin, q_end), all in the datum fn gets as inputs[slot]: points and
    original values are read as Python floats up front, and floats and 0-d tensors skip scalar_loss."""
    j = term.datums[slot]
    first = q_begin // npoints  # the first element perturbed here, counted from the term's start
    values = points[:, term.e0 + first : term.e0 + (q_end - 1) // npoints + 1].T.ravel().tolist()
    shift = first * npoints  # values[q - shift] is the point of perturbation q
    i0 = term.e0 + first - int(problem.offsets[j])  # that element's index in the datum
    work = problem.arrays[j].copy()
    flat = work.reshape(-1)
    originals = flat[i0 : i0 + len(values) // npoints].tolist()
    inputs[slot] = problem.fn_view(work)
    call = problem.bind(term, inputs)
    tensor = _torch_tensor() if problem.is_torch else None
    isfinite = math.isfinite
    losses = []
    for q in range(q_begin, q_end):
        if flight is not None and flight._stopped:  # (see take_chunk_flight)
            raise _Stopped("the run stopped")
        r = q // npoints - first
        flat[i0 + r] = values[q - shift]
        try:
            out = call()
        except Exception as err:
            raise problem.fn_error(err, problem.describe_difference(q, term, method)) from err
        value = _plain_loss(out, tensor)
        if value is None or not isfinite(value):  # the checked path, which raises for a non-finite value
            where = functools.partial(problem.describe_difference, q, term, method)
            value = problem.scalar_loss(split_loss(out), where)
        losses.append(value)
        flat[i0 + r] = originals[r]
    if q_end > q_begin:
        problem.see_loss(split_loss(out))  # the precision of fn's losses (one look per datum chunk)
    # fn wrote into its input (an in-place torch op bumps the fresh views' counters; numpy writes change work)
    if (problem.is_torch and any(map(_VERSION, inputs))) or not np.array_equal(work, problem.arrays[j]):
        raise problem.modified_error(problem.describe_difference(q_end - 1, term, method))
    inputs[slot] = problem.fn_view(problem.arrays[j])  # back to the shared original
    return losses


class DifferenceWriter:
    """Writes blocks of one-element perturbations; after the first block only the elements that
    change are rewritten (the buffers hold x everywhere else)."""

    def __init__(self, points: np.ndarray, method: str, torch_fill: bool = False) -> None:
        self.points = points
        self.method = method
        self.npoints = len(POINT_LABELS[method])
        self.torch_fill = torch_fill  # first block: x copied into the rows by torch (see _torch_fill)
        self._prev: Optional[tuple] = None

    def reset(self) -> None:
        self._prev = None

    def write(self, arrays: List[np.ndarray], buffers: List[np.ndarray], term: Term, q: int, count: int) -> None:
        prev = self._prev
        if prev is None and self.torch_fill:
            _torch_fill(arrays, buffers)
            prev = (q, count)  # every row holds x: restoring this block's elements first is harmless
        if prev is None:
            _core.difference_block(arrays, buffers, self.points, term.e0, self.npoints, q, count, True)
        else:
            _core.difference_block(arrays, buffers, self.points, term.e0, self.npoints, q, count, False, *prev)
        self._prev = (q, count)

    def describe(self, problem: Problem, term: Term, q: int, count: int) -> str:
        return (
            f"the block of perturbations [{q}, {q + count}) of {term.size * self.npoints} "
            f"({problem.describe_difference(q, term, self.method)} first)"
        )


def _torch_fill(arrays: List[np.ndarray], buffers: List[np.ndarray]) -> None:
    """x into every row of the buffers by torch's copy, which splits the rows over torch's threads as
    fn's own ops do, so each thread rewrites lines it read in fn's last call (one thread taking over
    lines that other cores read cost 4-15x the copy on a two-core host with torch on both)."""
    import torch

    for a, b in zip(arrays, buffers):
        torch.from_numpy(b).copy_(torch.from_numpy(a))


class RandomWriter:
    """Writes rows x +- scale * u_s with directions regenerated from (seed, sample, element)."""

    # Direction components per call of the core's RNG loops (random_block, random_estimate): ~0.1 s on two
    # cores. The GIL is released inside a call but Ctrl-C is handled only between calls (a 16M-element
    # Gaussian copy took 0.6 s in one call; random_estimate for 4M elements and 64 samples, 5 s).
    PIECE = 1 << 22

    def __init__(self, scale: np.ndarray, kind: str, seed: int, antithetic: bool) -> None:
        self.scale = scale
        self.kind = kind
        self.seed = seed
        self.antithetic = antithetic

    def reset(self) -> None:
        pass

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # an unpickled scale may be unaligned (see ArrayBatch.__setstate__), which the core refuses
        self.scale = np.require(self.scale, requirements=["C", "A"])

    def write(self, arrays: List[np.ndarray], buffers: List[np.ndarray], term: Term, q: int, count: int) -> None:
        if count * term.size <= self.PIECE:  # the common case (blocks are capped at 4 MiB): one call
            _core.random_block(
                arrays, self.scale[term.e0 : term.e1], self.kind, self.seed, term.e0, self.antithetic, buffers, q, count
            )
            return
        # Row by row, in ranges of PIECE elements of the term (whole data, or parts of one): each component
        # depends only on its element and row, so the bits are those of one call.
        flats = [a.reshape(-1) for a in arrays]
        starts = list(itertools.accumulate((a.size for a in flats), initial=0))
        for r in range(count):
            rows = [b[r].reshape(1, -1) for b in buffers]  # (1, len) slices of these stay C-contiguous
            for p0 in range(0, term.size, self.PIECE):
                p1 = min(p0 + self.PIECE, term.size)
                parts: List[np.ndarray] = []  # the data (or parts of one) in elements [p0, p1) of the term
                outs: List[np.ndarray] = []
                for j in range(bisect.bisect_right(starts, p0) - 1, len(flats)):
                    if starts[j] >= p1:
                        break
                    i0, i1 = max(p0, starts[j]) - starts[j], min(p1, starts[j + 1]) - starts[j]
                    if i0 < i1:
                        parts.append(flats[j][i0:i1])
                        outs.append(rows[j][:, i0:i1])
                e0 = term.e0 + p0
                _core.random_block(
                    parts, self.scale[e0 : term.e0 + p1], self.kind, self.seed, e0, self.antithetic, outs, q + r, 1
                )

    def describe(self, problem: Problem, term: Term, q: int, count: int) -> str:
        def one(r: int) -> str:
            if self.antithetic:
                return f"sample {r // 2}, {'+' if r % 2 == 0 else '-'} direction"
            return f"sample {r}"

        what = "datum " + str(term.datums[0]) + ", " if problem.structure == "datum" else ""
        if count == 1:
            return f"perturbation {q} ({what}{one(q)})"
        return f"the block of perturbations [{q}, {q + count}) ({what}{one(q)} first)"


def block_chunk(
    problem: Problem,
    term: Term,
    writer: Any,
    q_begin: int,
    q_end: int,
    rows: int,
    vectorized: bool,
    pool: Optional[BufferPool] = None,
    progress: Any = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Losses at perturbations [q_begin, q_end) written `rows` at a time by `writer` into buffers
    (and into `out`, [q_end - q_begin], when given); fn gets the whole block (vectorized) or, with
    rows == 1, the single perturbed copy."""
    arrays = problem.term_arrays(term)
    buffers = (pool or BufferPool()).views(arrays, rows)
    writer.reset()
    out = np.empty(q_end - q_begin) if out is None else out
    flight = take_chunk_flight()
    with problem.no_grad():
        for q in range(q_begin, q_end, rows):
            if flight is not None and flight._stopped:  # (see take_chunk_flight)
                raise _Stopped("the run stopped")
            count = min(rows, q_end - q)
            writer.write(arrays, buffers, term, q, count)
            where = functools.partial(writer.describe, problem, term, q, count)
            if vectorized:
                inputs = [problem.fn_view(b[:count]) for b in buffers]
                loss = problem.invoke(term, inputs, where)
                out[q - q_begin : q - q_begin + count] = problem.vector_loss(loss, count, where)
                problem.see_loss(loss)
                if problem.is_torch and any(map(_VERSION, inputs)):  # an in-place op (fresh views start at 0)
                    raise problem.modified_error(where)  # the next block rewrites only what changes
            else:
                inputs = [problem.fn_view(b[0]) for b in buffers]
                loss = problem.invoke(term, inputs, where)
                out[q - q_begin] = problem.scalar_loss(loss, where)
                if q == q_begin:
                    problem.see_loss(loss)
                if problem.is_torch and any(map(_VERSION, inputs)):  # an in-place op, as for blocks and scalar differences
                    raise problem.modified_error(where)
            if progress is not None:
                progress.update(1)
    return out


def datum_blocks(
    problem: Problem, terms: Sequence[Term], writer: "DifferenceWriter", f: np.ndarray, pool: BufferPool,
    progress: Any = None,
) -> None:
    """Structure "datum", vectorized, every datum's perturbations in one block: f[e0 * P : e1 * P] of
    each term from one call of fn on [P * size, *shape] copies. The lean form of block_chunk for the
    common case (a few Python operations per datum); the same bits, checks and error texts."""
    npoints = writer.npoints
    batch = problem.batch
    dtype = batch.dtype
    flat = pool.flat(max(t.size * t.size for t in terms) * npoints * dtype.itemsize)  # [P * size, size] copies
    # x into every row: torch's copy for torch inputs (see _torch_fill), numpy's broadcast otherwise.
    sources = (batch.tensors or list(map(_torch_from_numpy(), batch.arrays))) if problem.is_torch else batch.arrays
    views: dict = {}  # datum shape -> (buffer, what fn gets)
    fn, data, points, diagonal = problem.fn, problem.data, writer.points, _core.difference_diagonal
    for term in terms:
        j = term.datums[0]
        shape = batch.shapes[j]
        count = term.size * npoints
        held = views.get(shape)
        if held is None:
            buffer = flat[: count * term.size * dtype.itemsize].view(dtype).reshape((count,) + tuple(shape))
            given = problem.fn_view(buffer)
            held = views[shape] = (buffer, given, given.copy_ if problem.is_torch else functools.partial(np.copyto, buffer))
        buffer, given, fill = held
        fill(sources[j])
        diagonal(buffer, points, term.e0, npoints)
        version = given._version if problem.is_torch else 0
        try:
            out = fn(data[j], given)
        except Exception as err:
            raise problem.fn_error(err, functools.partial(writer.describe, problem, term, 0, count)) from err
        if problem.is_torch and given._version != version:  # an in-place op: the same rule as block_chunk's
            raise problem.modified_error(writer.describe(problem, term, 0, count))
        if type(out) is tuple:
            out = split_loss(out)
        try:  # a plain CPU tensor (~1 us); else (grad, negative view, numpy, list, ...) the checked view
            values = out.numpy()
        except (AttributeError, RuntimeError, TypeError):
            values = problem.vector_loss(out, count, functools.partial(writer.describe, problem, term, 0, count))
        if values.shape != (count,) or values.dtype.kind not in "fiu":  # raises the shape or not-numbers error
            # (out.numpy() also reads a bool or complex tensor, which vector_loss refuses as block_chunk does)
            problem.vector_loss(out, count, functools.partial(writer.describe, problem, term, 0, count))
        f[term.e0 * npoints : term.e1 * npoints] = values  # now: fn's output may be a view of its input
        problem.see_loss(out)
        if progress is not None:
            progress.update(1)
    if not math.isfinite(np.add.reduce(f)) and not np.all(np.isfinite(f)):
        q = int(np.flatnonzero(~np.isfinite(f))[0])
        term = next(t for t in terms if q < t.e1 * npoints)
        where = writer.describe(problem, term, 0, term.size * npoints)
        raise NonFiniteError(
            f"{problem.name} returned the non-finite loss {f[q]} for copy {q - term.e0 * npoints} of {where}"
        )


def base_loss(problem: Problem, term: Term, vectorized: bool) -> float:
    """The loss at the unperturbed x (forward differences, one-sided randomized estimates): the
    caller's f0 when given (no call), else one call of fn."""
    if problem.f0 is not None:
        return problem.f0[term.datums[0] if problem.structure == "datum" else 0]
    arrays = problem.term_arrays(term)
    where = "the unperturbed log-probs"
    with problem.no_grad():
        if vectorized:
            inputs = [problem.fn_view(a[None]) for a in arrays]
            loss = problem.invoke(term, inputs, where)
            problem.see_loss(loss)
            return float(problem.vector_loss(loss, 1, where)[0])
        inputs = [problem.fn_view(a) for a in arrays]
        loss = problem.invoke(term, inputs, where)
        problem.see_loss(loss)
        return problem.scalar_loss(loss, where)


class _InFlight:
    """The chunks of one mapped run now running in this process (a thread executor's workers): when the
    run stops early (fn raised, Ctrl-C), the caller waits for them before it puts the log-probs back
    and returns, and chunks that start later do not call fn. A process worker gets a fresh one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._stopped = False
        self.executor: Optional[int] = None  # id() of the executor the run maps its chunks over

    def __reduce__(self) -> tuple:
        return (_InFlight, ())

    def enter(self) -> bool:
        with self._cond:
            if self._stopped:
                return False
            self._running += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def halt(self) -> None:
        """No chunk calls fn after this (running ones stop before their next call, see take_chunk_flight);
        returns at once (stop waits for the running ones)."""
        with self._cond:
            self._stopped = True

    def stop(self) -> None:
        """halt, then wait until the running chunks have finished."""
        with self._cond:
            self._stopped = True
            while self._running:
                self._cond.wait()


class _Stopped(Exception):
    """Ends a chunk whose run has stopped (its result is never read)."""


# .executors: ids of the executors whose chunks this thread is running now; .flight: the run of the chunk
_RUNNING = threading.local()


def take_chunk_flight() -> Optional[_InFlight]:
    """The run of the chunk this thread starts on an executor (None outside one), taken by the chunk. Its
    loops check `_stopped` before each call of fn: a chunk is up to 1/64 of the run, and waiting for it to
    finish delayed Ctrl-C (or a sibling chunk's error) by that much (5 s for 100 calls of 50 ms). Taken, so
    fn's own sequential runs inside the chunk do not read it: a stopped outer run failed them with `_Stopped`,
    which reached their composed losses' on_event (and log_events' warnings)."""
    flight = getattr(_RUNNING, "flight", None)
    _RUNNING.flight = None
    return flight


def _remote(func: Callable[..., Any], flight: _InFlight, problem: "Problem", *args: Any) -> Tuple[Any, float]:
    """One chunk on an executor: its losses and the precision of fn's losses seen there (a process
    worker's Problem is a copy, so the caller's would not learn a float16 or bfloat16 fn otherwise)."""
    if not flight.enter():
        return None, 0.0  # the run already stopped: never read
    outer, outer_flight = getattr(_RUNNING, "executors", ()), getattr(_RUNNING, "flight", None)
    _RUNNING.executors, _RUNNING.flight = outer + (flight.executor,), flight
    try:
        return func(problem, *args), problem.loss_eps
    finally:
        _RUNNING.executors, _RUNNING.flight = outer, outer_flight
        flight.leave()


def mapped(executor: Any, func: Callable[..., Any], calls: Sequence[tuple], sizes: Optional[Sequence[int]],
           describe: Optional[Callable[[int], str]] = None) -> Generator[Any, None, None]:
    """func(*calls[k]) for every chunk k on executor, the results in order, each checked as it arrives: with
    sizes, a numeric vector of sizes[k] losses; then one result per call. An executor that breaks this is
    named (a short or None result would otherwise be read as uninitialised memory or NaN). A worker that
    died under fn is a NumericalError naming fn and `describe(k)` (chunk k's perturbations)."""
    problem = calls[0][0] if calls else None
    flight = _InFlight()
    # Inside a chunk this executor runs (fn of a run on it calling numerical_grad with it again) the chunks
    # run here, in order: queued behind the outer run's chunks, whose workers wait for them, they would
    # never start. The same bits either way.
    flight.executor = id(executor)
    nested = flight.executor in getattr(_RUNNING, "executors", ())
    submits = not nested and _submits(executor)
    name = f"executor {type(executor).__name__}.{'submit' if submits else 'map'}"
    args = ([func] * len(calls), [flight] * len(calls), *zip(*calls))  # (sized: Dask refuses iterators)

    def died(k: int, err: BaseException) -> NumericalError:
        what = describe(k) if describe is not None else f"chunk {k} of {len(calls)}"
        return NumericalError(
            f"{problem.name if problem is not None else 'fn'} did not return: a worker process of executor "
            f"{type(executor).__name__} died ({type(err).__name__}: {err}) (at {what}, the first chunk not "
            "finished then, or at a later one); fn ending its process (os._exit, a crash, running out of memory) "
            "does this"
        )

    futures: List[Any] = []
    source: Any = None  # map's own iterator
    results: Any = None
    try:
        if submits:
            for column in zip(*args):
                future = executor.submit(_remote, *column)
                if not isinstance(future, cf.Future) and not callable(getattr(future, "result", None)):
                    raise InputError(f"{name} returned {type(future).__name__}, not a concurrent.futures.Future "
                                     "(nor a future with a result method)")
                futures.append(future)
            if all(isinstance(future, cf.Future) for future in futures):
                results = _in_order(futures, died)
            else:  # futures of another kind (Dask's own, from an adapter's submit): read in order, as Executor.map did
                results = _read((future.result() for future in futures), died)
        else:
            mapper: Callable[..., Any] = map if nested else executor.map
            source = mapper(_remote, *args)
            try:
                source = iter(source)
            except TypeError:
                raise InputError(f"{name} returned {type(source).__name__}, not an iterable of results") from None
            results = _read(source, died)
        yield from _checked(name, results, calls, sizes, problem)
    except BaseException:  # (GeneratorExit too: the caller stopped reading)
        flight.halt()  # first: a chunk that starts or goes on from here does not call fn
        for future in futures:
            cancel = getattr(future, "cancel", None)
            if callable(cancel):
                cancel()  # the chunks not yet started
        if results is not None:
            results.close()
        close = getattr(source, "close", None)
        if callable(close):
            close()  # Executor.map's iterator cancels the chunks not yet started
        flight.stop()  # and those already running finish before the caller restores anything
        raise


def _submits(executor: Any) -> bool:
    """Whether chunks go to executor.submit, one future each: a concurrent.futures.Executor with a submit of
    its own (thread and process pools). Its chunks' results are still read in order, but the first chunk to
    fail ends the run at once (see _in_order). Anything else gets executor.map, read in order: the one method
    a custom executor needs (docs/numerical.md). Dask's ClientExecutor too: cancelling its submit's futures
    (a failed run cancels the rest) made its event loop log tornado ERROR tracebacks for the chunks that
    finished meanwhile (FutureCancelledError, InvalidStateError); its map cancels Dask's own futures."""
    dask = sys.modules.get("distributed.cfexecutor")
    if dask is not None and isinstance(executor, getattr(dask, "ClientExecutor", ())):
        return False
    return isinstance(executor, cf.Executor) and type(executor).submit is not cf.Executor.submit


def _worker_died(err: BaseException) -> bool:
    """Whether an executor reports that a worker died while it ran a chunk: a process pool's
    BrokenProcessPool, Dask's KilledWorker (their modules are loaded where they are raised)."""
    process = sys.modules.get("concurrent.futures.process")
    scheduler = sys.modules.get("distributed.scheduler")
    return (process is not None and isinstance(err, process.BrokenProcessPool)) or (
        scheduler is not None and isinstance(err, getattr(scheduler, "KilledWorker", ()))
    )


def _in_order(futures: List[Any], died: Callable[[int, BaseException], NumericalError]) -> Iterator[Any]:
    """The futures' results in order, as soon as each and those before it have finished. A failure raises as
    soon as it is seen, not after every chunk before it: of the chunks found failed then, the lowest-numbered
    (a worker's death as died(k, err)). Finished futures are learnt from done callbacks, not as_completed:
    a pool's shutdown(cancel_futures=True) only cancel()s its queued futures, which wakes no as_completed
    waiter, so a run whose next chunk was queued behind other work waited forever (Future.result, which
    map read, raises CancelledError there). The queue holds indices, not futures: a future holding its
    callback, which held the queue holding the future, was a cycle (each run's futures and results lived
    until the cyclic gc ran; forever with gc disabled)."""
    finished: "queue.SimpleQueue[int]" = queue.SimpleQueue()
    for j, future in enumerate(futures):
        future.add_done_callback(functools.partial(_done, finished, j))  # (cancel() calls it too)
    for k, future in enumerate(futures):
        while not future.done():
            if _failed(futures[finished.get()]):
                k, future = next((j, f) for j, f in enumerate(futures) if j >= k and f.done() and _failed(f))
                break
        try:
            value = future.result()
        except BaseException as err:
            if _worker_died(err):
                raise died(k, err) from err
            raise
        yield value


def _done(finished: "queue.SimpleQueue[int]", index: int, future: Any) -> None:
    """A done callback of _in_order: the finished future's index."""
    finished.put(index)


def _failed(future: Any) -> bool:
    """Whether a finished future raised or was cancelled."""
    return future.cancelled() or future.exception() is not None


def _read(results: Iterator[Any], died: Callable[[int, BaseException], NumericalError]) -> Iterator[Any]:
    """An executor's map results as they are; a worker's death as died(k, err) for the chunk k read then."""
    k = 0
    while True:
        try:
            value = next(results)
        except StopIteration:
            return
        except BaseException as err:
            if _worker_died(err):
                raise died(k, err) from err
            raise
        yield value
        k += 1


def fill_mapped(out: np.ndarray, executor: Any, func: Callable[..., Any], calls: Sequence[tuple],
                spans: Sequence[Tuple[int, int]], problem: "Problem", progress: Any,
                describe: Optional[Callable[[int, int], str]] = None) -> None:
    """out[q0:q1] = the losses of chunk (q0, q1), mapped over executor, as each arrives (the bar
    advances by the chunk's calls); stopping early closes the run (see mapped). describe(q0, q1): the
    chunk's perturbations, for errors."""
    where = None if describe is None else (lambda k: describe(*spans[k]))
    with contextlib.closing(mapped(executor, func, calls, [q1 - q0 for q0, q1 in spans], where)) as chunks:
        for k, values in enumerate(chunks):
            q0, q1 = spans[k]
            out[q0:q1] = values
            problem.see_loss(values)
            progress.update(q1 - q0, mapped=True)


def _checked(name: str, results: Iterator[Any], calls: Sequence[tuple], sizes: Optional[Sequence[int]],
             problem: Any) -> Iterator[Any]:
    count = 0
    value: Any  # any result, None included (mypy cannot narrow it through `numbers` below)
    for result in results:
        if count == len(calls):
            raise InputError(f"{name} returned more than the {len(calls)} results asked for")
        value, eps = result if isinstance(result, tuple) and len(result) == 2 else (result, 0.0)
        if isinstance(eps, float) and eps > problem.loss_eps:  # what a process worker's copy of problem saw
            problem.loss_eps = eps
        if sizes is not None:
            # (aligned: a remote executor's result may arrive at any offset, which the core would refuse,
            # and the token structure would then take its float64 path: other bits than the sequential run)
            value = None if value is None else np.require(value, requirements="A")
            numbers = value is not None and value.dtype.kind in "fiu"
            if not numbers or value.shape != (sizes[count],):
                got = f"shape {tuple(value.shape)}" if numbers else "no numbers"
                raise InputError(f"{name} returned {got} for chunk {count}; expected its {sizes[count]} losses")
        yield value
        count += 1
    if count != len(calls):
        raise InputError(f"{name} returned {count} results for {len(calls)} chunks of calls")
