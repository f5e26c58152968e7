"""Regularizer specs: a named, weighted `fn(data, logprobs_list) -> (loss, metrics)` and its gradient route.

`RegularizerSpec.sync / async_ / with_grad / from_dict` build and validate specs (errors name the spec);
`l1`, `l2`, `entropy` are built-in specs backed by the C++ kernels (analytic gradient).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, kernels
from ._arrays import as_array_batch, same_options, token_mask
from .data import loss_input
from .errors import InputError
from .grad import NUMERICAL_OPTIONS, NUMERICAL_ROUTES, ROUTES, has_analytic, scalar_value

__all__ = ["RegularizerSpec", "SpecLike", "as_spec", "as_specs", "l1", "l2", "entropy", "KernelRegularizer"]

# data is Any: fn gets the caller's data as given, so a fn typed for Tinker (List[Datum]) is accepted
LossFn = Callable[[Any, List[Any]], Any]


@dataclass(frozen=True, eq=False)
class RegularizerSpec:
    """A validated regularizer: name, weight ≥ 0, fn, route (`grad`), and route / timing options.

    Build it with `sync`, `async_`, `with_grad` or `from_dict`; a plain dict
    `{"fn", "weight", "name"}` is accepted wherever a spec is.
    """

    name: str
    weight: float
    fn: LossFn
    is_async: bool = False
    grad: str = "auto"
    grad_fn: Optional[Callable[..., Any]] = None
    timeout: Optional[float] = None  # seconds, for async specs; None waits forever
    numerical_options: Mapping[str, Any] = field(default_factory=dict, hash=False)  # (compared, a dict is not hashable)

    def __post_init__(self) -> None:
        _check_name(self.name)
        object.__setattr__(self, "weight", _check_weight(self.name, self.weight))
        object.__setattr__(self, "numerical_options", dict(self.numerical_options))
        if self.grad == "auto" and self.grad_fn is not None:  # auto's first choice is the user's grad_fn
            object.__setattr__(self, "grad", "user")
        self.validate()

    @classmethod
    def sync(cls, name: str, weight: float, fn: LossFn, *, grad: str = "auto", **numerical_options: Any) -> "RegularizerSpec":
        """A regular (`def`) regularizer; numerical_options go to regrad.numerical_grad for numerical routes."""
        if "timeout" in numerical_options:  # (not a numerical option: say what it is for)
            raise ValueError(f"regularizer {name!r}: timeout applies to async (`async def`) regularizers only "
                             "(RegularizerSpec.async_)")
        if "grad_fn" in numerical_options:
            raise ValueError(f"regularizer {name!r}: a grad_fn is given with RegularizerSpec.with_grad(name, weight, "
                             "fn, grad_fn), not sync()")
        return cls(name, weight, fn, False, grad, None, None, numerical_options)

    @classmethod
    def async_(
        cls,
        name: str,
        weight: float,
        fn: LossFn,
        *,
        timeout: Optional[float] = 30.0,
        grad: str = "auto",
        grad_fn: Optional[Callable[..., Any]] = None,
        **numerical_options: Any,
    ) -> "RegularizerSpec":
        """An `async def` regularizer, awaited on the composition's event loop; fails after `timeout` s."""
        if grad_fn is not None and grad == "auto":
            grad = "user"
        return cls(name, weight, fn, True, grad, grad_fn, timeout, numerical_options)

    @classmethod
    def with_grad(cls, name: str, weight: float, fn: LossFn, grad_fn: Callable[..., Any]) -> "RegularizerSpec":
        """A regularizer with its own gradient: `grad_fn(data, logprobs_list)` returns one gradient per datum."""
        _check_callable(f"regularizer {name!r}", "grad_fn", grad_fn)
        is_async = is_async_fn(fn)
        return cls(name, weight, fn, is_async, "user", grad_fn, 30.0 if is_async else None)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "RegularizerSpec":
        """The seed's Python form `{"fn": f, "weight": 0.1, "name": "topology"}` (async fns detected).

        Optional keys: "grad", "grad_fn", "timeout" (async only) and "numerical_options" (a dict).
        """
        if not isinstance(spec, Mapping):
            raise TypeError(f"a regularizer spec must be a RegularizerSpec or a dict, got {type(spec).__name__}")
        label = spec.get("name", "<unnamed>")
        missing = [k for k in ("fn", "weight", "name") if k not in spec]
        if missing:
            raise ValueError(f"regularizer spec {label!r} is missing {missing} (needs 'fn', 'weight', 'name')")
        unknown = sorted(set(spec) - _DICT_KEYS, key=repr)  # (keys of any type: a typo'd key may not be a str)
        if unknown:
            raise ValueError(f"regularizer spec {label!r} has unknown keys {unknown}; allowed: {sorted(_DICT_KEYS)}")
        fn = spec["fn"]
        is_async = is_async_fn(fn)
        grad_fn = spec.get("grad_fn")
        grad = spec.get("grad", "user" if grad_fn is not None else "auto")
        if "timeout" in spec and not is_async:
            raise ValueError(f"regularizer {label!r}: 'timeout' applies to async (`async def`) regularizers only")
        timeout = spec.get("timeout", 30.0) if is_async else None
        options = spec.get("numerical_options")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"regularizer {label!r}: 'numerical_options' must be a dict, got {type(options).__name__}")
        options = dict(options or {})
        return cls(spec["name"], spec["weight"], fn, is_async, grad, grad_fn, timeout, options)

    def __eq__(self, other: object) -> bool:
        """Field by field, as the dataclass did; option values that are arrays or tensors (a per-element
        `step=` or `sigma=`) compare by value, not through their ambiguous truth value."""
        if type(other) is not type(self):
            return NotImplemented
        names = ("name", "weight", "fn", "is_async", "grad", "grad_fn", "timeout")
        if any(getattr(self, f) != getattr(other, f) for f in names):
            return False
        return same_options(self.numerical_options, other.numerical_options)

    def __hash__(self) -> int:
        return hash((self.name, self.weight, self.fn, self.is_async, self.grad, self.grad_fn, self.timeout))

    def __getstate__(self) -> Dict[str, Any]:
        """Its fields, for pickle; an `executor=` option that does not pickle (a thread or process pool) is a
        TypeError naming the spec and the option (pickle's own error named neither: "cannot pickle
        '_queue.SimpleQueue' object")."""
        from .numerical import refuse_unpicklable_executor  # (lazy, as in _validate_options)

        refuse_unpicklable_executor(self.numerical_options, f"regularizer {self.name!r}")
        return dict(self.__dict__)

    def __copy__(self) -> "RegularizerSpec":
        """The same field values (through __getstate__, a spec with an executor could not be copied)."""
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: Dict[int, Any]) -> "RegularizerSpec":
        """The fields copied, an `executor=` option shared, as regrad.numerical's wrapper does (a deep copy
        failed on the pool's lock: "cannot pickle '_queue.SimpleQueue' object")."""
        from .numerical import share_executor

        share_executor(self.numerical_options, memo)
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def validate(self) -> None:
        """Checks name, weight, fn arity, async flag, route and options; every message names the spec."""
        _check_name(self.name)
        _check_weight(self.name, self.weight)
        label = f"regularizer {self.name!r}"
        _check_callable(label, "fn", self.fn)
        actually_async = is_async_fn(self.fn)
        if actually_async and not self.is_async:
            raise TypeError(f"{label}: fn is an `async def` function; use RegularizerSpec.async_")
        if self.is_async and not actually_async:
            raise TypeError(f"{label}: RegularizerSpec.async_ needs an `async def` fn; use RegularizerSpec.sync")
        if self.grad not in ROUTES:
            raise ValueError(f"{label}: grad={self.grad!r} is not a route; expected one of {ROUTES}")
        if self.grad_fn is not None:
            _check_callable(label, "grad_fn", self.grad_fn)
            if self.grad != "user":
                raise ValueError(f"{label}: a grad_fn is used by grad='user' only, not grad={self.grad!r}")
        elif self.grad == "user":
            raise ValueError(f"{label}: grad='user' needs a grad_fn (use RegularizerSpec.with_grad)")
        if self.grad == "analytic" and not has_analytic(self.fn):
            raise ValueError(f"{label}: grad='analytic' needs a built-in fn with value_and_grad (e.g. regrad.l1)")
        if is_async_fn(self.grad_fn) and not self.is_async:
            raise TypeError(f"{label}: an `async def` grad_fn needs an `async def` fn")
        self._validate_options(label)
        if self.timeout is not None:
            if not self.is_async:
                raise ValueError(f"{label}: timeout applies to async regularizers only")
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, Real) or not self.timeout > 0:
                raise ValueError(f"{label}: timeout must be a positive number of seconds or None, got {self.timeout!r}")

    def _validate_options(self, label: str) -> None:
        unknown = sorted(set(self.numerical_options) - NUMERICAL_OPTIONS)
        if unknown:
            raise ValueError(f"{label}: unknown numerical options {unknown}; known: {sorted(NUMERICAL_OPTIONS)}")
        if self.numerical_options and self.grad not in NUMERICAL_ROUTES + ("auto",):
            raise ValueError(f"{label}: numerical options apply to grad='auto' or a numerical route, not {self.grad!r}")
        if "method" in self.numerical_options and self.grad in ("spsa", "gaussian"):
            raise ValueError(f"{label}: grad={self.grad!r} sets the method; drop method=")
        if self.numerical_options and self.grad == "auto" and has_analytic(self.fn):
            raise ValueError(
                f"{label}: numerical options {sorted(self.numerical_options)} are unused: grad='auto' takes the "
                "fn's analytic route (value_and_grad); pass grad='numerical' to differentiate it numerically"
            )
        method = self.grad if self.grad in _RANDOMIZED else self.numerical_options.get("method", "central")
        randomized = isinstance(method, str) and method in _RANDOMIZED
        unused = sorted(set(self.numerical_options) & (_DIFFERENCE_ONLY if randomized else _RANDOMIZED_ONLY))
        if unused:
            hint = ("spsa / gaussian perturb by sigma=" if randomized
                    else "they apply to grad='spsa' / 'gaussian' (or method='spsa' / 'gaussian')")
            raise ValueError(f"{label}: numerical options {unused} are unused by method {method!r}; {hint}")
        if self.grad in NUMERICAL_ROUTES or self.numerical_options:  # the values too, as regrad.numerical does
            from .numerical import check_options  # (lazy: numerical imports the engine)

            opts = self.numerical_options
            try:
                check_options(method, opts.get("structure", "batch"), opts.get("vectorized", False),
                              opts.get("executor"), opts.get("max_batch_bytes", 256 << 20),
                              opts.get("num_samples", 64), opts.get("seed", 0), opts.get("progress"))
            except InputError as err:
                raise ValueError(f"{label}: {err}") from None


