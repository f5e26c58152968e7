// Built-in regularizers: fused value + per-datum values + gradient over a ragged batch.
#pragma once

#include <cstdint>

#include "regrad/ragged.hpp"

namespace regrad {

enum class Regularizer {
    L1,         ///< v_i = sum |x|,            dv/dx = sign(x), sign(0) = 0
    L2Squared,  ///< v_i = sum x^2,            dv/dx = 2x
    L2Norm,     ///< v_i = sqrt(sum x^2),      dv/dx = x / ||x|| (0 at 0)
    Entropy,    ///< v_i = -sum exp(x) * x,    dv/dx = -exp(x) * (1 + x)
};

enum class Reduction { Mean, Sum };

/// Computes the batch value (mean or sum of the per-datum values) in one pass over the data.
/// per_datum: B doubles (written). grad: offsets[B] elements in the packed layout, or null to skip.
/// token_mask: offsets[B] / width bytes (0 excludes the token from value and gradient), or null.
/// Deterministic: the same bits for any thread count. Throws NonFiniteError on NaN/inf input.
template <class T>
double regularizer_value_and_grad(Regularizer kind, const RaggedBatch<T>& batch,
                                  const uint8_t* token_mask, Reduction reduction,
                                  double* per_datum, T* grad);

/// Elements handled by one task of a parallel reduction: fixed, so sums never depend on threads.
constexpr int64_t kReductionChunk = 16384;

/// Threads OpenMP would use (1 in a serial build).
int max_threads();

/// The instruction set of the kernel loops in use: "avx2" or "baseline".
const char* kernel_isa();

}  // namespace regrad
