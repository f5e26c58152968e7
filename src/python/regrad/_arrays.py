"""Turning lists of numpy arrays or CPU torch tensors into C-contiguous numpy views (no copies)."""

from __future__ import annotations

import collections.abc
import functools
import operator
import sys
from operator import attrgetter
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError, NonFiniteError

_NARROW = ("float16", "bfloat16")  # widened to float32 (numpy by name: '>f2' and ml_dtypes' bfloat16 too)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DTYPE, _SHAPE = attrgetter("dtype"), attrgetter("shape")
_IS_CPU = attrgetter("is_cpu")
_ALIGNED = attrgetter("flags.aligned")


def is_torch_tensor(x: Any) -> bool:
    """True for a torch.Tensor, subclasses included (nn.Parameter, a user's own `class LogProbs(torch.Tensor)`:
    told apart by its module's name, such a tensor was "not a torch tensor", and regrad.numerical returned fn's
    float with no autograd), without importing torch: x is none if the caller never imported it."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_views(arrays: Sequence[np.ndarray]) -> List[Any]:
    """CPU tensors over the arrays' memory, for user code that takes tensors. A read-only array (a
    frozen array, `np.memmap(mode="r")`, `np.frombuffer` of bytes) is copied first: torch has no
    read-only tensors, so a fn writing in place would write into memory the caller froze (a read-only
    mapping crashed the process) instead of meeting regrad's in-place check, and torch warned."""
    import torch

    return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]


