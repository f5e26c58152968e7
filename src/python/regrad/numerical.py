"""Numerical gradients of losses torch cannot differentiate, computed by the C++ engine.

`numerical_grad(fn, data, logprobs_list, ...)` returns d(loss)/d(logprobs) for every log-prob by
finite differences (central, forward, Richardson) or randomized estimators (SPSA, Gaussian
smoothing), exploiting the loss's structure when told:

- structure="batch" (alias "dense"): `fn(data, logprobs_list) -> loss`, a black box; 2 calls per
  log-prob (central), or one call per block of perturbed copies with `vectorized=True`.
- structure="datum" (alias "per_sequence"): `fn(datum, logprobs) -> loss`, total = sum over data;
  perturbing datum i re-evaluates only its own term.
- structure="token" (alias "per_token"): `fn(data, logprobs_list) -> per-token losses` shaped like
  the log-probs, total = their sum; the whole gradient costs 2 calls (4 with Richardson), or one
  with `vectorized=True` (datum j arrives as [R, *shape_j]: its copies at the R points).

fn may return a scalar (float, 0-d tensor or array) or a `(loss, metrics)` pair as Tinker's
custom losses do. It receives the log-probs as the caller gave them (torch tensors or numpy
arrays) and must not modify them in place. See docs/numerical.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import math
import numbers
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, NoReturn, Optional, Protocol, Sequence, Tuple, TypedDict, TypeVar, Union, cast, overload

import numpy as np

from . import _core
from ._autograd import LazyFunction, autocast_block, autocast_state, refuse_forward_mode, refuse_functorch, scaled_first_order
from ._arrays import ArrayBatch, as_working_batch, dtype_name, is_torch_tensor, listed, reusable, same_options, split_packed
from ._evaluate import (
    POINT_LABELS,
    BufferPool,
    DifferenceWriter,
    NotRealNumbers,
    Problem,
    StackedPoints,
    Term,
    base_loss,
    block_chunk,
    take_chunk_flight,
    datum_blocks,
    difference_scalar_chunk,
    fill_mapped,
    fn_name,
    mapped,
    real_array,
    split_loss,
)
from ._f0 import given_f0, reads_f0
from ._progress import Progress
from ._randomized import randomized_gradient
from .errors import InputError, NonFiniteError, NumericalError

__all__ = ["NumericalGrad", "NumericalResult", "numerical_grad", "numerical"]

METHODS = ("central", "forward", "richardson", "spsa", "gaussian")
RANDOMIZED = ("spsa", "gaussian")
STRUCTURES = {"batch": "batch", "dense": "batch", "datum": "datum", "per_sequence": "datum",
              "token": "token", "per_token": "token"}
# Blocks larger than this gain nothing (fn's per-call overhead is already amortised) and fall out
# of the CPU caches; max_batch_bytes is the hard limit, this the preferred size (see docs).
PREFERRED_BLOCK_BYTES = 4 << 20
# At most this many chunks of calls are handed to an executor (each chunk is one task).
EXECUTOR_CHUNKS = 64


@dataclass
class NumericalGrad:
    """A numerical gradient and how it was obtained.

    grads / error / variance: one entry per datum, the same type (numpy or torch), dtype and shape as
    the log-probs (None for a log-prob that `regrad.numerical` left out: it needs no gradient). error is
    a per-element error estimate (finite differences: a rounding-error bound, plus the truncation
    estimate |R - D(h/2)| for Richardson, so only Richardson's bounds the actual error; randomized:
    the standard error of the mean; docs/numerical.md measures how far each can be trusted). nfev
    counts loss evaluations (perturbed copies, plus unperturbed ones), ncalls calls to fn.
    """

    grads: List[Any]
    error: List[Any]
    nfev: int
    ncalls: int
    method: str
    structure: str
    dtype: str  # the working dtype the differences were taken in
    dtype_note: Optional[str] = None  # set when float16/bfloat16 inputs were widened
    step_scale: Optional[float] = None  # c of h = c * max(1, |x|) (None with `step` given, and randomized)
    variance: Optional[List[Any]] = None  # randomized methods: variance of the mean, per element
    num_samples: Optional[int] = None
    seed: Optional[int] = None
    blocks: int = 0  # vectorized: number of blocks fn was called on
    block_rows: int = 0  # vectorized: perturbed copies per full block
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest per-element error estimate (0.0 for an empty batch; None entries skipped)."""
        parts = [np.abs(_numpy(e)).reshape(-1) for e in self.error if e is not None]
        return float(max((p.max() for p in parts if p.size), default=0.0))


NumericalResult = NumericalGrad  # DESIGN.md's name for the same result


class NumericalLoss(Protocol):
    """What `numerical(fn)` returns: fn(data, logprobs_list) made differentiable, with the last NumericalGrad
    (typed, so `wrapped.last_result` type-checks as documented; a bare Callable has no such attribute)."""

    last_result: Optional[NumericalGrad]

    def __call__(self, data: Any, logprobs_list: Sequence[Any]) -> Any: ...


# ---- inputs -------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    batch: ArrayBatch  # working arrays (float32 / float64)
    original_dtypes: List[Any]  # per datum: numpy or torch dtype of the caller's input (when widened; else empty)
    dtype_note: Optional[str]


def _numpy(x: Any) -> np.ndarray:
    if is_torch_tensor(x):
        t = x.detach().cpu()
        if str(t.dtype) not in ("torch.float32", "torch.float64"):
            t = t.double()
        return t.numpy()
    return np.asarray(x)


def _prepare_inputs(logprobs_list: Sequence[Any]) -> _Inputs:
    """Widens float16 / bfloat16 to float32 (the working dtype) and checks the ragged batch."""
    if isinstance(logprobs_list, np.ndarray) or is_torch_tensor(logprobs_list):
        raise InputError("logprobs_list must be a list with one array per datum, not a single array")
    items = listed(logprobs_list, "logprobs_list", "arrays")
    refuse_functorch(items)
    batch, originals = as_working_batch(items, keep_tensors=False)
    note = None
    if originals:
        narrow = sorted({dtype_name(d) for d in originals})
        note = f"{' and '.join(narrow)} log-probs were differentiated in float32 (results cast back)"
    return _Inputs(batch, originals, note)


def _as_output(packed: np.ndarray, inputs: _Inputs) -> List[Any]:
    """Per-datum results in the caller's type and dtype."""
    batch = inputs.batch
    parts = split_packed(np.ascontiguousarray(packed, dtype=batch.dtype), batch)
    if inputs.dtype_note is None:
        return parts  # no input was widened: the parts already have the callers' dtype
    if batch.is_torch:
        return [p.to(d) if p.dtype != d else p for p, d in zip(parts, inputs.original_dtypes)]
    return [p.astype(d, copy=False) for p, d in zip(parts, inputs.original_dtypes)]


def _as_output_pair(both: np.ndarray, inputs: _Inputs) -> Tuple[List[Any], List[Any]]:
    """grads and error from one packed [2n] buffer (gradient, then error; float64 or the working
    dtype): torch inputs take one split."""
    batch = inputs.batch
    count = len(batch.shapes)
    if batch.is_torch and inputs.dtype_note is None:
        import torch

        parts: Sequence[torch.Tensor] = torch.from_numpy(both.astype(batch.dtype, copy=False)).split_with_sizes(batch.sizes * 2)
        if batch.shapes and len(batch.shapes[0]) > 1:
            parts = [p.view(s) for p, s in zip(parts, batch.shapes * 2)]
        return list(parts[:count]), list(parts[count:])
    n = len(both) // 2
    return _as_output(both[:n], inputs), _as_output(both[n:], inputs)


