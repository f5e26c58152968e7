"""regrad: fast, correct gradients for custom training losses on token log-probabilities."""

from __future__ import annotations

from typing import Any, Dict

try:
    from . import _core
except ImportError as err:  # pragma: no cover - only without a compiled core
    raise ImportError(
        "regrad's compiled core (regrad._core) could not be imported: did you build and install "
        "the package (`pip install .` or `make test`)? Original error: " + str(err)
    ) from err

try:
    from . import _cuda  # type: ignore[attr-defined]
except ImportError:
    _cuda = None

from . import kernels
from .errors import InputError, NonFiniteError

__version__: str = _core.build_info()["version"]

__all__ = ["__version__", "build_info", "kernels", "InputError", "NonFiniteError"]


def build_info() -> Dict[str, Any]:
    """What this build has: version, openmp (bool), max_threads, cuda (bool), compiler."""
    info = dict(_core.build_info())
    info["cuda"] = _cuda is not None
    return info