class ArrayBatch:
    """Per-datum numpy views of the caller's data, plus what is needed to hand results back.

    A plain torch batch may come without the views (arrays=None): `arrays` makes them on first use
    (~1 us per datum), and `core_arrays` hands the C++ core the tensors' addresses instead.
    """

    def __init__(self, arrays: Optional[List[np.ndarray]], is_torch: bool, dtype: np.dtype, shapes: List[tuple],
                 tensors: Optional[List[Any]] = None, addresses: Optional[List[int]] = None,
                 copied: bool = False) -> None:
        self._arrays = arrays
        self.is_torch = is_torch
        self.dtype = dtype
        self.shapes = shapes
        self.tensors = tensors  # torch input: the detached tensors (or plain ones), so callers need not detach again
        # Elements per datum, from the shapes (every datum is [T] or every one [T, K]).
        self.sizes: List[int] = [s[0] * s[1] for s in shapes] if shapes and len(shapes[0]) == 2 else [s[0] for s in shapes]
        self._addresses = addresses  # plain torch batch: the tensors' data pointers, read once by the checks
        self._core: Any = None
        self.copied = copied  # torch input: some array is a copy of its tensor (non-contiguous, unaligned)

    @property
    def arrays(self) -> List[np.ndarray]:
        if self._arrays is None:
            import torch

            self._arrays = list(map(torch.Tensor.numpy, map(torch.Tensor.detach, self.tensors or [])))
        return self._arrays

    @property
    def core_arrays(self) -> Any:
        """What the C++ core reads: the numpy views, or (addresses, sizes, width, dtype) of the tensors."""
        core = self._core
        if core is None:
            core = self._core = self._arrays if self._arrays is not None else self._tensor_addresses()
        return core

    def _tensor_addresses(self) -> Any:
        addresses = self._addresses
        if addresses is None:
            import torch

            addresses = list(map(torch.Tensor.data_ptr, self.tensors or []))
        width = self.shapes[0][1] if self.shapes and len(self.shapes[0]) == 2 else 1
        name = "float64" if self.dtype == _FLOAT_DTYPES[1] else "float32"  # (dtype.name is a slow Python property)
        return addresses, self.sizes, width, name

    def owned(self) -> "ArrayBatch":
        """The same batch over copies of the values: for runs whose calls an executor may pickle. A
        process pool's pickler (torch's ForkingPickler) moves a CPU tensor's storage into shared memory
        in place, so views or addresses of the caller's tensors (held by fn or data) would dangle."""
        return ArrayBatch([a.copy() for a in self.arrays], self.is_torch, self.dtype, self.shapes)

    def __getstate__(self) -> dict:
        # pickled as numpy arrays; addresses mean nothing in another process
        return dict(self.__dict__, _arrays=self.arrays, tensors=None, _addresses=None, _core=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # Unpickled arrays (a remote executor) carry a fresh dtype object; the core wants the canonical one.
        # They may also be unaligned (pickle protocol 5 buffers placed at any offset, as Dask's frames
        # are), which the core refuses: such an array is copied once.
        self._arrays = [np.require(a.view(a.dtype.type), requirements=["C", "A"]) for a in self._arrays or []]
        self.dtype = np.dtype(self.dtype.type)


def reusable(items: Any) -> Any:
    """items as something that can be read more than once: a one-shot iterator (a generator, map,
    zip) is listed once, since a second pass would otherwise see it empty; anything else as is."""
    return list(items) if isinstance(items, collections.abc.Iterator) else items


def listed(value: Any, what: str, of: str) -> List[Any]:
    """value (a list, tuple or other ordered iterable, one entry per datum) as a list; a dict, set or
    string is named (listing it would give its keys, in no datum order, or its characters)."""
    if type(value) is list or type(value) is tuple:  # the common case, without the ABC checks
        return list(value)
    if isinstance(value, (collections.abc.Mapping, collections.abc.Set, str, bytes)):
        raise InputError(f"{what} must be a list of {of}, one per datum, got a {type(value).__name__}")
    try:
        return list(value)
    except TypeError:
        raise InputError(f"{what} must be a list of {of}, one per datum, got {type(value).__name__}") from None


def as_array_batch(logprobs_list: Sequence[Any], what: str = "logprobs_list", keep_tensors: bool = True) -> ArrayBatch:
    """Checks a ragged batch ([T_i] or [T_i, K] each, one float dtype) and returns numpy views of it.

    Contiguous inputs are viewed, not copied; non-contiguous ones are copied once. keep_tensors=False:
    the caller needs only the arrays, so plain tensors that do not require grad are not detached.
    """
    if isinstance(logprobs_list, (np.ndarray,)) or is_torch_tensor(logprobs_list):
        raise InputError(f"{what} must be a list with one array per datum, not a single array")
    items = listed(logprobs_list, what, "arrays")
    first_torch = is_torch_tensor(items[0]) if items else False
    if first_torch:
        fast = _plain_torch_batch(items, keep_tensors)
        if fast is not None:
            return fast
    arrays: List[np.ndarray] = []
    shapes: List[tuple] = []
    tensors: List[Any] = []
    first: Optional[np.ndarray] = None
    copied = False
    for i, x in enumerate(items):
        # One pass, cheapest checks first: this runs on every loss call for every datum.
        if first_torch and is_torch_tensor(x):
            if x.dtype not in _torch_float_dtypes():
                raise InputError(f"{what}[{i}] has dtype {x.dtype}; expected float32 or float64 (cast it first)")
            if x.layout != _strided():
                raise InputError(f"{what}[{i}] is a {x.layout} tensor; pass a dense one (.to_dense())")
            if not x.is_cpu:
                raise InputError(
                    f"{what}[{i}] is on device {x.device}; this takes CPU tensors (move them with .cpu(), "
                    "or keep all of them on the GPU for regrad.kernels: docs/cuda.md)"
                )
            t = x.detach().resolve_neg()  # a negative view (torch._neg_view) has no numpy() of its own
            tensors.append(t)
            contiguous = t.is_contiguous()
            a = (t if contiguous else t.contiguous()).numpy()
            if not a.flags.aligned:  # torch.frombuffer at an odd offset: the core reads whole elements
                a = a.copy()
                contiguous = False
            copied = copied or not contiguous
        elif not first_torch and isinstance(x, np.ndarray):
            a = x
            if isinstance(a, np.ma.MaskedArray):  # its mask would be ignored: masked values summed
                raise InputError(
                    f"{what}[{i}] is a numpy masked array; regrad reads all its values (pass mask= to the "
                    "kernels, or np.ma.filled(a, 0.0))"
                )
            if type(a) is not np.ndarray:  # a subclass (np.matrix: reshape(-1) stays 2-D) as a plain view
                a = a.view(np.ndarray)
            if a.dtype.kind == "f" and not a.dtype.isnative:  # big-endian float32 / float64: one native copy
                a = a.astype(a.dtype.newbyteorder("="))
            if a.dtype not in _FLOAT_DTYPES:
                raise InputError(f"{what}[{i}] has dtype {a.dtype}; expected float32 or float64 (cast it first)")
            if not (a.flags.c_contiguous and a.flags.aligned):  # np.frombuffer at an odd offset is unaligned
                a = np.array(a, order="C")
        elif is_torch_tensor(x) or isinstance(x, np.ndarray):
            raise InputError(f"{what} mixes numpy arrays and torch tensors; use one kind")
        else:
            raise InputError(f"{what}[{i}] is a {type(x).__name__}; expected a numpy array or a torch tensor")
        shape = a.shape
        if first is None:
            if len(shape) not in (1, 2):
                raise InputError(f"{what}[{i}] has shape {tuple(shape)}; expected [T] or [T, K]")
            if len(shape) == 2 and shape[1] == 0:
                raise InputError(f"{what}[{i}] has shape {tuple(shape)}; K (log-probs per token) must be at least 1")
            first = a
        elif a.dtype != first.dtype:
            raise InputError(f"{what}[{i}] has dtype {a.dtype} but {what}[0] has {first.dtype}; use one dtype")
        elif len(shape) != first.ndim or (len(shape) == 2 and shape[1] != first.shape[1]):
            raise InputError(
                f"{what}[{i}] has shape {tuple(shape)} but {what}[0] has {tuple(first.shape)}; "
                "all data must be [T_i] or all [T_i, K] with one K"
            )
        arrays.append(a)
        shapes.append(shape)
    dtype = first.dtype if first is not None else np.dtype(np.float64)
    return ArrayBatch(arrays, first_torch, dtype, shapes, tensors if first_torch else None, copied=copied)


def as_working_batch(logprobs_list: Sequence[Any], what: str = "logprobs_list",
                     keep_tensors: bool = True) -> Tuple[ArrayBatch, List[Any]]:
    """as_array_batch, with float16 / bfloat16 data widened to float32 copies (the working dtype: the
    kernels and the engine are float32 / float64); also the caller's dtype per datum when they were
    widened (else []), to cast results back. Mixed dtypes are named as given, before widening."""
    if isinstance(logprobs_list, np.ndarray) or is_torch_tensor(logprobs_list):
        raise InputError(f"{what} must be a list with one array per datum, not a single array")
    items = listed(logprobs_list, what, "arrays")
    try:  # float32 / float64 throughout, the common case: nothing to widen
        return as_array_batch(items, what, keep_tensors), []
    except InputError:
        pass  # a narrow dtype to widen, or a real problem that as_array_batch names again below
    widened, originals, narrow = [], [], False
    for x in items:
        if is_torch_tensor(x):
            originals.append(x.dtype)
            if str(x.dtype).replace("torch.", "") in _NARROW:
                narrow = True
                x = x.detach().float()
        elif isinstance(x, np.ndarray):
            originals.append(x.dtype)
            if x.dtype.name in _NARROW:  # the name, not ==: big-endian '>f2' is float16 too
                narrow = True
                x = x.astype(np.float32)
        else:
            originals.append(None)
        widened.append(x)
    names = [(i, dtype_name(d)) for i, d in enumerate(originals) if d is not None]
    if narrow and len({name for _, name in names}) > 1:  # float16 beside float64 is not "float32"
        (i0, first), (i, name) = names[0], next(item for item in names if item[1] != names[0][1])
        raise InputError(f"{what}[{i}] has dtype {name} but {what}[{i0}] has {first}; use one dtype")
    return as_array_batch(widened, what, keep_tensors), (originals if narrow else [])


def dtype_name(dtype: Any) -> str:
    """A numpy or torch dtype's name: float16, bfloat16, float32... (numpy by name: str gives '>f2')."""
    return dtype.name if isinstance(dtype, np.dtype) else str(dtype).replace("torch.", "")


def cast_back(packed: np.ndarray, batch: ArrayBatch, originals: List[Any], what: str = "gradient") -> List[Any]:
    """A packed float32 result over a widened batch (as_working_batch) as one array or tensor per datum in
    the caller's float16 / bfloat16 dtype. packed is finite: a value beyond the narrow dtype's range
    (float16 tops out at 65504) raises NonFiniteError naming datum and element, as the kernels do for
    their own dtype, instead of coming back as inf."""
    dtype = originals[0]  # (one dtype: as_working_batch refuses mixed ones)
    if batch.is_torch:
        import torch

        narrow: Any = torch.from_numpy(packed).to(dtype)
        fits = torch.isfinite(narrow)
        bad = [] if bool(fits.all()) else torch.nonzero(~fits).reshape(-1).tolist()
    else:
        with np.errstate(over="ignore"):
            narrow = packed.astype(dtype)
        fits = np.isfinite(narrow)
        bad = [] if fits.all() else np.flatnonzero(~fits).tolist()
    if bad:
        ends = np.cumsum(batch.sizes)
        j = int(np.searchsorted(ends, bad[0], side="right"))
        position = bad[0] - int(ends[j] - batch.sizes[j])
        err = NonFiniteError(
            f"the {what} at datum {j}, element {position} is {float(packed[bad[0]])}, beyond the range of the "
            f"log-probs' {dtype_name(dtype)} (computed in float32); pass float32 log-probs to get it"
        )
        err.datum, err.position = j, position
        raise err
    if batch.is_torch:
        parts = narrow.split_with_sizes(batch.sizes)
        return [p.view(s) for p, s in zip(parts, batch.shapes)]
    return split_packed(narrow, batch)


def _plain_torch_batch(items: List[Any], keep_tensors: bool = True) -> Optional[ArrayBatch]:
    """Plain contiguous CPU float tensors of one dtype and rank, checked in C-level passes; else None (the loop decides)."""
    import torch

    if not keep_tensors:
        # The caller needs only memory to read: no numpy views (made on first use) and no detach.
        layout = plain_cpu_layout(items)
        if layout is None:
            return None
        return _checked_ranks(None, items, list(map(tuple, map(_SHAPE, items))), *layout)
    if set(map(type, items)) != {torch.Tensor} or not all(map(torch.Tensor.is_contiguous, items)):
        return None
    try:  # numpy() itself refuses other devices, layouts, dtypes numpy lacks and tensors requiring grad
        tensors = list(map(torch.Tensor.detach, items))
        arrays = list(map(torch.Tensor.numpy, tensors))
    except (RuntimeError, TypeError):
        return None
    dtypes = set(map(_DTYPE, arrays))
    if len(dtypes) != 1 or dtypes.pop() not in _FLOAT_DTYPES or not all(map(_ALIGNED, arrays)):
        return None
    return _checked_ranks(arrays, tensors, list(map(_SHAPE, arrays)), arrays[0].dtype)


def plain_cpu_layout(items: Sequence[Any]) -> Optional[Tuple[np.dtype, List[int]]]:
    """The numpy dtype and data addresses of plain contiguous CPU torch tensors of one float dtype
    (float32 / float64), checked in C-level passes, whose memory can be read by address; else None. A
    negative view (torch._neg_view) is refused: its memory holds the un-negated values; so is memory
    not aligned to the dtype (torch.frombuffer at an odd offset), which the core must not read by address."""
    import torch

    if not items or set(map(type, items)) != {torch.Tensor} or not all(map(torch.Tensor.is_contiguous, items)):
        return None
    dtypes = set(map(_DTYPE, items))
    if len(dtypes) != 1 or not all(map(_IS_CPU, items)) or any(map(torch.Tensor.is_neg, items)):
        return None
    dtype = _TORCH_TO_NUMPY.get(dtypes.pop())
    addresses = list(map(torch.Tensor.data_ptr, items))
    if dtype is None or functools.reduce(operator.or_, addresses) % dtype.itemsize:
        return None  # (itemsize is a power of 2: the OR of the addresses has a low bit set iff one does)
    return dtype, addresses


def _checked_ranks(arrays: Optional[List[np.ndarray]], tensors: List[Any], shapes: List[tuple],
                   dtype: np.dtype, addresses: Optional[List[int]] = None) -> Optional[ArrayBatch]:
    """The batch if every datum is [T] or every datum is [T, K] with one K; else None."""
    ranks = set(map(len, shapes))
    if ranks == {2}:
        if len({shape[1] for shape in shapes}) != 1 or shapes[0][1] == 0:  # K = 0: the checking loop names it
            return None
    elif ranks != {1}:
        return None
    return ArrayBatch(arrays, True, dtype, shapes, tensors, addresses)


_TORCH_FLOAT_DTYPES: tuple = ()


class _TorchToNumpy(dict):
    """torch float32 / float64 -> numpy dtype (filled on first use, so importing regrad never imports torch)."""

    def get(self, key: Any, default: Any = None) -> Any:
        if not self:
            import torch

            self.update({torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)})
        return super().get(key, default)


