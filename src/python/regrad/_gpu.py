"""CUDA dispatch: torch tensors on a GPU go to regrad._cuda, with no host copies of the data.

Each call runs on the tensors' device and that device's current torch stream
(`torch.cuda.current_stream().cuda_stream`), so it orders with the caller's own kernels. Device
memory is handed to the C++ module as integer addresses (`tensor.data_ptr()`); outputs are
allocated here with torch, so they come from torch's caching allocator. The regularizer and the
difference-points helpers read back a 3-word status (one small device-to-host copy, which waits
for the stream) to raise NonFiniteError like the CPU path; the other helpers never synchronise.

Shapes and dtypes follow the CPU core (`regrad._core`): the helpers below take and return torch
tensors where the CPU functions take numpy arrays, so the numerical engine can use either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from ._arrays import is_torch_tensor, mask_keeps, nan_mask_error
from .errors import InputError, NonFiniteError

__all__ = [
    "on_cuda",
    "cuda_module",
    "CudaBatch",
    "cuda_batch",
    "regularizer",
    "difference_points",
    "difference_block",
    "difference_quotients",
    "random_block",
    "random_estimate",
    "random_directions",
]

BUILD_HINT = (
    "rebuild regrad with its CUDA module: `REGRAD_CUDA=ON pip install .` (needs the CUDA toolkit's "
    "nvcc; no GPU is needed to build), or move the tensors to the CPU with .cpu()"
)

# Status codes written by the kernels (src/cpp/cuda/cuda_api.hpp).
(_OK, _NON_FINITE_INPUT, _NON_FINITE_VALUE, _BAD_STEP, _STEP_UNDERFLOW, _STEP_OVERFLOW, _STEPS_COINCIDE,
 _GRADIENT_OVERFLOW) = range(8)


def on_cuda(logprobs_list: Any) -> bool:
    """True when logprobs_list is a list/tuple whose first item is a torch tensor on a CUDA device."""
    if not isinstance(logprobs_list, (list, tuple)) or not logprobs_list:
        return False
    first = logprobs_list[0]
    return is_torch_tensor(first) and first.device.type == "cuda"


def cuda_module() -> Any:
    """regrad._cuda, or InputError saying how to build it."""
    from . import _cuda  # the package sets it to None when the module is absent

    if _cuda is None:
        raise InputError(f"the log-probs are CUDA tensors but regrad was built without regrad._cuda: {BUILD_HINT}")
    return _cuda


@dataclass
class CudaBatch:
    """A checked ragged batch of contiguous CUDA tensors, as the C++ module takes it."""

    tensors: List[Any]  # detached, contiguous, one per datum
    shapes: List[tuple]
    offsets: List[int]  # B + 1 element offsets of the packed layout
    width: int  # K for [T, K] data, 1 for [T]
    dtype: Any  # torch.float32 or torch.float64
    device: Any

    @property
    def dtype_name(self) -> str:
        return "float64" if str(self.dtype) == "torch.float64" else "float32"

    @property
    def pointers(self) -> List[int]:
        return [t.data_ptr() for t in self.tensors]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def stream(self) -> int:
        import torch

        return int(torch.cuda.current_stream(self.device).cuda_stream)


def cuda_batch(logprobs_list: Sequence[Any], what: str = "logprobs_list") -> CudaBatch:
    """Checks a ragged batch of CUDA tensors ([T_i] or [T_i, K], one float dtype, one device)."""
    import torch

    tensors: List[Any] = []
    offsets = [0]
    for i, x in enumerate(logprobs_list):
        if not is_torch_tensor(x):
            raise InputError(f"{what}[{i}] is a {type(x).__name__} but {what}[0] is a CUDA tensor; use one kind")
        if x.device != logprobs_list[0].device:
            raise InputError(f"{what}[{i}] is on {x.device} but {what}[0] is on {logprobs_list[0].device}; use one device")
        if x.dtype not in (torch.float32, torch.float64):
            raise InputError(f"{what}[{i}] has dtype {x.dtype}; expected float32 or float64 (cast it first)")
        if x.dtype != logprobs_list[0].dtype:
            raise InputError(f"{what}[{i}] has dtype {x.dtype} but {what}[0] has {logprobs_list[0].dtype}; use one dtype")
        if x.layout != torch.strided:  # as the CPU path (a sparse tensor has no data_ptr() of its values)
            raise InputError(f"{what}[{i}] is a {x.layout} tensor; pass a dense one (.to_dense())")
        if x.dim() not in (1, 2):
            raise InputError(f"{what}[{i}] has shape {tuple(x.shape)}; expected [T] or [T, K]")
        if x.dim() == 2 and x.shape[1] == 0:
            raise InputError(f"{what}[{i}] has shape {tuple(x.shape)}; K (log-probs per token) must be at least 1")
        first = logprobs_list[0]
        if x.dim() != first.dim() or (x.dim() == 2 and x.shape[1] != first.shape[1]):
            raise InputError(
                f"{what}[{i}] has shape {tuple(x.shape)} but {what}[0] has {tuple(first.shape)}; "
                "all data must be [T_i] or all [T_i, K] with one K"
            )
        t = x.detach().resolve_neg()  # a negative view: data_ptr() is the un-negated storage (as _arrays does)
        tensors.append(t if t.is_contiguous() else t.contiguous())
        offsets.append(offsets[-1] + t.numel())
    first = tensors[0]
    width = int(first.shape[1]) if first.dim() == 2 else 1
    return CudaBatch(tensors, [tuple(t.shape) for t in tensors], offsets, width, first.dtype, first.device)


def _split(packed: Any, batch: CudaBatch) -> List[Any]:
    sizes = [b - a for a, b in zip(batch.offsets, batch.offsets[1:])]
    return [p.view(s) for p, s in zip(packed.split(sizes), batch.shapes)]


def _device_mask(mask: Optional[Sequence[Any]], batch: CudaBatch) -> Optional[Any]:
    """Per-datum token masks packed into one uint8 tensor on the batch's device."""
    if mask is None:
        return None
    import torch

    try:
        masks = list(mask)
    except TypeError:  # as the CPU path's token_mask
        raise InputError(f"mask must be a list with one [T_i] mask per datum, got {type(mask).__name__}") from None
    if len(masks) != len(batch.tensors):
        raise InputError(f"mask has {len(masks)} entries but the batch has {len(batch.tensors)} data")
    parts = []
    for i, (m, shape) in enumerate(zip(masks, batch.shapes)):
        if is_torch_tensor(m) and m.is_cuda and not m.is_complex():  # read on the device (a NaN check syncs)
            m = m.detach()
            if tuple(m.shape) != (shape[0],):
                raise InputError(f"mask[{i}] has shape {tuple(m.shape)}; datum {i} has {shape[0]} tokens")
            if m.is_floating_point():
                nan = torch.isnan(m)
                if bool(nan.any()):
                    raise nan_mask_error(i, int(nan.nonzero()[0, 0]))
            parts.append((m.to(batch.device, non_blocking=True) > 0).to(torch.uint8))
        else:  # host masks (lists, numpy, CPU tensors): the CPU path's checks
            parts.append(torch.from_numpy(mask_keeps(m, i, shape[0])).to(batch.device, non_blocking=True))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=batch.device)