def _per_element(value: Any, n: int, batch: ArrayBatch, what: str) -> Optional[np.ndarray]:
    """A scalar or per-element option (one array per datum, or packed [n]) as float64 [n] (or None)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        try:
            out = np.full(n, float(value))
        except OverflowError:  # an int past float64 (10**400)
            raise InputError(f"{what} must be positive and finite; got an integer beyond float64's range") from None
    elif isinstance(value, (list, tuple)):
        if len(value) != len(batch.shapes):
            raise InputError(f"{what} has {len(value)} entries but the batch has {len(batch.shapes)} data")
        parts = []
        for j, (v, shape) in enumerate(zip(value, batch.shapes)):
            a = _real_option(v, f"{what}[{j}]")
            if a.shape != tuple(shape):
                raise InputError(f"{what}[{j}] has shape {a.shape}; datum {j} has {tuple(shape)}")
            parts.append(a.reshape(-1))
        out = np.concatenate(parts) if parts else np.zeros(0)
    else:
        a = _real_option(value, what)
        if a.ndim == 0:
            out = np.full(n, float(a))
        elif a.shape == (n,):
            out = a.copy()
        else:
            raise InputError(f"{what} has shape {a.shape}; expected a scalar, one array per datum, or [{n}] packed")
    if not np.all(np.isfinite(out)) or np.any(out <= 0):
        bad = int(np.flatnonzero(~(np.isfinite(out) & (out > 0)))[0])
        raise InputError(f"{what} must be positive and finite; got {out[bad]} for packed element {bad}")
    return out


def canonical_structure(name: Any) -> Optional[str]:
    """"batch", "datum" or "token" for a structure name or alias; None for anything else (a list too)."""
    return STRUCTURES.get(name) if isinstance(name, str) else None


def check_datum_data(data: Any, count: int) -> None:
    """structure='datum' calls fn(data[j], logprobs_list[j]): data must be a sequence (list, tuple,
    array) of one datum per log-prob array; a dict, a set or a number is named here, not by fn's call."""
    sequence = isinstance(data, (Sequence, np.ndarray)) and not isinstance(data, (str, bytes))
    if not sequence or len(data) != count:
        got = "None" if data is None else f"{len(data)} data" if sequence else f"a {type(data).__name__}"
        raise InputError(f"structure='datum' needs one datum per log-prob array (a list): got {got} for {count} arrays")


def _real_option(value: Any, what: str) -> np.ndarray:
    """An option's array of real numbers as float64, by the rule for fn's losses (real_array): a
    string, a bool, a complex number or None is named, not parsed (numpy reads "0.001" and True)."""
    try:
        return real_array(value)
    except NotRealNumbers as err:
        raise InputError(f"{what} must be a positive number or an array of them; got {err}") from None


def share_executor(options: Mapping[str, Any], memo: Dict[int, Any]) -> None:
    """Makes a deep copy (its memo) share the options' `executor=`: a pool is a resource of this process, not
    state (copying it fails on its lock). For regrad.numerical's wrapper and RegularizerSpec alike."""
    executor = options.get("executor")
    if executor is not None:
        memo.setdefault(id(executor), executor)


def refuse_unpicklable_executor(options: Mapping[str, Any], owner: str) -> None:
    """A TypeError naming owner and `executor=` when the options' executor does not pickle (a thread or process
    pool: pickle cannot carry its threads); the standard pickle decides, as for a RegularizerError's cause, or
    cloudpickle once imported (Dask, loky, Ray pickle with it: it carries what pickle refuses, a local class)."""
    executor = options.get("executor")
    if executor is None:
        return
    try:
        pickle.dumps(executor)
    except Exception as err:  # noqa: BLE001 - whatever pickling the executor raises (a lock, a queue)
        cloudpickle = sys.modules.get("cloudpickle")
        try:
            if cloudpickle is not None and cloudpickle.dumps(executor):
                return  # (pickle itself still fails, with its own error, if it is the pickler)
        except Exception:  # noqa: BLE001 - cloudpickle refuses it too: named below
            pass
        raise TypeError(
            f"{owner}: executor={executor!r} cannot be pickled ({type(err).__name__}: {err}); an executor is a "
            "resource of this process: rebuild it without executor= to send it, and give it one in the process "
            "that runs it"
        ) from err


def check_options(method: str, structure: str, vectorized: bool, executor: Any, max_batch_bytes: Any,
                  num_samples: Any, seed: Any, progress: Any = None) -> str:
    """The canonical structure, once the option values are checked (numerical_grad, regrad.numerical and
    specs share the rule); each bad value is an InputError naming it."""
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    canonical = canonical_structure(structure)
    if canonical is None:
        raise InputError(f"structure must be one of {tuple(STRUCTURES)}, got {structure!r}")
    if canonical == "token" and method in RANDOMIZED:
        raise InputError(
            f"method {method!r} applies to structure 'batch' or 'datum'; with per-token losses "
            "structure='token' gives the central difference of every token in 2 calls"
        )
    if not isinstance(vectorized, (bool, np.bool_)):  # "no" would run the vectorized route by its truth value
        raise InputError(f"vectorized must be True or False, got {vectorized!r}")
    if vectorized and executor is not None:
        raise InputError("executor applies to vectorized=False (a vectorized fn already gets whole blocks)")
    if executor is not None and not callable(getattr(executor, "map", None)):
        raise InputError(f"executor must be a concurrent.futures.Executor, got {type(executor).__name__}")
    if not _is_int(max_batch_bytes) or max_batch_bytes <= 0:
        raise InputError(f"max_batch_bytes must be a positive integer, got {max_batch_bytes!r}")
    if not _is_int(num_samples) or num_samples < 1:
        raise InputError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not _is_int(seed) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if progress is not None and not isinstance(progress, (bool, np.bool_)):  # "no" would read as True
        raise InputError(f"progress must be True, False or None, got {progress!r}")
    return canonical


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (plain ints checked without the slower ABC test)."""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


@functools.lru_cache(maxsize=None)
def _dtype_constants(method: str, dtype: np.dtype) -> Tuple[str, float, float]:
    """(dtype name, relative step c for `method`, machine epsilon) of a working dtype, computed once."""
    name = dtype.name
    return name, _core.difference_step_scale(method, name), float(np.finfo(dtype).eps)


# ---- the engine ---------------------------------------------------------------------------------


_Engine = TypeVar("_Engine", bound=Callable[..., NumericalGrad])


class _CommonFields(TypedDict):
    """The NumericalGrad fields every result of one numerical_grad call shares."""

    method: str
    structure: str
    dtype: str
    dtype_note: Optional[str]


def _outside_inference_mode(engine: _Engine) -> _Engine:
    """Runs the engine with torch's inference mode off: tensors made there (the perturbed copies) have
    no version counter, which the in-place checks read. The caller's tensors are only read. Typed to
    keep the engine's signature for type checkers (a `Callable[..., ...]` return accepted any argument)."""

    @functools.wraps(engine)
    def run(*args: Any, **kwargs: Any) -> NumericalGrad:
        torch = sys.modules.get("torch")
        if torch is not None and torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return engine(*args, **kwargs)
        return engine(*args, **kwargs)

    return cast(_Engine, run)