_DICT_KEYS = frozenset({"fn", "weight", "name", "grad", "grad_fn", "timeout", "numerical_options"})
_RANDOMIZED = ("spsa", "gaussian")
_RANDOMIZED_ONLY = frozenset({"num_samples", "sigma", "seed", "antithetic"})  # numerical_grad reads them for spsa / gaussian only
_DIFFERENCE_ONLY = frozenset({"step"})  # central / forward / richardson only

SpecLike = Union[RegularizerSpec, Mapping[str, Any]]


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"regularizer name must be a non-empty string, got {name!r}")
    if "/" in name:  # flat() keys are reg/<name>/<field>: "a/custom" would collide with a's custom metrics
        raise ValueError(f"regularizer name {name!r} contains '/', which separates the keys of flat() metrics")


def _check_weight(name: Any, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (Real, np.floating, np.integer)):
        raise TypeError(f"regularizer {name!r}: weight must be a real number, got {type(weight).__name__}")
    try:
        value = float(weight) + 0.0  # (-0.0 becomes 0.0)
    except OverflowError:  # an int beyond float64
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"regularizer {name!r}: weight must be finite and >= 0, got {weight!r}")
    return value


def is_async_fn(fn: Any) -> bool:
    """True for an `async def` function (or a partial of one) and for an object whose `__call__` is
    `async def`: calling either returns a coroutine, which must be awaited, not read as a loss."""
    while isinstance(fn, functools.partial):  # a partial of an async callable object calls that object
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    return fn is not None and not inspect.isroutine(fn) and inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _check_callable(label: str, what: str, fn: Any) -> None:
    """fn must be callable as fn(data, logprobs_list)."""
    if not callable(fn):
        raise TypeError(f"{label}: {what} must be callable, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(f"{label}: {what}{signature} cannot be called as {what}(data, logprobs_list)") from None


def as_spec(spec: SpecLike) -> RegularizerSpec:
    """A RegularizerSpec from a spec or the seed's dict form."""
    if isinstance(spec, RegularizerSpec):
        spec.validate()
        return spec
    return RegularizerSpec.from_dict(spec)


def as_specs(specs: Iterable[SpecLike]) -> Tuple[RegularizerSpec, ...]:
    """Specs from specs or dicts, with unique names (the names key the telemetry)."""
    if isinstance(specs, (RegularizerSpec, Mapping, str, bytes)) or not isinstance(specs, Iterable):
        raise TypeError(
            f"regularizers must be a list of RegularizerSpecs or dicts; got a single {type(specs).__name__}: "
            "wrap it in a list, regularizers=[...]"
        )
    out = tuple(as_spec(s) for s in specs)
    seen: Dict[str, int] = {}
    for i, spec in enumerate(out):
        if spec.name in seen:
            raise ValueError(f"regularizer name {spec.name!r} is used twice (positions {seen[spec.name]} and {i})")
        seen[spec.name] = i
    return out


# ---------------------------------------------------------------------------------------------
# Built-in specs on the C++ kernels


class KernelRegularizer:
    """`fn(data, logprobs_list) -> (loss, metrics)` for a C++ kernel, with its analytic `value_and_grad`.

    Metrics: `<kind>_total` (Σ over data), `<kind>_mean` (per datum); l1 also reports `l1_norm` (the value).
    Equal (and hashing alike) when kind, reduction and mask are, so `regrad.l1(0.1) == regrad.l1(0.1)`
    as for any two equal specs; the three are read-only for that reason.
    """

    __slots__ = ("_key",)

    def __init__(self, kind: str, *, reduction: str = "mean", mask: Optional[str] = None) -> None:
        if kind not in kernels.KERNELS:
            raise ValueError(f"unknown kernel {kind!r}; expected one of {kernels.KERNELS}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if mask is not None and not isinstance(mask, str):  # a list of arrays would be read as keys, then fail
            raise TypeError(f"mask must be a loss_fn_inputs key (a str) or None, got {type(mask).__name__}")
        self._key: Tuple[str, str, Optional[str]] = (kind, reduction, mask)

    @property
    def kind(self) -> str:
        """The kernel: "l1", "l2", "l2_norm" or "entropy"."""
        return self._key[0]

    @property
    def reduction(self) -> str:
        """"mean" (over data) or "sum"."""
        return self._key[1]

    @property
    def mask(self) -> Optional[str]:
        """A loss_fn_inputs key (e.g. "weights"): tokens where it is > 0 count."""
        return self._key[2]

    def __eq__(self, other: object) -> bool:
        return self._key == other._key if type(other) is KernelRegularizer else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"KernelRegularizer({self.kind!r}, reduction={self.reduction!r}, mask={self.mask!r})"

    def __call__(self, data: Sequence[Any], logprobs_list: List[Any]) -> Tuple[Any, Dict[str, float]]:
        """Runs the kernel; for torch inputs the loss is a tensor whose backward uses the kernel's gradient."""
        result = kernels.regularizer(self.kind, logprobs_list, reduction=self.reduction, mask=self._masks(data))
        return result.value, self._metrics(scalar_value(result.value), np.asarray(result.per_datum, dtype=np.float64))

    def value_and_grad(self, data: Sequence[Any], arrays: List[np.ndarray]) -> Tuple[float, np.ndarray, Dict[str, float]]:
        """(value, packed gradient, metrics) in one C++ pass over numpy views of the log-probs."""
        masks = self._masks(data)
        # the C++ core checks dtype, shape and contiguity itself: no second Python pass over the batch
        packed_mask = None if masks is None else token_mask(masks, as_array_batch(arrays))
        value, per_datum, packed = _core.regularizer(self.kind, list(arrays), packed_mask, self.reduction, True)
        return float(value), packed, self._metrics(float(value), per_datum)

    def _masks(self, data: Sequence[Any]) -> Optional[List[np.ndarray]]:
        if self.mask is None:
            return None
        return [loss_input(d, self.mask, i) for i, d in enumerate(data)]

    def _metrics(self, value: float, per_datum: np.ndarray) -> Dict[str, float]:
        total = float(per_datum.sum())
        name = "l2" if self.kind == "l2_norm" else self.kind
        metrics = {f"{name}_total": total, f"{name}_mean": total / max(len(per_datum), 1)}
        if self.kind == "l1":
            metrics["l1_norm"] = value  # the seed's telemetry key
        return metrics


def _builtin(kind: str, name: str, weight: float, reduction: str, mask: Optional[str], grad: str, options: Dict[str, Any]) -> RegularizerSpec:
    try:
        fn = KernelRegularizer(kind, reduction=reduction, mask=mask)
    except (ValueError, TypeError) as err:  # named like every other spec error
        raise type(err)(f"regularizer {name!r}: {err}") from None
    return RegularizerSpec.sync(name, weight, fn, grad=grad, **options)


def l1(weight: float, *, name: str = "l1", reduction: str = "mean", mask: Optional[str] = None, grad: str = "auto", **numerical_options: Any) -> RegularizerSpec:
    """Spec for Σ_t |lp_t| per datum (mean over data by default), on the C++ kernel; mask names a loss_fn_inputs key."""
    return _builtin("l1", name, weight, reduction, mask, grad, numerical_options)


def l2(
    weight: float,
    *,
    name: str = "l2",
    reduction: str = "mean",
    squared: bool = True,
    mask: Optional[str] = None,
    grad: str = "auto",
    **numerical_options: Any,
) -> RegularizerSpec:
    """Spec for Σ_t lp_t² per datum (or the norm √Σ lp_t² with squared=False), on the C++ kernel."""
    if not isinstance(squared, (bool, np.bool_)):  # "False" would read as True
        raise TypeError(f"regularizer {name!r}: squared must be True or False, got {squared!r}")
    return _builtin("l2" if squared else "l2_norm", name, weight, reduction, mask, grad, numerical_options)


def entropy(weight: float, *, name: str = "entropy", reduction: str = "mean", mask: Optional[str] = None, grad: str = "auto", **numerical_options: Any) -> RegularizerSpec:
    """Spec for -Σ exp(lp)·lp per datum (Σ_t H(p_t) for [T, K] log-distributions), on the C++ kernel."""
    return _builtin("entropy", name, weight, reduction, mask, grad, numerical_options)