_TORCH_TO_NUMPY = _TorchToNumpy()


def _torch_float_dtypes() -> tuple:
    global _TORCH_FLOAT_DTYPES
    if not _TORCH_FLOAT_DTYPES:
        import torch

        _TORCH_FLOAT_DTYPES = (torch.float32, torch.float64)
    return _TORCH_FLOAT_DTYPES


@functools.lru_cache(maxsize=None)
def _strided() -> Any:
    import torch

    return torch.strided


def token_mask(mask: Optional[Sequence[Any]], batch: ArrayBatch) -> Optional[np.ndarray]:
    """Packs per-datum masks ([T_i], True or > 0 keeps the token) into one uint8 array."""
    if mask is None:
        return None
    try:
        masks = list(mask)
    except TypeError:
        raise InputError(f"mask must be a list with one [T_i] mask per datum, got {type(mask).__name__}") from None
    if len(masks) != len(batch.arrays):
        raise InputError(f"mask has {len(masks)} entries but the batch has {len(batch.arrays)} data")
    parts = [mask_keeps(m, i, shape[0]) for i, (m, shape) in enumerate(zip(masks, batch.shapes))]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def mask_keeps(m: Any, i: int, tokens: int) -> np.ndarray:
    """Datum i's mask ([tokens] booleans or real numbers, > 0 keeps a token) as uint8 0 / 1, checked."""
    if is_torch_tensor(m) and m.is_complex():  # .float() would drop the imaginary part
        raise InputError(f"mask[{i}] has dtype {m.dtype}; expected booleans or numbers (> 0 keeps a token)")
    try:
        m = np.asarray(m.detach().cpu().double().numpy() if is_torch_tensor(m) else m)  # .float() drops weights < 2**-149
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"mask[{i}] cannot be read as numbers ({type(m).__name__}: {err})") from None
    if m.shape != (tokens,):
        raise InputError(f"mask[{i}] has shape {m.shape}; datum {i} has {tokens} tokens")
    if m.dtype.kind not in "biuf":  # strings, None entries (object): > 0 would raise a raw TypeError
        raise InputError(f"mask[{i}] has dtype {m.dtype}; expected booleans or numbers (> 0 keeps a token)")
    if m.dtype.kind == "f" and np.isnan(m).any():  # neither kept (> 0) nor dropped (<= 0): a corrupt weight
        raise nan_mask_error(i, int(np.flatnonzero(np.isnan(m))[0]))
    return (m > 0).astype(np.uint8)


