"""Telemetry of one composed-loss call: the seed's JSON (`CustomLossOutput`), flat metrics, and events.

`CustomLossOutput.to_dict()` has exactly the keys of DESIGN.md §7; `flat()` turns it into the flat
`{str: float}` dict a Tinker training client expects as metrics (`reg/<name>/value`, ...).
Events (`LossEvent`) go to an `on_event` callback; `log_events()` adapts them to stdlib logging.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from .errors import _deep_copied, _portable

__all__ = [
    "TermTelemetry",
    "BaseLossTelemetry",
    "RegularizerTelemetry",
    "CustomLossOutput",
    "LossEvent",
    "EventCallback",
    "log_events",
]

_log = logging.getLogger("regrad")


@dataclass
class TermTelemetry:
    """What one term (base loss or regularizer) contributed: value, gradient norm, route, time, custom metrics."""

    value: float
    grad_norm: Optional[float]
    grad_method: str
    duration_ms: float
    custom: Dict[str, float] = field(default_factory=dict)
    nfev: Optional[int] = None  # function evaluations of a numerical route (None for the others)
    grad_error: Optional[float] = None  # the numerical engine's error estimate (None for the others)

    def _extra(self) -> Dict[str, Any]:
        extra: Dict[str, Any] = {}
        if self.nfev is not None:
            extra["nfev"] = self.nfev
        if self.grad_error is not None:
            extra["grad_error"] = self.grad_error
        return extra


@dataclass
class BaseLossTelemetry(TermTelemetry):
    """Telemetry of the base loss (weight 1)."""

    def to_dict(self) -> Dict[str, Any]:
        """Seed keys first (value, grad_norm, custom), then additive ones (grad_method, duration_ms, ...)."""
        out: Dict[str, Any] = {"value": self.value, "grad_norm": self.grad_norm, "custom": dict(self.custom)}
        out["grad_method"] = self.grad_method
        out["duration_ms"] = self.duration_ms
        out.update(self._extra())
        return out


@dataclass
class RegularizerTelemetry(TermTelemetry):
    """Telemetry of one regularizer: adds its weight, contribution = weight·value and the weighted grad norm."""

    weight: float = 0.0

    @property
    def contribution(self) -> float:
        """weight · value: what the term adds to loss_total."""
        return self.weight * self.value + 0.0  # (+ 0.0: weight 0 of a negative value is 0.0, not -0.0)

    @property
    def grad_norm_weighted(self) -> Optional[float]:
        """weight · grad_norm (None with track_grad_norms=False)."""
        return None if self.grad_norm is None else self.weight * self.grad_norm

    def to_dict(self) -> Dict[str, Any]:
        """The keys of DESIGN.md §7, in its order; nfev / grad_error are added for numerical routes."""
        out: Dict[str, Any] = {
            "value": self.value,
            "weight": self.weight,
            "contribution": self.contribution,
            "grad_norm": self.grad_norm,
            "grad_norm_weighted": self.grad_norm_weighted,
            "grad_method": self.grad_method,
            "duration_ms": self.duration_ms,
            "custom": dict(self.custom),
        }
        out.update(self._extra())
        return out


@dataclass
class CustomLossOutput:
    """The full result telemetry of one call: loss_total = base value + Σ weight·value over regularizers."""

    loss_total: float
    base_loss: Optional[BaseLossTelemetry]
    regularizers: Dict[str, RegularizerTelemetry]
    regularizer_total: float
    total_grad_norm: Optional[float]
    duration_ms: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        """The seed's JSON as a dict (regularizers in spec order); `base_loss` is None without a base loss."""
        return {
            "loss_total": self.loss_total,
            "base_loss": None if self.base_loss is None else self.base_loss.to_dict(),
            "regularizers": {name: reg.to_dict() for name, reg in self.regularizers.items()},
            "regularizer_total": self.regularizer_total,
            "total_grad_norm": self.total_grad_norm,
            "duration_ms": self.duration_ms,
        }

    def to_json(self, **json_kwargs: Any) -> str:
        """`to_dict()` as JSON (keyword arguments go to `json.dumps`, e.g. indent=2); strict JSON:
        a non-finite number raises ValueError instead of being written as NaN / Infinity."""
        json_kwargs.setdefault("allow_nan", False)
        return json.dumps(self.to_dict(), **json_kwargs)

    def flat(self) -> Dict[str, float]:
        """Flat Tinker-style metrics: `loss_total`, `base_loss/value`, `reg/<name>/contribution`, ...

        Custom metrics go under `.../custom/<key>` so they never collide with the fixed keys;
        strings (grad_method) and unset grad norms are left out, since metrics are floats.
        """
        out: Dict[str, float] = {"loss_total": self.loss_total, "regularizer_total": self.regularizer_total}
        if self.total_grad_norm is not None:
            out["total_grad_norm"] = self.total_grad_norm
        if self.base_loss is not None:
            _flatten_into(out, "base_loss", self.base_loss.to_dict())
        for name, reg in self.regularizers.items():
            _flatten_into(out, f"reg/{name}", reg.to_dict())
        return out