@_outside_inference_mode
def numerical_grad(
    fn: Callable[..., Any],
    data: Any,
    logprobs_list: Sequence[Any],
    *,
    method: str = "central",
    structure: str = "batch",
    vectorized: bool = False,
    step: Any = None,
    max_batch_bytes: int = 256 << 20,
    executor: Any = None,
    progress: Optional[bool] = None,
    seed: int = 0,
    num_samples: int = 64,
    sigma: Any = None,
    antithetic: bool = True,
    f0: Any = None,
) -> NumericalGrad:
    """d(loss)/d(logprobs) of `fn` by finite differences or a randomized estimator.

    logprobs_list: one [T_i] or [T_i, K] array per datum (numpy or CPU torch; float32/64, float16
    and bfloat16 are widened to float32). Returns a NumericalGrad whose grads match the inputs.
    method: "central" (default, O(h^2)), "forward" (O(h)), "richardson" (O(h^4)), "spsa", "gaussian".
    step: None (h = c * max(1, |x|), c = eps^(1/3), eps^(1/2) for forward), or an absolute step
    (scalar, one array per datum, or packed). vectorized: fn takes a leading dimension of P
    perturbed copies and returns P losses (structure "token": P per-token losses per datum, in one
    call). executor: maps chunks of calls (vectorized=False).
    progress: True / False, or None to show a bar when the run is predicted to exceed a few seconds.
    seed, num_samples, sigma (perturbation scale, default the central step), antithetic: randomized.
    f0: fn's loss at the unperturbed log-probs when the caller has it (method="forward", or spsa /
    gaussian with antithetic=False): one loss ("batch"), one per datum ("datum") or the per-token
    losses ("token"), as fn returns them; the run then skips that evaluation (scipy's f0).
    """
    if not callable(fn):
        raise InputError(f"fn must be callable, got {type(fn).__name__}")
    data = reusable(data)
    structure_name = check_options(method, structure, vectorized, executor, max_batch_bytes, num_samples, seed,
                                   progress)
    # Python ints from here: a numpy integer wraps in the engine's products (np.uint8(200) * 2 antithetic
    # evaluations is 144, so 72 samples ran while the result said 200; np.int8(100) * 2 is -56)
    max_batch_bytes, num_samples, seed = int(max_batch_bytes), int(num_samples), int(seed)
    if not isinstance(antithetic, (bool, np.bool_)):  # a string or None would be read by truth value (or fail in C++)
        raise InputError(f"antithetic must be True or False, got {antithetic!r}")
    inputs = _prepare_inputs(logprobs_list)
    if executor is not None and inputs.batch.is_torch:
        inputs.batch = inputs.batch.owned()
    batch = inputs.batch
    shapes = batch.shapes
    offsets = np.array(list(itertools.accumulate(batch.sizes, initial=0)), np.int64)
    n = int(offsets[-1])
    width = int(shapes[0][1]) if shapes and len(shapes[0]) == 2 else 1
    if structure_name == "datum":
        check_datum_data(data, len(shapes))
    problem = Problem(fn, data, structure_name, batch, offsets, width)
    problem.f0 = given_f0(f0, problem, method, antithetic, vectorized)
    scale: Union[float, np.ndarray, None]  # the relative step c; randomized methods: sigma, per element
    dtype_name, scale, loss_eps = _dtype_constants("central" if method in RANDOMIZED else method, batch.dtype)
    common: _CommonFields = dict(method=method, structure=structure_name, dtype=dtype_name, dtype_note=inputs.dtype_note)

    if n == 0:
        zeros = np.zeros(0)
        if method in RANDOMIZED:  # the randomized fields as for any other batch (variance: one empty array per datum)
            return NumericalGrad(_as_output(zeros, inputs), _as_output(zeros, inputs), 0, 0, **common,
                                 variance=_as_output(zeros, inputs), num_samples=num_samples, seed=seed,
                                 info={"sigma_default": sigma is None, "antithetic": antithetic})
        return NumericalGrad(_as_output(zeros, inputs), _as_output(zeros, inputs), 0, 0, **common,
                             step_scale=None if step is not None else scale)

    saved = _snapshot(problem, method, vectorized, antithetic)
    try:
        if method in RANDOMIZED:
            central_scale = scale
            x = np.concatenate([a.reshape(-1) for a in batch.arrays]).astype(np.float64)
            scale = _per_element(sigma, n, batch, "sigma")
            if scale is None:
                scale = central_scale * np.maximum(1.0, np.abs(x))
            # checks x +- sigma is representable; the steps taken are x +- sigma rounded to the working dtype
            try:
                spacing = _difference_points(problem, "central", 1.0, scale)[1]
            except NumericalError as err:  # its text says "step" and "h": here the option is sigma
                what = "the default sigma (the central step)" if sigma is None else "sigma"
                raise NumericalError(f"{err} [method={method!r}: h is {what}, the perturbation scale; pass "
                                     f"sigma= (step= applies to finite differences only)]") from None
            # SPSA's points are exactly these (u = +-1): divide by the half-width actually taken, as the
            # finite differences do, so rounding x +- sigma (float32, small sigma) does not bias the estimate.
            taken = scale
            if method == "spsa":
                taken = spacing[0] - spacing[1]
                taken *= 0.5  # (in place: one [n] temporary fewer at the run's peak)
            del spacing  # (held with the points and x for the whole run, they were half of its peak memory)
            if method == "gaussian":
                _check_gaussian_range(problem, x, scale)
            del x
            grad, variance, nfev, ncalls, blocks, rows = randomized_gradient(
                problem, _terms(problem), method, scale, seed, num_samples, antithetic, vectorized,
                max_batch_bytes, _block_rows, executor, progress, taken,
            )
            del scale, taken  # not needed for the outputs made below
            _check_gradient_finite(problem, grad)
            _check_snapshot(problem, saved)
            return NumericalGrad(
                _as_output(grad, inputs), _as_output(np.sqrt(variance), inputs), nfev, ncalls, **common,
                variance=_as_output(variance, inputs), num_samples=num_samples, seed=seed, blocks=blocks, block_rows=rows,
                info={"sigma_default": sigma is None, "antithetic": antithetic, **_loss_precision(problem, method, loss_eps, sigma is None)},
            )

        step_values = _per_element(step, n, batch, "step")
        if structure_name == "token":
            if vectorized:
                both, nfev = _token_gradient_stacked(problem, method, scale, step_values, loss_eps, max_batch_bytes, progress)
            else:
                points, _ = _difference_points(problem, method, scale, step_values, with_spacing=False)
                both, nfev = _token_gradient(problem, method, points, loss_eps, executor, progress)
            _check_snapshot(problem, saved)
            grads, error = _as_output_pair(_with_input_rounding(problem, method, both, scale, step_values, loss_eps), inputs)
            return NumericalGrad(grads, error, nfev, 1 if vectorized else nfev, **common,
                                 step_scale=None if step is not None else scale, blocks=int(vectorized),
                                 block_rows=nfev if vectorized else 0, info=_loss_precision(problem, method, loss_eps, step is None))
        points, spacing = _difference_points(problem, method, scale, step_values)
        with problem.no_grad():  # once for the run: the no_grad of each chunk of calls is then a no-op
            both, nfev, ncalls, blocks, rows = _separable_gradient(
                problem, method, points, spacing, loss_eps, vectorized, max_batch_bytes, executor, progress
            )
        _check_snapshot(problem, saved)
        grads, error = _as_output_pair(_with_input_rounding(problem, method, both, scale, step_values, loss_eps), inputs)
        return NumericalGrad(
            grads, error, nfev, ncalls, **common, step_scale=None if step is not None else scale, blocks=blocks,
            block_rows=rows, info=_loss_precision(problem, method, loss_eps, step is None),
        )
    except BaseException:  # fn failed or was stopped: the caller still gets its own values back
        _restore(problem, saved)
        raise