def _raise_status(status: Any, what: str, reduction: str = "sum") -> None:
    """Reads the kernels' status words (waits for the stream) and raises as the CPU core would."""
    code, datum, position = (int(v) for v in status.tolist())
    if code == _OK:
        return
    if code == _NON_FINITE_INPUT:
        err = NonFiniteError(f"non-finite input at datum {datum}, element {position} ({what})")
    elif code == _NON_FINITE_VALUE:
        of = f"datum {datum}" if datum >= 0 else f"the batch (the {reduction} over data)"  # as the CPU core says
        err = NonFiniteError(f"the regularizer value of {of} is not finite (overflow of the input's dtype)")
        position = -1
    elif code == _GRADIENT_OVERFLOW:
        err = NonFiniteError(
            f"the gradient at datum {datum}, element {position} is not finite (overflow of the input's dtype; {what})"
        )
    elif code == _BAD_STEP:
        raise ValueError(f"step at datum {datum}, element {position} is not positive and finite")
    elif code == _STEP_UNDERFLOW:
        raise ValueError(
            f"step underflow at datum {datum}, element {position}: x + h == x in the working dtype, or "
            "|x + h - x| is subnormal (its reciprocal overflows; use a larger step)"
        )
    elif code == _STEP_OVERFLOW:
        raise ValueError(
            f"step overflow at datum {datum}, element {position}: x + h is not finite (or h is over 1e300) "
            "in the working dtype (use a smaller step)"
        )
    elif code == _STEPS_COINCIDE:
        raise ValueError(
            f"step too small for richardson at datum {datum}, element {position}: x + h/2 rounds onto x + h in "
            "the working dtype, so the two steps coincide (use a larger step)"
        )
    else:
        raise RuntimeError(f"unknown status {code} from regrad._cuda")
    err.datum = datum
    err.position = position
    raise err