def _flatten_into(out: Dict[str, float], prefix: str, entry: Dict[str, Any]) -> None:
    for key, value in entry.items():
        if key == "custom":
            for ckey, cvalue in value.items():
                out[f"{prefix}/custom/{ckey}"] = float(cvalue)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)


@dataclass
class LossEvent:
    """One start / stop / exception event, for the whole call (scope "loss") or one term.

    scope: "loss", "base_loss" or "regularizer"; name: "loss", "base_loss" or the regularizer's name;
    time: `time.time()` when emitted; duration_ms, value (stop) and error (exception) when known;
    call: the call's number on its composed loss (1, 2, ...), which ties a late event of a term still
    running after its call failed to that call.
    """

    phase: str
    scope: str
    name: str
    time: float
    duration_ms: Optional[float] = None
    value: Optional[float] = None
    error: Optional[BaseException] = None
    call: int = 0

    def __getstate__(self) -> Dict[str, Any]:
        """Its fields, with an error that survives pickle (as a RegularizerError's cause): a term's exception
        that does not pickle (a lock inside, a class defined in a function) kept the event from crossing a
        process boundary (a multiprocessing queue, a process pool). The event itself keeps its error."""
        state = dict(self.__dict__)
        if self.error is not None:
            state["error"] = _portable(self.error)
        return state

    def __copy__(self) -> "LossEvent":
        """The same error object: copying pickles nothing."""
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: Dict[int, Any]) -> "LossEvent":
        """A deep copy of the error where it copies, else the portable one (deepcopy failed on such an error)."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "error"}, memo))
        copied.error = None if self.error is None else _deep_copied(self.error)
        return copied


EventCallback = Callable[[LossEvent], None]


def emit(on_event: Optional[EventCallback], phase: str, scope: str, name: str, **fields: Any) -> None:
    """Sends an event; a failing callback is logged, never allowed to fail the training step."""
    if on_event is None:
        return
    try:
        on_event(LossEvent(phase, scope, name, time.time(), **fields))
    except Exception:  # noqa: BLE001 - telemetry must not break training
        _log.exception("regrad: on_event callback raised for %s %s %r", scope, phase, name)


def log_events(logger: Optional[logging.Logger] = None, level: int = logging.DEBUG) -> EventCallback:
    """An `on_event` callback writing each event to `logger` (default "regrad"): exceptions at WARNING."""
    return _LogEvents(logger if logger is not None else _log, level)


class _LogEvents:
    """log_events' callback: an object, not a closure, so a composed loss using it pickles (process workers)."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self.logger, self.level = logger, level

    def __call__(self, event: LossEvent) -> None:
        what = "loss" if event.scope == "loss" else f"{event.scope} {event.name!r}"
        if event.phase == "start":
            self.logger.log(self.level, "%s start", what)
        elif event.phase == "stop":
            self.logger.log(self.level, "%s stop: value=%.6g in %.3f ms", what, event.value, event.duration_ms or 0.0)
        else:
            self.logger.warning("%s failed after %.3f ms: %r", what, event.duration_ms or 0.0, event.error)