# the relative step c that suits a loss rounding at eps: eps ** power (the defaults' rule)
_STEP_POWER = {"forward": 1 / 2, "central": 1 / 3, "richardson": 1 / 5, "spsa": 1 / 3, "gaussian": 1 / 3}


def _loss_precision(problem: Problem, method: str, working_eps: float, default_step: bool) -> Dict[str, Any]:
    """When fn's losses were narrower than the working dtype (a float32 loss of float64 log-probs):
    info saying so, and with the default steps a RuntimeWarning. The error estimate already used
    the losses' epsilon."""
    eps = problem.loss_eps
    if eps <= working_eps:
        return {}
    suggested = eps ** _STEP_POWER[method]
    if default_step:
        warnings.warn(
        f"{problem.name} returned losses of a narrower float than the {problem.batch.dtype.name} log-probs "
            f"(machine epsilon {eps:.2g}): the default steps suit {problem.batch.dtype.name} losses, so rounding "
            f"dominates the differences; .error reports it. Return {problem.batch.dtype.name} losses, or pass an "
            f"absolute {'sigma' if method in RANDOMIZED else 'step'}= of about {suggested:.1g} * max(1, |x|) per "
            f"element (the {method} rule for that precision)",
            RuntimeWarning,
            stacklevel=3,
        )
    return {"loss_eps": eps, "suggested_step_scale": suggested}


# How far rounded inputs move a quotient, in units of eps * |x| * |g| / h: forward 1 (x + h and x each
# move by up to eps/2 * |x|, over a span h), central 1/2 (a span 2h), Richardson (4 * 1 + 1/2) / 3
# (R = (4 D(h/2) - D(h)) / 3, D(h/2) over a span h).
_INPUT_ROUNDING = {"forward": 1.0, "central": 0.5, "richardson": 1.5}


def _with_input_rounding(problem: Problem, method: str, both: np.ndarray, scale: float,
                         step: Optional[np.ndarray], working_eps: float) -> np.ndarray:
    """Packed [grad, error], with the error widened when fn's losses were narrower than the log-probs: fn
    then most likely rounded its inputs to that float too, which moves every point by up to eps/2 * |x|,
    an error of k * eps * |x| * |g| / h the loss's own rounding term does not see (measured: float32 sin(3x)
    of float64 log-probs was up to 5,000x past the error before). Conservative where fn only rounded its result."""
    eps = problem.loss_eps
    if eps <= working_eps:
        return both
    n = len(both) // 2
    x = np.abs(np.concatenate([a.reshape(-1) for a in problem.batch.arrays]).astype(np.float64))
    h = scale * np.maximum(1.0, x) if step is None else step
    out = both.astype(np.float64)
    out[n:] += _INPUT_ROUNDING[method] * eps * x * np.abs(out[:n]) / h
    return out.astype(both.dtype, copy=False)


# The largest |u| the Gaussian directions reach: Box-Muller on 53-bit uniforms, sqrt(-2 ln 2^-53).
_GAUSSIAN_MAX = math.sqrt(-2.0 * math.log(2.0**-53))


def _check_gaussian_range(problem: Problem, x: np.ndarray, scale: np.ndarray) -> None:
    """Gaussian points x + sigma * u (x packed, float64) reach |u| up to ~8.57 times sigma: raise if one
    would overflow the working dtype (float32 with sigma above ~4e37), instead of handing fn an
    infinite log-prob."""
    dtype = problem.batch.dtype
    reach = np.abs(x) + _GAUSSIAN_MAX * scale
    bad = np.flatnonzero(~(reach <= float(np.finfo(dtype).max)))
    if bad.size:
        e = int(bad[0])
        raise NumericalError(
            f"sigma {scale[e]:.6g} at {problem.describe_element(e)} (x = {x[e]:.6g}): x + sigma * u overflows "
            f"{dtype.name} for Gaussian directions (|u| reaches {_GAUSSIAN_MAX:.3g}); use a smaller sigma"
        )


def _snapshot(problem: Problem, method: str, vectorized: bool, antithetic: bool) -> Optional[List[np.ndarray]]:
    """Copies of torch log-probs that fn gets as they are (scalar runs: the unperturbed data; forward
    and one-sided estimates: the base call), to catch in-place changes. numpy ones go as read-only views."""
    handed = (
        (not vectorized and problem.structure != "token" and method not in RANDOMIZED)
        or method == "forward"
        or (method in RANDOMIZED and not antithetic)
    )
    return [a.copy() for a in problem.arrays] if handed and problem.is_torch else None


def _restore(problem: Problem, saved: Optional[List[np.ndarray]]) -> Optional[str]:
    """Puts back the caller's values that fn changed; says where the first change was (None: none)."""
    if saved is None:  # (problem.arrays would build numpy views of a torch batch)
        return None
    first = None
    for j, (now, before) in enumerate(zip(problem.arrays, saved)):
        if not np.array_equal(now, before):
            i = int(np.flatnonzero(now.reshape(-1) != before.reshape(-1))[0])
            first = first or f"datum {j}, element {i} changed"
            np.copyto(now, before)
    return first


def _check_snapshot(problem: Problem, saved: Optional[List[np.ndarray]]) -> None:
    """Raises (after putting the caller's values back) if fn changed the log-probs it was handed."""
    changed = _restore(problem, saved)
    if changed:
        raise problem.modified_error(f"the run: {changed}; the caller's values were put back")


def _difference_points(
    problem: Problem, method: str, scale: float, step: Optional[np.ndarray], with_spacing: bool = True,
    stacked: bool = False, out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Any]:
    """Points [P, n] in the working dtype (stacked: each datum's rows as one [R, T_i] block, flat; into
    `out` when given) and, if asked, the steps taken [P, n] (float64; else None)."""
    try:
        return _core.difference_points(  # type: ignore[call-overload]
            problem.batch.core_arrays, method, scale, step, with_spacing, stacked, out
        )
    except NonFiniteError:
        raise
    except ValueError as err:
        if str(err).startswith(("step underflow", "step overflow", "step too small")):
            raise NumericalError(str(err)) from None
        raise InputError(str(err)) from None


def _terms(problem: Problem) -> List[Term]:
    offsets = problem.offsets.tolist()
    if problem.structure == "datum":
        return [Term([j], offsets[j], offsets[j + 1]) for j in range(len(offsets) - 1) if offsets[j + 1] > offsets[j]]
    return [Term(list(range(len(offsets) - 1)), 0, offsets[-1])]