def regularizer(
    kind: str, logprobs_list: Sequence[Any], reduction: str, mask: Optional[Sequence[Any]]
) -> Tuple[Any, Any, List[Any]]:
    """Built-in kernel `kind` on CUDA tensors: (0-d value, per_datum [B], grads like the input), on the device."""
    import torch

    cuda = cuda_module()
    batch = cuda_batch(list(logprobs_list))
    with torch.cuda.device(batch.device):
        packed_mask = _device_mask(mask, batch)
        dev = batch.device
        per_datum = torch.empty(len(batch.tensors), dtype=torch.float64, device=dev)
        grad = torch.empty(batch.size, dtype=batch.dtype, device=dev)
        value = torch.empty((), dtype=torch.float64, device=dev)
        status = torch.empty(3, dtype=torch.int64, device=dev)
        cuda.regularizer(
            kind, batch.dtype_name, batch.pointers, batch.offsets, batch.width,
            0 if packed_mask is None else packed_mask.data_ptr(), reduction,
            per_datum.data_ptr(), grad.data_ptr(), value.data_ptr(), status.data_ptr(), batch.stream(),
        )
        _raise_status(status, f"regularizer {kind!r}", reduction)
    return value.to(batch.dtype), per_datum.to(batch.dtype), _split(grad, batch)


# ---- Helpers for the numerical engine: the _core functions of the same names, on CUDA tensors. ----


def difference_points(
    logprobs_list: Sequence[Any], method: str, scale: float, step: Optional[Any] = None
) -> Tuple[Any, Any]:
    """(points [P, n] in the dtype, spacing [P, n] float64) on the device; raises like _core's."""
    import torch

    cuda = cuda_module()
    batch = cuda_batch(list(logprobs_list))
    npoints = {"forward": 1, "central": 2, "richardson": 4}.get(method)
    if npoints is None:
        raise ValueError(f"unknown difference method {method!r}; expected forward, central or richardson")
    with torch.cuda.device(batch.device):
        dev = batch.device
        points = torch.empty((npoints, batch.size), dtype=batch.dtype, device=dev)
        spacing = torch.empty((npoints, batch.size), dtype=torch.float64, device=dev)
        status = torch.empty(3, dtype=torch.int64, device=dev)
        step_t = None if step is None else _f64(step, dev)
        if step_t is not None and step_t.numel() not in (1, batch.size):  # an empty one would pass as no step
            raise ValueError(f"step has {step_t.numel()} entries; expected 1 or {batch.size} (one per log-prob)")
        cuda.difference_points(
            method, batch.dtype_name, batch.pointers, batch.offsets, batch.width, float(scale),
            0 if step_t is None else step_t.data_ptr(), 0 if step_t is None else step_t.numel(),
            points.data_ptr(), spacing.data_ptr(), status.data_ptr(), batch.stream(),
        )
        _raise_status(status, "difference points")
    return points, spacing