def nan_mask_error(i: int, token: int) -> InputError:
    return InputError(f"mask[{i}] is NaN at token {token}; a mask keeps tokens > 0 and drops tokens <= 0")


def split_packed(packed: np.ndarray, batch: ArrayBatch) -> List[Any]:
    """Splits a packed result into per-datum views shaped like the input, as numpy or torch."""
    if batch.is_torch:
        import torch

        parts = torch.from_numpy(packed).split_with_sizes(batch.sizes)
        if all(len(s) == 1 for s in batch.shapes):
            return list(parts)  # [T] data: split already gives the shapes (a view per datum costs ~1 us)
        return [p.view(s) for p, s in zip(parts, batch.shapes)]
    out = []
    start = 0
    for n, shape in zip(batch.sizes, batch.shapes):
        out.append(packed[start : start + n].reshape(shape))
        start += n
    return out


def same_options(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    """Numerical options by value, as RegularizerSpec and regrad.numerical's wrapper compare them."""
    return mine.keys() == theirs.keys() and all(same_value(mine[k], theirs[k]) for k in mine)


def same_value(a: Any, b: Any) -> bool:
    """Option values by value: arrays and tensors element-wise (their == is per element), lists of
    them (one step array per datum) item by item."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(same_value, a, b))
    try:
        same = a == b
        if isinstance(same, (bool, np.bool_)):
            return bool(same)
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except (TypeError, ValueError, RuntimeError):  # (tensors of other shapes, tensors requiring grad)
        return False
