"""Exceptions regrad raises: each names the culprit (regularizer, datum, shape)."""

from __future__ import annotations

from ._core import NonFiniteError

__all__ = ["InputError", "NonFiniteError", "NumericalError", "RegularizerError"]


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

    def __reduce__(self) -> tuple:
        return (type(self), (self.name, self.cause))


class NumericalError(ValueError):
    """A numerical gradient could not be computed: fn raised or returned the wrong shape, a step
    underflowed (x + h == x), or max_batch_bytes cannot hold one perturbed copy. The message names
    fn and the perturbation (datum, token, step)."""
