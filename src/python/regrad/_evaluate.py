"""Calling the user's loss on perturbed inputs: what fn receives, what it may return, and errors
that name fn and the perturbation. Shared by the finite-difference and randomized estimators.

The per-call helpers here are module-level and the objects picklable, so that chunks of calls
can run on any concurrent.futures.Executor, including a Dask `Client.get_executor()`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from ._arrays import ArrayBatch
from .errors import NonFiniteError, NumericalError

POINT_LABELS = {
    "forward": ("+h",),
    "central": ("+h", "-h"),
    "richardson": ("+h", "-h", "+h/2", "-h/2"),
}


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")


def fn_name(fn: Any) -> str:
    """A readable name for fn in error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"fn {name!r}"


# Where a call happened, for error messages: a string, or a function building it (only on error).
Where = Union[str, Callable[[], str]]


def _text(where: Where) -> str:
    return where if isinstance(where, str) else where()


def _is_torch_scalar(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "item") and x.dim() == 0


def split_loss(out: Any) -> Any:
    """The loss part of fn's return value: element 0 of a (loss, metrics) pair, else the value."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0]
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if not value.is_floating_point():
            value = value.double()
        return value.double().numpy()
    return np.asarray(value, dtype=np.float64)


def _float_view(value: Any) -> np.ndarray:
    """A float32/float64 numpy view of a CPU tensor or array when possible (no copy), else float64."""
    if type(value).__module__.startswith("torch") and str(value.dtype) in ("torch.float32", "torch.float64"):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value
    return _to_numpy(value)


_IS_CPU = operator.attrgetter("is_cpu")


def _plain_cpu_tensors(values: Sequence[Any]) -> bool:
    """Plain contiguous CPU torch tensors of one float dtype (float32 or float64), checked in C-level passes."""
    import torch

    return (
        set(map(type, values)) == {torch.Tensor}
        and all(map(torch.Tensor.is_contiguous, values))
        and all(map(_IS_CPU, values))
        and len(dtypes := set(map(_DTYPE, values))) == 1
        and dtypes.pop() in (torch.float32, torch.float64)
    )


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


@dataclass
class Problem:
    """The prepared inputs of one numerical-gradient run (picklable)."""

    fn: Callable[..., Any]
    data: Any
    structure: str
    batch: ArrayBatch  # working arrays (widened if needed), C-contiguous, never modified
    offsets: np.ndarray  # int64 [B + 1] element offsets of the packed layout
    width: int

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
        if self.is_torch:
            import torch

            return torch.no_grad()
        return contextlib.nullcontext()

    def term_arrays(self, term: Term) -> List[np.ndarray]:
        return [self.arrays[j] for j in term.datums]

    def invoke(self, term: Term, inputs: Sequence[Any], where: Where) -> Any:
        """Calls fn on the term's inputs; an exception names fn and `where`."""
        try:
            if self.structure == "datum":
                out = self.fn(self.data[term.datums[0]], inputs[0])
            else:
                out = self.fn(self.data, list(inputs))
        except Exception as err:
            raise NumericalError(f"{self.name} raised {type(err).__name__}: {err} (at {_text(where)})") from err
        return split_loss(out)

    def scalar_loss(self, out: Any, where: Where) -> float:
        kind = type(out)
        if kind is float or kind is np.float64 or kind is np.float32:
            value = float(out)
        elif _is_torch_scalar(out):
            value = out.item()
        else:
            a = np.asarray(out, dtype=np.float64) if np.isscalar(out) else _to_numpy(out)
            if a.ndim != 0 or isinstance(out, bool):
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
        a = _float_view(out)
        if a.shape == (count,) and math.isfinite(a.sum()):
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
        if self.is_torch:
            import torch

            if stacked and _plain_cpu_tensors(out):
                return list(map(torch.Tensor.data_ptr, out)), str(out[0].dtype)[6:]
            try:
                return list(map(torch.Tensor.numpy, out))
            except (RuntimeError, TypeError):
                pass
        return [_float_view(p) for p in out]

    def _check_token_shapes(self, out: Sequence[Any], shapes: List[tuple], where: str, stacked: bool) -> None:
        for j, (p, s) in enumerate(zip(out, shapes)):
            if tuple(np.shape(p) if not hasattr(p, "shape") else p.shape) != s:
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
        if self._flat.nbytes > self.KEEP_BYTES:
            self._flat = np.empty(0, np.uint8)

    def views(self, arrays: Sequence[np.ndarray], rows: int) -> List[np.ndarray]:
        sizes = [rows * a.nbytes for a in arrays]
        if sum(sizes) > self._flat.nbytes:
            self._flat = np.empty(sum(sizes), np.uint8)
        out, start = [], 0
        for a, nbytes in zip(arrays, sizes):
            out.append(self._flat[start : start + nbytes].view(a.dtype).reshape((rows,) + a.shape))
            start += nbytes
        return out