def _out_pointers(outs: Sequence[Any], batch: CudaBatch) -> Tuple[List[int], int]:
    """Addresses of per-datum [rows, ...] output buffers after checking them; returns (addresses, rows)."""
    outs = list(outs)
    if len(outs) != len(batch.tensors):
        raise InputError(f"got {len(outs)} output buffers for {len(batch.tensors)} data")
    rows = int(outs[0].shape[0]) if outs else 0
    for j, (o, n) in enumerate(zip(outs, (b - a for a, b in zip(batch.offsets, batch.offsets[1:])))):
        if o.device != batch.device or o.dtype != batch.dtype or not o.is_contiguous() or o.is_neg():
            raise InputError(f"output buffer {j} must be a contiguous {batch.dtype} tensor on {batch.device} "
                             "(not a negative view: writes through it would store -value)")
        if o.dim() < 1 or o.shape[0] != rows or o.numel() != rows * n:
            raise InputError(f"output buffer {j} has shape {tuple(o.shape)}; expected {rows} rows of {n} elements")
    return [o.data_ptr() for o in outs], rows


def difference_block(
    logprobs_list: Sequence[Any], outs: Sequence[Any], points: Any, element_offset: int, npoints: int,
    q_begin: int, count: int, full: bool, prev_begin: int = 0, prev_count: int = 0,
) -> None:
    """Writes perturbations [q_begin, q_begin + count) into the per-datum buffers (in place, on the stream)."""
    import torch

    cuda = cuda_module()
    batch = cuda_batch(list(logprobs_list))
    addresses, rows = _out_pointers(outs, batch)
    points = points.resolve_neg()
    if points.device != batch.device or points.dtype != batch.dtype or points.dim() != 2 or not points.is_contiguous():
        raise InputError(f"points must be a contiguous [P, n] {batch.dtype} tensor on {batch.device}")
    stride = int(points.shape[1])
    if points.shape[0] != npoints or element_offset < 0 or element_offset + batch.size > stride:
        raise InputError(
            f"points has shape {tuple(points.shape)} but the block needs {npoints} points for elements "
            f"[{element_offset}, {element_offset + batch.size})"
        )
    with torch.cuda.device(batch.device):
        cuda.difference_block(
            batch.dtype_name, batch.pointers, batch.offsets, batch.width, addresses, rows,
            points.data_ptr() + element_offset * points.element_size(), stride, npoints, q_begin, count, full,
            prev_begin, prev_count, batch.stream(),
        )


def _f64(x: Any, device: Any) -> Any:
    """x as a flat contiguous float64 tensor on the device (copied only if it is not one already)."""
    import torch

    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    return t.resolve_neg().contiguous().view(-1)  # data_ptr() of a negative view is the un-negated storage


