"""Type stubs of the private compiled core; use the regrad package instead."""

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

class NonFiniteError(ValueError):
    datum: int
    position: int

def build_info() -> Dict[str, Any]: ...
def regularizer(
    kind: str,
    arrays: Sequence[np.ndarray],
    mask: Optional[npt.NDArray[np.uint8]] = None,
    reduction: str = "mean",
    with_grad: bool = True,
) -> Tuple[float, npt.NDArray[np.float64], np.ndarray]: ...