def _block_rows(problem: Problem, term: Term, nq: int, max_batch_bytes: int) -> int:
    """Perturbed copies per block: as many as fit max_batch_bytes, preferring cache-sized blocks."""
    copy_bytes = term.size * problem.batch.dtype.itemsize
    limit = max_batch_bytes // copy_bytes
    if limit < 1:
        where = f"datum {term.datums[0]}" if problem.structure == "datum" else "the batch"
        raise NumericalError(
            f"max_batch_bytes={max_batch_bytes} cannot hold one perturbed copy of {where} ({copy_bytes} bytes)"
        )
    preferred = max(1, min(max_batch_bytes, PREFERRED_BLOCK_BYTES) // copy_bytes)
    return int(min(nq, limit, preferred))


def _one_block_each(problem: Problem, terms: List[Term], npoints: int, max_batch_bytes: int) -> bool:
    """Whether _block_rows gives every term all its perturbations in one block (the largest term decides)."""
    largest = max(term.size for term in terms)
    nbytes = npoints * largest * largest * problem.batch.dtype.itemsize
    return nbytes <= min(max_batch_bytes, PREFERRED_BLOCK_BYTES)


def _chunks(total: int, count: int) -> List[Tuple[int, int]]:
    size = max(1, -(-total // count))
    return [(q, min(q + size, total)) for q in range(0, total, size)]


class _Pace:
    """Spans of consecutive scalar calls for one run: the first a single call (progress=None decides
    after it), then as many as take about 0.1 s at the pace so far, at most 256 (per-span overhead
    stays amortised and a progress bar still moves for a slow fn)."""

    CAP, TARGET_S = 256, 0.1

    def __init__(self) -> None:
        self.calls = 0
        self.start = time.perf_counter()

    def spans(self, total: int) -> Iterator[Tuple[int, int]]:
        q = 0
        while q < total:
            per_call = (time.perf_counter() - self.start) / self.calls if self.calls else math.inf
            size = 1 if not self.calls else int(max(1, min(self.CAP, self.TARGET_S / max(per_call, 1e-9))))
            q1 = min(total, q + size)
            yield q, q1
            self.calls += q1 - q
            q = q1


def _separable_gradient(
    problem: Problem, method: str, points: np.ndarray, spacing: np.ndarray, loss_eps: float, vectorized: bool,
    max_batch_bytes: int, executor: Any, progress: Optional[bool],
) -> Tuple[np.ndarray, int, int, int, int]:
    """Structures "batch" and "datum": one term (all data) or one term per datum. Returns the
    gradient and error packed [2n], nfev, ncalls, blocks and the rows of the largest block."""
    npoints = len(POINT_LABELS[method])
    n = int(problem.offsets[-1])
    terms = _terms(problem)
    f = np.empty(n * npoints)
    f0 = np.zeros(n) if method == "forward" else None
    base_calls = method == "forward" and problem.f0 is None  # fn at x once per term, unless the caller gave f0
    nfev = ncalls = blocks = max_rows = 0
    single = vectorized and problem.structure == "datum" and _one_block_each(problem, terms, npoints, max_batch_bytes)
    if single:
        plan = [(term, term.size * npoints, term.size * npoints) for term in terms]
    else:
        plan = [(term, term.size * npoints, _block_rows(problem, term, term.size * npoints, max_batch_bytes)
                 if vectorized else 1) for term in terms]
    total_calls = sum(-(-nq // rows) for _, nq, rows in plan) + (len(terms) if base_calls else 0)
    bar = Progress.for_run(total_calls, progress, method, problem.structure)
    pool = BufferPool.shared()
    pace = _Pace()
    try:
        for term, nq, rows in plan:
            if f0 is not None:
                f0[term.e0 : term.e1] = base_loss(problem, term, vectorized)
            if base_calls:
                nfev += 1
                ncalls += 1
                bar.update(1)
            if single:
                continue
            out = f[term.e0 * npoints : term.e1 * npoints]
            if vectorized:
                writer = DifferenceWriter(points, method, problem.is_torch)
                out[:] = block_chunk(problem, term, writer, 0, nq, rows, True, pool, bar)
                blocks += -(-nq // rows)
                ncalls += -(-nq // rows)
                max_rows = max(max_rows, rows)
            elif executor is None:
                for q0, q1 in pace.spans(nq):
                    out[q0:q1] = difference_scalar_chunk(problem, term, points, method, q0, q1)
                    bar.update(q1 - q0)
                ncalls += nq
            else:
                spans = _chunks(nq, EXECUTOR_CHUNKS)
                calls = [(problem, term, points, method, q0, q1) for q0, q1 in spans]
                fill_mapped(out, executor, difference_scalar_chunk, calls, spans, problem, bar,
                            functools.partial(_span_where, problem, term, method))
                ncalls += nq
            nfev += nq
        if single:  # every datum in one block: the lean loop
            datum_blocks(problem, terms, DifferenceWriter(points, method, problem.is_torch), f, pool, bar)
            nfev += n * npoints
            ncalls += len(terms)
            blocks += len(terms)
            max_rows = max(nq for _, nq, _ in plan)
    finally:
        bar.close()
        pool.release()
    both = _core.difference_quotients(method, spacing, f, npoints, 1, f0, 1, max(loss_eps, problem.loss_eps), True)
    _check_gradient_finite(problem, both[:n])
    return both, nfev, ncalls, blocks, max_rows


def _check_gradient_finite(problem: Problem, grad: np.ndarray) -> None:
    """Raises _gradient_overflow at the first element of a packed gradient that is not finite once
    rounded to the working dtype (fn's losses were all finite: only the quotients can overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a float64 value past float32's range casts to inf
        finite = np.isfinite(grad.astype(problem.batch.dtype, copy=False))
    if not finite.all():
        e = int(np.flatnonzero(~finite)[0])
        _gradient_overflow(problem, e, grad[e])


def _gradient_overflow(problem: Problem, e: int, value: Any) -> NoReturn:
    """Every loss was finite but a difference quotient is not (losses ~1e308 apart, a float32 gradient
    past 3.4e38): named, instead of an inf / NaN gradient handed back without a word."""
    raise NonFiniteError(
        f"the numerical gradient of {problem.name} at {problem.describe_element(e)} is {float(value):.6g}, not finite "
        f"in {problem.batch.dtype.name}: every loss was finite, but their differences divided by the step overflow; "
        "scale the loss down or use a larger step"
    )


def _token_gradient(
    problem: Problem, method: str, points: np.ndarray, loss_eps: float, executor: Any, progress: Optional[bool] = None
) -> Tuple[np.ndarray, int]:
    """Structure "token": every element perturbed at once, one call per point (2, or 4 for Richardson),
    and one pass in C++ over fn's per-datum outputs (no packing, steps recomputed from the points)."""
    given = problem.f0 if method == "forward" else None  # the caller's per-token losses at x: no call for them
    ks = list(range(len(POINT_LABELS[method]))) + ([-1] if method == "forward" and given is None else [])
    bar = Progress.for_run(len(ks), progress, method, problem.structure)
    values: List[Any] = []  # per call, fn's per-token losses of each datum (then f0 when given)
    try:
        if executor is None:
            for k in ks:
                values.append(_token_call(problem, k, points, method))
                bar.update(1)
        else:
            count = len(ks)
            calls = [(problem, k, points, method) for k in ks]
            n, shapes, offsets = int(problem.offsets[-1]), problem.batch.shapes, problem.offsets.tolist()
            where = [_token_where(method, k) for k in ks].__getitem__  # call i's points, for errors
            with contextlib.closing(mapped(executor, _token_call_packed, calls, [n] * count, where)) as chunks:
                for packed in chunks:
                    values.append([packed[o0:o1].reshape(shape) for shape, o0, o1 in zip(shapes, offsets, offsets[1:])])
                    bar.update(1, mapped=True)
            for call in values:
                problem.see_loss(call[0])
    finally:
        bar.close()
    if given is not None:
        values.append(given)
        ks.append(-1)
    loss_eps = max(loss_eps, problem.loss_eps)
    try:
        both, bad = _core.token_quotients(method, problem.batch.core_arrays, points, values, loss_eps)
    except (TypeError, ValueError):
        # fn's outputs mix dtypes or are not contiguous or aligned: one contiguous copy of each, then the same
        # pass; float32 stays float32 (the float pass: the same bits as for contiguous outputs), else float64.
        for v in itertools.chain.from_iterable(values):
            problem.see_loss(v)
        loss_eps = max(loss_eps, problem.loss_eps)
        dtype = _common_loss_dtype(itertools.chain.from_iterable(values))
        values = [[np.require(v, dtype, ["C", "A"]) for v in call] for call in values]
        both, bad = _core.token_quotients(method, problem.batch.core_arrays, points, values, loss_eps)
    if bad >= 0:
        n = int(problem.offsets[-1])
        call, e = divmod(bad, n)
        j = int(np.searchsorted(problem.offsets, e, side="right") - 1)
        value = values[call][j].reshape(-1)[e - int(problem.offsets[j])]
        if given is not None and call == len(ks) - 1:  # the caller's f0 (its finiteness is checked here, in C++)
            raise NonFiniteError(f"f0[{j}] holds the non-finite loss {value} at element {e - int(problem.offsets[j])} "
                                 f"of datum {j}")
        raise NonFiniteError(
            f"{problem.name} returned a non-finite per-token loss ({value}) at {_token_where(method, ks[call])}, "
            f"{problem.describe_element(e)}"
        )
    if bad <= -2:
        _gradient_overflow(problem, -2 - bad, both[-2 - bad])
    return both, len(ks) - (given is not None)


def _token_gradient_stacked(
    problem: Problem, method: str, scale: float, step: Optional[np.ndarray], loss_eps: float, max_batch_bytes: int,
    progress: Optional[bool] = None,
) -> Tuple[np.ndarray, int]:
    """Structure "token" with a vectorized fn: one call, datum j as a contiguous [R, *shape_j] array
    of its copies (rows: the points, plus x for forward), and the same C++ pass reading them. The
    copies live in this thread's StackedPoints, reused (with fn's views of them) across calls."""
    rows = len(POINT_LABELS[method]) + (method == "forward")
    block_bytes = rows * int(problem.offsets[-1]) * problem.batch.dtype.itemsize
    if block_bytes > max_batch_bytes:  # the one call needs every row at once: nothing to split into blocks
        raise NumericalError(
            f"max_batch_bytes={max_batch_bytes} cannot hold the {rows} stacked copies of the batch ({block_bytes} "
            f"bytes) that structure='token' with vectorized=True hands fn in one call; raise max_batch_bytes or "
            f"pass vectorized=False ({rows} calls of one copy each)"
        )
    # One call: the automatic mode never shows a bar for it (it decides after the first call), so only
    # progress=True makes one (and this hot path pays nothing otherwise).
    bar = Progress.for_run(1, True, method, problem.structure) if progress else None
    held = StackedPoints.acquire(problem, rows)
    keep = False  # a failed run (fn raised, or changed its views in place) leaves nothing for the next one
    try:
        points = _difference_points(problem, method, scale, step, False, True, held.points)[0]
        both = _stacked_call(problem, method, points, held, loss_eps)
        keep = held.untouched()
        if bar is not None:
            bar.update(1)
        return both, rows
    finally:
        held.release(keep)
        if bar is not None:
            bar.close()


def _stacked_call(problem: Problem, method: str, points: np.ndarray, held: StackedPoints, loss_eps: float) -> np.ndarray:
    """fn on the stacked copies, then gradient and error (packed [2n]) from its per-token losses."""
    where = _stacked_where(method)
    shapes = held.shapes
    rows = shapes[0][0]
    with problem.no_grad():
        out = problem.invoke_unmodified(held.term, held.views, where, one_base=True)  # views of one flat tensor
    values = problem.token_values(out, where, shapes)  # numpy views, or the tensors' addresses
    problem.see_loss(out[0])
    loss_eps = max(loss_eps, problem.loss_eps)
    try:
        both, bad = _core.token_quotients(method, problem.batch.core_arrays, points, values, loss_eps, True)
    except (TypeError, ValueError):
        for v in out:
            problem.see_loss(v)
        loss_eps = max(loss_eps, problem.loss_eps)
        arrays = [_numpy(v) for v in out]
        values = [np.require(a, _common_loss_dtype(arrays), ["C", "A"]) for a in arrays]
        both, bad = _core.token_quotients(method, problem.batch.core_arrays, points, values, loss_eps, True)
    if bad >= 0:
        n = int(problem.offsets[-1])
        row, e = divmod(bad, n)
        j = int(np.searchsorted(problem.offsets, e, side="right") - 1)
        value = _numpy(out[j]).reshape(rows, -1)[row, e - int(problem.offsets[j])]
        label = _stacked_labels(method).split(", ")[row]
        raise NonFiniteError(
            f"{problem.name} returned a non-finite per-token loss ({value}) in row {row} ({label}) of the stacked "
            f"copies, {problem.describe_element(e)}"
        )
    if bad <= -2:
        _gradient_overflow(problem, -2 - bad, both[-2 - bad])
    return both


def _common_loss_dtype(arrays: Any) -> Any:
    """float32 when every per-token loss array is float32 (the core's float pass, as for contiguous
    outputs), else float64."""
    return np.float32 if all(a.dtype == np.float32 for a in arrays) else np.float64


def _stacked_labels(method: str) -> str:
    return ", ".join(("x" + label for label in POINT_LABELS[method])) + (", x" if method == "forward" else "")


@functools.lru_cache(maxsize=None)
def _stacked_where(method: str) -> str:
    rows = len(POINT_LABELS[method]) + (method == "forward")
    return f"the stacked copies of every log-prob ({rows} rows: {_stacked_labels(method)})"


def _span_where(problem: Problem, term: Term, method: str, q0: int, q1: int) -> str:
    """Perturbations [q0, q1) of a term, for errors about an executor's chunk of them."""
    first = problem.describe_difference(q0, term, method)
    return first if q1 - q0 == 1 else f"the perturbations [{q0}, {q1}) ({first} first)"


def _token_where(method: str, k: int) -> str:
    if k < 0:
        return "the unperturbed log-probs"
    labels = POINT_LABELS[method]
    return f"every log-prob at step {labels[k]} (call {k + 1} of {len(labels)})"


def _token_call(problem: Problem, k: int, points: np.ndarray, method: str) -> List[np.ndarray]:
    """Per-token losses with every element at point k (k = -1: unperturbed), one numpy array per datum."""
    source = [problem.fn_view(a) for a in problem.arrays] if k < 0 else problem.packed_views(points[k])
    term = Term(list(range(len(problem.sizes))), 0, int(problem.offsets[-1]))
    where = _token_where(method, k)
    with problem.no_grad():
        out = problem.invoke_unmodified(term, source, where, one_base=k >= 0)  # the points: views of one row
    values = problem.token_values(out, where)
    problem.see_loss(out[0])  # one look at the precision of fn's per-token losses
    return values


def _token_call_packed(problem: Problem, k: int, points: np.ndarray, method: str) -> np.ndarray:
    """_token_call's per-token losses packed into one vector (what an executor hands back; float32
    stays float32, so the quotients have the same bits as without an executor). Data of different
    dtypes are packed as float64 after noting each one's precision, as the sequential run's float64
    pass does (concatenating would otherwise promote float16 to float32 and hide it, or float32 to
    float64: other bits, and an error estimate blind to the narrower losses)."""
    take_chunk_flight()  # taken (one call of fn, nothing to check): fn's own runs must not read this run's
    values = _token_call(problem, k, points, method)
    if len({v.dtype for v in values}) > 1:
        for v in values:
            problem.see_loss(v)
        return np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in values])
    return np.concatenate([np.asarray(v).reshape(-1) for v in values])


# ---- torch.autograd.Function wrapper ------------------------------------------------------------


# what regrad.numerical passes on to numerical_grad (its keyword-only options; f0 is per call: the
# wrapper passes forward's loss itself)
_WRAPPER_OPTIONS = frozenset(
    name for name, p in inspect.signature(numerical_grad).parameters.items() if p.kind is p.KEYWORD_ONLY
) - {"f0"}


def numerical(fn: Callable[..., Any], **options: Any) -> NumericalLoss:
    """Wraps `fn(data, logprobs_list)` so torch autograd differentiates it numerically.

    The wrapper calls fn once (forward) and returns what fn returns, the loss as a 0-d torch tensor:
    `(loss, metrics)` if fn returns a pair, else `loss`. When a log-prob tensor requires grad, the
    loss is the output of a torch.autograd.Function whose backward runs `numerical_grad(fn, data,
    logprobs_list, **options)` and returns grad_output times the gradient, so `loss.backward()`
    (and Tinker's forward_backward_custom) work unchanged. `wrapped.last_result` holds the last
    NumericalGrad. numpy inputs: fn's return value is passed through untouched. The wrapper pickles
    and copies with fn and the options (not last_result) when they pickle (docs/numerical.md).
    """
    if not callable(fn):
        raise InputError(f"fn must be callable, got {type(fn).__name__}")
    unknown = sorted(set(options) - _WRAPPER_OPTIONS)
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for regrad.numerical; it takes {sorted(_WRAPPER_OPTIONS)}")
    structure = canonical_structure(options.get("structure", "batch"))
    if structure is None:
        raise InputError(f"structure must be one of {tuple(STRUCTURES)}, got {options.get('structure')!r}")
    if structure != "batch" or options.get("vectorized"):
        raise InputError(
            "regrad.numerical wraps a plain fn(data, logprobs_list) -> loss; for structure='datum'/'token' or "
            "vectorized fns call regrad.numerical_grad directly"
        )
    check_options(options.get("method", "central"), "batch", options.get("vectorized", False),
                  options.get("executor"), options.get("max_batch_bytes", 256 << 20), options.get("num_samples", 64),
                  options.get("seed", 0), options.get("progress"))

    return _Numerical(fn, options)


class _Numerical:
    """What `numerical(fn, **options)` returns: an object of a module-level class, not a closure, so the
    wrapped loss pickles when fn and the options do (process pools, multiprocessing; pickle refused the
    closure under fn's name: "not the same object as" fn) and copies as an object (a copy was the same
    function, sharing last_result). Pickles and copies carry fn and the options, not last_result."""

    last_result: Optional[NumericalGrad]

    def __init__(self, fn: Callable[..., Any], options: Dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)  # __name__, __doc__, __wrapped__ (signature) as functools.wraps gave
        self.fn, self.options = fn, dict(options)
        self.last_result = None

    def __reduce__(self) -> tuple:
        """fn and the options (checked by numerical() already); runtime state (last_result) is not carried.
        An executor= that does not pickle is a TypeError naming the wrapper and the option."""
        refuse_unpicklable_executor(self.options, f"regrad.numerical of {fn_name(self.fn)}")
        return (type(self), (self.fn, self.options))

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Numerical":
        """fn and the options copied, an `executor=` shared (share_executor; the function this used to be
        was never copied)."""
        share_executor(self.options, memo)
        return type(self)(copy.deepcopy(self.fn, memo), copy.deepcopy(self.options, memo))

    def __eq__(self, other: object) -> bool:
        """The same fn and equal options (arrays by value), as RegularizerSpec compares: a spec of a wrapper
        was unequal to its own pickle round trip or deep copy (wrappers compared by identity)."""
        if type(other) is not type(self):
            return NotImplemented
        return bool(self.fn == other.fn) and same_options(self.options, other.options)

    def __hash__(self) -> int:
        """fn's hash (options may be arrays or lists, which do not hash): equal wrappers hash alike. An
        unhashable fn (a @dataclass loss object) gives the class's hash: such a wrapper hashed by identity
        before, and a spec holding it must stay hashable."""
        try:
            return hash((type(self), self.fn))
        except TypeError:
            return hash(type(self))

    def __copy__(self) -> "_Numerical":
        """fn and the options' values shared (not through __reduce__, which refuses an executor that does
        not pickle: a shallow copy pickles nothing)."""
        return type(self)(self.fn, self.options)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"regrad.numerical({self.fn!r}{options})"

    def __call__(self, data: Any, logprobs_list: Sequence[Any]) -> Any:
        fn, options = self.fn, self.options
        data = reusable(data)  # forward and backward both call fn with it
        tensors = list(logprobs_list)
        if not tensors or not all(is_torch_tensor(t) for t in tensors):
            return fn(data, tensors)  # (the list: logprobs_list may have been a one-shot iterator)
        import torch

        refuse_functorch(tensors)
        refuse_forward_mode(tensors)
        differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if differentiated:
            _check_batch_wrt(tensors)
        detached = [t.detach() for t in tensors]
        with torch.no_grad():
            out = fn(data, detached)
        loss = split_loss(out)
        if is_torch_tensor(loss) and loss.is_floating_point():
            dtype = loss.dtype
        else:  # a Python / numpy number: kept at least float32 (float16 would turn 7e4 into inf)
            dtype = tensors[0].dtype if tensors[0].dtype in (torch.float32, torch.float64) else torch.float32
        try:  # real numbers only, as numerical_grad reads fn's losses: "1.5" is not parsed, True is not 1.0
            array = loss.detach() if is_torch_tensor(loss) and loss.is_floating_point() else real_array(loss)
        except (TypeError, ValueError) as err:
            what = str(err) if isinstance(err, NotRealNumbers) and str(err) else type(loss).__name__
            raise NumericalError(f"{fn_name(fn)} returned {what}; expected a scalar loss") from err
        shape = tuple(array.shape)
        if shape != () and (differentiated or not is_torch_tensor(loss) or math.prod(shape) != 1):
            # one number, as the backward's numerical_grad reads it ([0.5] and array([0.5]) passed here, and then
            # failed there); a 1-element tensor is read as before when nothing is differentiated
            what = f"{type(loss).__name__} of shape {shape}"
            raise NumericalError(f"{fn_name(fn)} returned {what}; expected a scalar loss (a float or a 0-d tensor)")
        number = float(array.reshape(()))
        value = torch.as_tensor(number, dtype=dtype)
        if differentiated:
            # forward's loss is backward's f0 when the engine would evaluate fn at x again, unless the engine
            # widens the tensors (float16: fn then computes in float32 and its loss may differ) or fn ran under
            # torch.autocast (bfloat16 matmuls; backward's evaluations usually run outside the block); a
            # non-finite loss is not: the engine then names fn's loss at the unperturbed log-probs, not an f0
            # never given
            reused = reads_f0(options.get("method", "central"), options.get("antithetic", True)) and math.isfinite(
                number) and all(t.dtype in (torch.float32, torch.float64) for t in tensors) and not autocast_state()
            run = {**options, "f0": number} if reused else options
            value = _NumericalFunction.apply(value, (self, fn, data, run), *tensors)
        return (value, out[1]) if loss is not out else value


def _numerical_function() -> Any:
    import torch

    class NumericalFunction(torch.autograd.Function):
        """A loss value whose backward pass is regrad.numerical_grad of the wrapped fn."""

        @staticmethod
        def forward(ctx: Any, value: Any, spec: Tuple[Any, ...], *tensors: Any) -> Any:  # noqa: D401
            ctx.spec = spec
            ctx.save_for_backward(*tensors)
            return value.clone()

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            wrapped, fn, data, options = ctx.spec
            saved = ctx.saved_tensors
            wrt = [i for i, needed in enumerate(ctx.needs_input_grad[2:]) if needed]
            # no graph of its own; and fn in float32 even when backward runs under torch.autocast (a term on compose's
            # pool re-enters the caller's, or backward() inside the block): bfloat16 rounds away the engine's steps
            with torch.no_grad(), autocast_block(autocast_state(), enabled=False):
                result = _numerical_grad_wrt(fn, data, [t.detach() for t in saved], wrt, options)
            wrapped.last_result = result
            return (None, None, *scaled_first_order(grad_output, result.grads, saved))  # outside no_grad: see there

    return NumericalFunction


def _check_batch_wrt(tensors: List[Any]) -> None:
    """Raises what backward's numerical_grad would for the tensors that require grad (the ones it
    differentiates): named when the loss is computed, not after the rest of the step."""
    wrt = [i for i, t in enumerate(tensors) if t.requires_grad]
    try:
        _prepare_inputs([tensors[i] for i in wrt])
    except InputError as err:
        raise (err if len(wrt) == len(tensors) else _renumbered(err, wrt)) from None


def _numerical_grad_wrt(fn: Callable[..., Any], data: Any, tensors: List[Any], wrt: List[int],
                        options: Dict[str, Any]) -> NumericalGrad:
    """numerical_grad of fn w.r.t. the tensors listed in `wrt` only (the others held fixed, their entries
    None in the result): a tensor that needs no gradient costs no evaluations."""
    if len(wrt) == len(tensors):
        return numerical_grad(fn, data, tensors, **options)

    try:
        some_of = _SomeOf(fn, tensors, wrt, copy_fixed=options.get("executor") is not None)
        result = numerical_grad(some_of, data, [tensors[i] for i in wrt], **_per_datum_options_wrt(options, tensors, wrt))
    except (InputError, NumericalError, NonFiniteError) as err:
        raise _renumbered(err, wrt) from err

    @overload
    def spread(part: List[Any]) -> List[Any]: ...
    @overload
    def spread(part: None) -> None: ...
    def spread(part: Optional[List[Any]]) -> Optional[List[Any]]:
        if part is None:
            return None
        full: List[Any] = [None] * len(tensors)
        for i, value in zip(wrt, part):
            full[i] = value
        return full

    return dataclasses.replace(result, grads=spread(result.grads), error=spread(result.error),
                               variance=spread(result.variance), info={**result.info, "wrt": list(wrt)})


class _SomeOf:
    """fn of the tensors listed in `wrt`, the others held at their values: a module-level class, not a
    closure under fn's name, so process executors can pickle it. With an executor it holds copies of the
    fixed tensors: a process pool's pickler moves a tensor's storage into shared memory in place."""

    def __init__(self, fn: Callable[..., Any], tensors: List[Any], wrt: List[int], copy_fixed: bool) -> None:
        moving = set(wrt)
        self.fn, self.wrt = fn, list(wrt)
        self.fixed = [None if i in moving else t.clone() if copy_fixed and is_torch_tensor(t) else t
                      for i, t in enumerate(tensors)]
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        self.__qualname__ = self.__name__ = name  # errors name fn

    def __call__(self, data: Any, moving: Sequence[Any]) -> Any:
        full = list(self.fixed)
        for i, t in zip(self.wrt, moving):
            full[i] = t
        return self.fn(data, full)


def _per_datum_options_wrt(options: Dict[str, Any], tensors: List[Any], wrt: List[int]) -> Dict[str, Any]:
    """options with per-element `step` / `sigma` (one array per datum, or packed over every log-prob, as the
    caller gave them for the whole logprobs_list) cut down to the tensors in `wrt`; scalars unchanged."""
    out = dict(options)
    sizes = [int(np.prod(tuple(t.shape))) for t in tensors]
    bounds = list(itertools.accumulate(sizes, initial=0))
    for key in ("step", "sigma"):
        value = out.get(key)
        if value is None or isinstance(value, (numbers.Real, str, bytes)):
            continue
        if isinstance(value, (list, tuple)):
            if len(value) == len(tensors):
                out[key] = [value[i] for i in wrt]
            continue
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) == 1 and shape[0] == bounds[-1]:  # packed over the whole batch
            packed = _numpy(value).reshape(-1)
            out[key] = np.concatenate([packed[bounds[i] : bounds[i + 1]] for i in wrt]) if wrt else packed[:0]
    return out


def _renumbered(err: Exception, wrt: List[int]) -> Exception:
    """err, saying that its datum numbers count only the log-probs that require grad (and `.datum` remapped)."""
    shown = ", ".join(f"{j} is logprobs_list[{i}]" for j, i in enumerate(wrt[:6])) + (", ..." if len(wrt) > 6 else "")
    out = type(err)(f"{err} [only the log-prob tensors that require grad ({len(wrt)}) were differentiated, "
                    f"so datum numbers here count those: datum {shown}]")
    for name, value in vars(err).items():
        setattr(out, name, value)
    datum = getattr(err, "datum", None)
    if isinstance(datum, int) and 0 <= datum < len(wrt):
        out.datum = wrt[datum]  # type: ignore[attr-defined]
    return out


_NumericalFunction = LazyFunction(_numerical_function)
