"""Type stubs of the private CUDA module (built with REGRAD_CUDA=ON); use regrad.kernels / regrad._gpu.

Every int named like a buffer is a device address (tensor.data_ptr(), 0 for none); `stream` is a
cudaStream_t as an int (torch.cuda.current_stream().cuda_stream). Calls only queue work.
"""

from typing import Any, Dict, List

class CudaError(RuntimeError): ...

def build_info() -> Dict[str, Any]: ...
def regularizer(
    kind: str, dtype: str, data: List[int], offsets: List[int], width: int, mask: int, reduction: str,
    per_datum: int, grad: int, value: int, status: int, stream: int,
) -> None: ...
def difference_points(
    method: str, dtype: str, data: List[int], offsets: List[int], width: int, scale: float, step: int,
    step_len: int, points: int, spacing: int, status: int, stream: int,
) -> None: ...
def difference_block(
    dtype: str, data: List[int], offsets: List[int], width: int, outs: List[int], capacity: int, points: int,
    points_stride: int, npoints: int, q_begin: int, count: int, full: bool, prev_begin: int, prev_count: int,
    stream: int,
) -> None: ...
def difference_quotients(
    method: str, n: int, spacing: int, f: int, f_stride_e: int, f_stride_k: int, f0: int, f0_stride: int,
    loss_eps: float, grad: int, error: int, stream: int,
) -> None: ...
def random_block(
    dtype: str, data: List[int], offsets: List[int], width: int, scale: int, kind: str, seed: int,
    index_offset: int, antithetic: bool, outs: List[int], capacity: int, q_begin: int, count: int, stream: int,
) -> None: ...
def random_estimate(
    kind: str, seed: int, n: int, index_offset: int, scale: int, f: int, samples: int, antithetic: bool,
    f0: float, grad: int, variance: int, stream: int,
) -> None: ...
def random_directions(kind: str, seed: int, sample: int, index_begin: int, count: int, out: int, stream: int) -> None: ...
