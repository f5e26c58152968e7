"""Exceptions regrad raises: each names the culprit (regularizer, datum, shape)."""

from __future__ import annotations

import copy
import pickle

from ._core import NonFiniteError

__all__ = ["InputError", "NonFiniteError", "NumericalError", "RegularizerError"]

# The core sets .datum / .position on what it raises; one raised in Python about no single input element
# (a non-finite loss, a quotient overflow) reads None instead of raising AttributeError.
NonFiniteError.datum = None  # type: ignore[assignment]
NonFiniteError.position = None  # type: ignore[assignment]


class InputError(ValueError):
    """Input regrad cannot use (wrong type, dtype, shape or device); the message names the datum."""


class RegularizerError(RuntimeError):
    """A regularizer (or the base loss) failed: raised, timed out, or returned a non-finite or non-scalar loss.

    `name` is the regularizer's name and `cause` the underlying exception (also `__cause__`).
    """

    def __init__(self, name: str, cause: BaseException) -> None:
        self.name = name
        self.cause = cause
        detail = str(cause) or type(cause).__name__
        super().__init__(f"regularizer {name!r} failed: {type(cause).__name__}: {detail}")

    def _attributes(self) -> dict:
        """Its attributes but the cause (.name, and any a caller added), which pickle and copy carry over."""
        return {k: v for k, v in vars(self).items() if k != "cause"}

    def __reduce__(self) -> tuple:
        """Rebuilt without __init__ (same message, other attributes kept), and with a cause that survives
        pickle: executors pickle a worker's exception, and a user exception whose __init__ takes other
        arguments than its args cannot be unpickled (a process pool then broke: BrokenProcessPool)."""
        return (_rebuilt, (type(self), self.args, _portable(self.cause), self._attributes()))

    def __copy__(self) -> "RegularizerError":
        """The same cause object: copying pickles nothing (through __reduce__, a cause that does not
        pickle, or only with cloudpickle, became a RuntimeError in the copy)."""
        return _rebuilt(type(self), self.args, self.cause, self._attributes())

    def __deepcopy__(self, memo: dict) -> "RegularizerError":
        """A deep copy of the cause where it copies (a class defined in a function does), else the portable one."""
        err = _rebuilt(type(self), self.args, self.cause, {})
        memo[id(self)] = err  # (before the attributes, which may refer back to the error)
        err.__dict__.update(copy.deepcopy(self._attributes(), memo))
        err.cause = _deep_copied(self.cause)
        return err


def _deep_copied(cause: BaseException) -> BaseException:
    """A deep copy of cause where it copies (a class defined in a function does), else the portable one."""
    try:  # a memo of its own: a copy that fails midway leaves entries under ids that Python then reuses
        return copy.deepcopy(cause, {})
    except Exception:  # noqa: BLE001 - whatever copying the cause raises (a lock inside, an __init__ mismatch)
        return _portable(cause)


def _portable(cause: BaseException) -> BaseException:
    """cause if it survives a pickle round trip, else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(cause))
    except Exception:  # noqa: BLE001 - whatever the cause's pickling raises
        return RuntimeError(f"{type(cause).__qualname__}: {cause} (the original exception cannot be pickled)")
    return cause


def _rebuilt(cls: type, args: tuple, cause: BaseException, state: dict) -> RegularizerError:
    """A RegularizerError (or subclass) from its args, cause and attributes, as pickle and copy build it."""
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    err.cause = cause
    return err


class NumericalError(ValueError):
    """A numerical gradient could not be computed: fn raised or returned the wrong shape, a step
    underflowed (x + h == x), or max_batch_bytes cannot hold one perturbed copy. The message names
    fn and the perturbation (datum, token, step)."""
