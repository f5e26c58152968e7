"""regrad: fast, correct gradients for custom training losses on token log-probabilities."""

import os as _os
import typing as _typing
from typing import Any as _Any
from typing import Dict as _Dict

try:
    from . import _core
except ImportError as err:  # pragma: no cover - only without a compiled core
    raise ImportError(
        "regrad's compiled core (regrad._core) could not be imported: did you build and install "
        "the package (`pip install .` or `make test`)? Original error: " + str(err)
    ) from err


def _serial_openmp_in_forked_child() -> None:
    """GNU OpenMP's thread team does not survive fork(): a child's first parallel loop waits forever
    for threads that were never copied. A forked child runs the core's loops on one thread (the
    same bits: results never depend on the thread count)."""
    try:
        import ctypes

        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)
    except (OSError, AttributeError):  # another OpenMP runtime (which survives fork), or none
        pass


if _core.build_info().get("openmp") and hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_serial_openmp_in_forked_child)

try:
    from . import _cuda  # type: ignore[attr-defined]
except ImportError:
    _cuda = None  # type: ignore[assignment]  # no CUDA build: regrad._cuda is None

from . import kernels, losses, telemetry
from ._check import check
from .compose import ComposedLoss, compose
from .data import Datum, ModelInput, data_from_texts, datum_from_text
from .errors import InputError, NonFiniteError, NumericalError, RegularizerError
from .numerical import NumericalGrad, NumericalResult, numerical, numerical_grad
from .specs import RegularizerSpec, entropy, l1, l2
from .telemetry import CustomLossOutput, LossEvent, log_events

_NEEDS_TORCH = ("LocalTrainingClient", "AdamParams", "forward_backward_custom", "CustomLossResult")
_HAS_TORCH = True
try:  # the training clients need torch (the `regrad[torch]` extra)
    from .clients import AdamParams, CustomLossResult, LocalTrainingClient, forward_backward_custom
except ImportError as _err:  # only without torch
    if _err.name != "torch":
        raise
    _HAS_TORCH = False

__version__: str = _core.build_info()["version"]

__all__ = [
    "__version__", "build_info", "kernels", "losses", "telemetry",
    "InputError", "NonFiniteError", "NumericalError", "RegularizerError",
    "Datum", "ModelInput", "datum_from_text", "data_from_texts",
    "RegularizerSpec", "compose", "ComposedLoss", "l1", "l2", "entropy",
    "CustomLossOutput", "LossEvent", "log_events",
    "numerical_grad", "numerical", "check", "NumericalGrad", "NumericalResult",
    *(_NEEDS_TORCH if _HAS_TORCH else ()),
]


# Hidden from type checkers: with a module __getattr__ they read any unknown `regrad.x` (a typo) as Any.
if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> _Any:
        """Names that need torch, asked for without it: say how to get it (not a bare AttributeError)."""
        if name in _NEEDS_TORCH:
            raise ImportError(f"regrad.{name} needs torch, which is not installed: pip install 'regrad[torch]'")
        raise AttributeError(f"module 'regrad' has no attribute {name!r}")


def build_info() -> _Dict[str, _Any]:
    """What this build has: version, openmp (bool), max_threads, cuda (bool), compiler, simd."""
    info = dict(_core.build_info())
    info["cuda"] = _cuda is not None
    return info