def difference_quotients(
    method: str, spacing: Any, f: Any, f_stride_e: int, f_stride_k: int, f0: Optional[Any] = None,
    f0_stride: int = 0, loss_eps: float = 0.0,
) -> Tuple[Any, Any]:
    """(grad, error) float64 [n] on spacing's device from the loss values f (as _core's)."""
    import torch

    cuda = cuda_module()
    npoints = {"forward": 1, "central": 2, "richardson": 4}.get(method)
    if npoints is None:
        raise ValueError(f"unknown difference method {method!r}; expected forward, central or richardson")
    dev = spacing.device
    if spacing.dim() != 2 or spacing.shape[0] != npoints or spacing.dtype != torch.float64:
        raise InputError(f"spacing must be a float64 [{npoints}, n] tensor for method {method!r}")
    spacing = spacing.resolve_neg().contiguous()
    n = int(spacing.shape[1])
    f_t = _f64(f, dev)
    f0_t = None if f0 is None else _f64(f0, dev)
    if n > 0:
        last = (n - 1) * f_stride_e + (npoints - 1) * f_stride_k
        if last >= f_t.numel():
            raise InputError(f"loss values: {f_t.numel()} given, index {last} needed")
        if method == "forward" and (f0_t is None or (n - 1) * f0_stride >= f0_t.numel()):
            raise InputError("forward differences need f0, the loss at x, with one value per element")
    with torch.cuda.device(dev):
        grad = torch.empty(n, dtype=torch.float64, device=dev)
        error = torch.empty(n, dtype=torch.float64, device=dev)
        cuda.difference_quotients(
            method, n, spacing.data_ptr(), f_t.data_ptr(), f_stride_e, f_stride_k,
            0 if f0_t is None else f0_t.data_ptr(), f0_stride, float(loss_eps), grad.data_ptr(), error.data_ptr(),
            int(torch.cuda.current_stream(dev).cuda_stream),
        )
    return grad, error


def random_block(
    logprobs_list: Sequence[Any], scale: Any, kind: str, seed: int, index_offset: int, antithetic: bool,
    outs: Sequence[Any], q_begin: int, count: int,
) -> None:
    """Rows x +- scale * u_s of perturbations [q_begin, q_begin + count) into the buffers (as _core's)."""
    import torch

    cuda = cuda_module()
    batch = cuda_batch(list(logprobs_list))
    addresses, rows = _out_pointers(outs, batch)
    scale_t = _f64(scale, batch.device)
    if scale_t.numel() != batch.size:
        raise InputError(f"scale has {scale_t.numel()} entries for {batch.size} log-probs")
    with torch.cuda.device(batch.device):
        cuda.random_block(
            batch.dtype_name, batch.pointers, batch.offsets, batch.width, scale_t.data_ptr(), kind, int(seed),
            int(index_offset), bool(antithetic), addresses, rows, q_begin, count, batch.stream(),
        )


def random_estimate(
    kind: str, seed: int, scale: Any, index_offset: int, f: Any, antithetic: bool, f0: float = 0.0
) -> Tuple[Any, Any]:
    """(grad, variance of the mean) float64 [n] on scale's device (as _core's; f0 is a host float)."""
    import torch

    cuda = cuda_module()
    dev = scale.device
    scale_t = _f64(scale, dev)
    f_t = _f64(f, dev)
    per_sample = 2 if antithetic else 1
    if f_t.numel() == 0 or f_t.numel() % per_sample:
        raise InputError(f"loss values: {f_t.numel()} given; expected a positive multiple of {per_sample}")
    n = scale_t.numel()
    with torch.cuda.device(dev):
        grad = torch.empty(n, dtype=torch.float64, device=dev)
        variance = torch.empty(n, dtype=torch.float64, device=dev)
        cuda.random_estimate(
            kind, int(seed), n, int(index_offset), scale_t.data_ptr(), f_t.data_ptr(), f_t.numel() // per_sample,
            bool(antithetic), float(f0), grad.data_ptr(), variance.data_ptr(),
            int(torch.cuda.current_stream(dev).cuda_stream),
        )
    return grad, variance


def random_directions(kind: str, seed: int, sample: int, index_begin: int, count: int, device: Any = "cuda") -> Any:
    """Components [index_begin, index_begin + count) of direction `sample`: float64 [count] on the device."""
    import torch

    cuda = cuda_module()
    dev = torch.device(device)
    with torch.cuda.device(dev):
        out = torch.empty(count, dtype=torch.float64, device=dev)
        cuda.random_directions(
            kind, int(seed), int(sample), int(index_begin), int(count), out.data_ptr(),
            int(torch.cuda.current_stream(dev).cuda_stream),
        )
    return out