# ---- chunks of calls (run in the caller's thread or on an executor) -------------------------------


def difference_scalar_chunk(
    problem: Problem, term: Term, points: np.ndarray, method: str, q_begin: int, q_end: int
) -> np.ndarray:
    """Losses at perturbations [q_begin, q_end), one call each: the perturbed datum is a private
    copy in which one element is set, fn is called, and the element is restored."""
    npoints = len(POINT_LABELS[method])
    out = np.empty(q_end - q_begin)
    inputs: List[Any] = [problem.fn_view(problem.arrays[j]) for j in term.datums]
    offsets = problem.offsets.tolist()
    first = term.datums[0]
    j = -1
    end = -1
    flat = original = None
    with problem.no_grad():
        for q in range(q_begin, q_end):
            e = term.e0 + q // npoints
            if e >= end:  # perturbations come in element order: move to the datum holding e
                j = int(np.searchsorted(problem.offsets, e, side="right") - 1)
                start, end = offsets[j], offsets[j + 1]
                work = problem.arrays[j].copy()
                flat, original = work.reshape(-1), problem.arrays[j].reshape(-1)
                if j - first > 0:
                    inputs[j - first - 1] = problem.fn_view(problem.arrays[j - 1])  # back to the shared original
                inputs[j - first] = problem.fn_view(work)
            i = e - start
            flat[i] = points[q % npoints, e]
            where = functools.partial(problem.describe_difference, q, term, method)
            out[q - q_begin] = problem.scalar_loss(problem.invoke(term, inputs, where), where)
            flat[i] = original[i]
    return out


class DifferenceWriter:
    """Writes blocks of one-element perturbations; after the first block only the elements that
    change are rewritten (the buffers hold x everywhere else)."""

    def __init__(self, points: np.ndarray, method: str) -> None:
        self.points = points
        self.method = method
        self.npoints = len(POINT_LABELS[method])
        self._prev: Optional[tuple] = None

    def reset(self) -> None:
        self._prev = None

    def write(self, arrays: List[np.ndarray], buffers: List[np.ndarray], term: Term, q: int, count: int) -> None:
        if self._prev is None:
            _core.difference_block(arrays, buffers, self.points, term.e0, self.npoints, q, count, True)
        else:
            _core.difference_block(arrays, buffers, self.points, term.e0, self.npoints, q, count, False, *self._prev)
        self._prev = (q, count)

    def describe(self, problem: Problem, term: Term, q: int, count: int) -> str:
        return (
            f"the block of perturbations [{q}, {q + count}) of {term.size * self.npoints} "
            f"({problem.describe_difference(q, term, self.method)} first)"
        )


class RandomWriter:
    """Writes rows x +- scale * u_s with directions regenerated from (seed, sample, element)."""

    def __init__(self, scale: np.ndarray, kind: str, seed: int, antithetic: bool) -> None:
        self.scale = scale
        self.kind = kind
        self.seed = seed
        self.antithetic = antithetic

    def reset(self) -> None:
        pass

    def write(self, arrays: List[np.ndarray], buffers: List[np.ndarray], term: Term, q: int, count: int) -> None:
        _core.random_block(
            arrays, self.scale[term.e0 : term.e1], self.kind, self.seed, term.e0, self.antithetic, buffers, q, count
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
) -> np.ndarray:
    """Losses at perturbations [q_begin, q_end) written `rows` at a time by `writer` into buffers;
    fn gets the whole block (vectorized) or, with rows == 1, the single perturbed copy."""
    arrays = problem.term_arrays(term)
    buffers = (pool or BufferPool()).views(arrays, rows)
    writer.reset()
    out = np.empty(q_end - q_begin)
    with problem.no_grad():
        for q in range(q_begin, q_end, rows):
            count = min(rows, q_end - q)
            writer.write(arrays, buffers, term, q, count)
            where = functools.partial(writer.describe, problem, term, q, count)
            if vectorized:
                inputs = [problem.fn_view(b[:count]) for b in buffers]
                out[q - q_begin : q - q_begin + count] = problem.vector_loss(problem.invoke(term, inputs, where), count, where)
            else:
                inputs = [problem.fn_view(b[0]) for b in buffers]
                out[q - q_begin] = problem.scalar_loss(problem.invoke(term, inputs, where), where)
            if progress is not None:
                progress.update(1)
    return out


def base_loss(problem: Problem, term: Term, vectorized: bool) -> float:
    """The loss at the unperturbed x (forward differences, one-sided randomized estimates)."""
    arrays = problem.term_arrays(term)
    where = "the unperturbed log-probs"
    with problem.no_grad():
        if vectorized:
            inputs = [problem.fn_view(a[None]) for a in arrays]
            return float(problem.vector_loss(problem.invoke(term, inputs, where), 1, where)[0])
        inputs = [problem.fn_view(a) for a in arrays]
        return problem.scalar_loss(problem.invoke(term, inputs, where), where)
