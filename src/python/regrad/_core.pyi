"""Type stubs of the private compiled core; use the regrad package instead."""

from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, overload

import numpy as np
import numpy.typing as npt

class NonFiniteError(ValueError):
    datum: Optional[int]
    position: Optional[int]

def build_info() -> Dict[str, Any]: ...
def regularizer(
    kind: str,
    arrays: Sequence[np.ndarray],
    mask: Optional[npt.NDArray[np.uint8]] = None,
    reduction: str = "mean",
    with_grad: bool = True,
) -> Tuple[float, npt.NDArray[np.float64], np.ndarray]: ...

# ---- numerical-gradient engine (bind_numerical.cpp) ----

def difference_step_scale(method: str, dtype: str) -> float: ...
@overload
def difference_points(
    arrays: Sequence[np.ndarray],
    method: str,
    scale: float,
    step: Optional[npt.NDArray[np.float64]] = None,
    with_spacing: Literal[True] = True,
    stacked: Literal[False] = False,
    out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, npt.NDArray[np.float64]]: ...
@overload
def difference_points(
    arrays: Sequence[np.ndarray],
    method: str,
    scale: float,
    step: Optional[npt.NDArray[np.float64]],
    with_spacing: Literal[False],
    stacked: bool = False,
    out: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, None]: ...
def difference_block(
    arrays: Sequence[np.ndarray],
    outs: Sequence[np.ndarray],
    points: np.ndarray,
    element_offset: int,
    npoints: int,
    q_begin: int,
    count: int,
    full: bool,
    prev_begin: int = 0,
    prev_count: int = 0,
) -> None: ...
@overload
def difference_quotients(
    method: str,
    spacing: npt.NDArray[np.float64],
    f: npt.NDArray[np.float64],
    f_stride_e: int,
    f_stride_k: int,
    f0: Optional[npt.NDArray[np.float64]] = None,
    f0_stride: int = 0,
    loss_eps: float = 0.0,
    packed: Literal[False] = False,
) -> Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
@overload
def difference_quotients(
    method: str,
    spacing: npt.NDArray[np.float64],
    f: npt.NDArray[np.float64],
    f_stride_e: int,
    f_stride_k: int,
    f0: Optional[npt.NDArray[np.float64]],
    f0_stride: int,
    loss_eps: float,
    packed: Literal[True],
) -> npt.NDArray[np.float64]: ...
def difference_diagonal(buffer: np.ndarray, points: np.ndarray, element_offset: int, npoints: int) -> None: ...
def token_quotients(
    method: str,
    arrays: Sequence[np.ndarray],
    points: np.ndarray,
    values: Sequence[Any],  # P lists of per-datum arrays, or (stacked) one [R, ...] array per datum
    loss_eps: float = 0.0,
    stacked: bool = False,
) -> Tuple[np.ndarray, int]: ...  # [gradient, error] packed as one [2n] array
def random_block(
    arrays: Sequence[np.ndarray],
    scale: npt.NDArray[np.float64],
    kind: str,
    seed: int,
    index_offset: int,
    antithetic: bool,
    outs: Sequence[np.ndarray],
    q_begin: int,
    count: int,
) -> None: ...
def random_estimate(
    kind: str,
    seed: int,
    scale: npt.NDArray[np.float64],
    index_offset: int,
    f: npt.NDArray[np.float64],
    antithetic: bool,
    f0: float = 0.0,
) -> Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def random_directions(kind: str, seed: int, sample: int, index_begin: int, count: int) -> npt.NDArray[np.float64]: ...
def philox4x32(counter: Sequence[int], key: Sequence[int]) -> List[int]: ...
