// The host API of the CUDA kernels (regrad._cuda). CUDA-free on purpose: the binding file is
// plain C++ and needs neither the CUDA headers nor torch's. Every pointer named *_dev is device
// memory on the current device; ragged inputs are a host table of device pointers plus host
// offsets (the RaggedBatch of the CPU core). Work is queued on `stream` (a cudaStream_t as an
// integer, 0 for the legacy default stream) and nothing here synchronises with the host.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "regrad/kernels.hpp"
#include "regrad/numerical.hpp"
#include "regrad/ragged.hpp"

namespace regrad::cuda {

/// A CUDA runtime error, with the runtime's message and the operation that failed.
class CudaError : public std::runtime_error {
public:
    explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

/// Status words written by the kernels (device int64[3]): code, datum, position.
enum StatusCode : int64_t {
    kStatusOk = 0,
    kStatusNonFiniteInput = 1,  ///< datum, position (flat index inside the datum)
    kStatusNonFiniteValue = 2,  ///< datum (the per-datum value overflowed)
    kStatusBadStep = 3,         ///< datum, position (difference_points: step not positive and finite)
    kStatusStepUnderflow = 4,   ///< datum, position (difference_points: x + h == x)
    kStatusStepOverflow = 5,    ///< datum, position (difference_points: |x + h - x| >= 1e300, inf or NaN)
    kStatusStepsCoincide = 6,   ///< datum, position (difference_points, richardson: x ± h/2 rounds onto x ± h)
    kStatusGradientOverflow = 7,  ///< datum, position (regularizer: finite input, gradient beyond the dtype)
};

/// Device count, the runtime and driver versions (0 devices is not an error).
struct RuntimeInfo {
    int devices;
    int runtime_version;
    int driver_version;
};
RuntimeInfo runtime_info();

/// Throws CudaError unless `ptr` is device (or managed) memory usable on the current device.
void check_device_pointer(const void* ptr, const char* what);

/// Fused batch value + per-datum values + gradient of a built-in regularizer, as the CPU's
/// regularizer_value_and_grad. Writes per_datum_dev [B] (double), grad_dev (packed, may be null),
/// value_dev [1] (double) and status_dev [3]. Deterministic: fixed chunks of kReductionChunk
/// elements (whole rows), one thread block each, fixed-order tree sums, no floating-point atomics.
template <class T>
void regularizer_value_and_grad(Regularizer kind, const RaggedBatch<T>& batch, const uint8_t* mask_dev,
                                Reduction reduction, double* per_datum_dev, T* grad_dev, double* value_dev,
                                int64_t* status_dev, std::uintptr_t stream);

/// points_dev [P, n] and spacing_dev [P, n] as regrad::difference_points; problems go to
/// status_dev [3] (the first bad element in packed order) instead of an exception.
template <class T>
void difference_points(const RaggedBatch<T>& x, DifferenceMethod method, double scale, const double* step_dev,
                       int64_t step_len, T* points_dev, double* spacing_dev, int64_t* status_dev,
                       std::uintptr_t stream);

/// As regrad::write_difference_block; `out` is a host table of B device buffers ([capacity, len_j]).
template <class T>
void write_difference_block(const RaggedBatch<T>& x, T* const* out, int64_t capacity, const T* points_dev,
                            int64_t points_stride, int npoints, int64_t q_begin, int64_t count, bool full,
                            int64_t prev_begin, int64_t prev_count, std::uintptr_t stream);

/// As regrad::difference_quotients, on device arrays.
void difference_quotients(DifferenceMethod method, int64_t n, const double* spacing_dev, const double* f_dev,
                          int64_t f_stride_e, int64_t f_stride_k, const double* f0_dev, int64_t f0_stride,
                          double loss_eps, double* grad_dev, double* error_dev, std::uintptr_t stream);

/// As regrad::write_random_block; scale_dev [n] doubles, `out` a host table of device buffers.
template <class T>
void write_random_block(const RaggedBatch<T>& x, const double* scale_dev, Direction kind, uint64_t seed,
                        int64_t index_offset, bool antithetic, T* const* out, int64_t capacity, int64_t q_begin,
                        int64_t count, std::uintptr_t stream);

/// As regrad::random_estimate; f_dev holds the loss values, f0 is the loss at x (host scalar).
void random_estimate(Direction kind, uint64_t seed, int64_t n, int64_t index_offset, const double* scale_dev,
                     const double* f_dev, int64_t samples, bool antithetic, double f0, double* grad_dev,
                     double* variance_dev, std::uintptr_t stream);

/// out_dev[i] = component index_begin + i of direction `sample` (the CPU's random_directions).
void random_directions(Direction kind, uint64_t seed, uint64_t sample, uint64_t index_begin, int64_t count,
                       double* out_dev, std::uintptr_t stream);

}  // namespace regrad::cuda
