"""Exceptions regrad raises: each names the culprit (regularizer, datum, shape)."""

from __future__ import annotations

from ._core import NonFiniteError

__all__ = ["InputError", "NonFiniteError"]


class InputError(ValueError):
    """Input regrad cannot use (wrong type, dtype, shape or device); the message names the datum."""
