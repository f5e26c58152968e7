// Internal: the per-chunk loop of the kernels and the finite-difference loops, in a baseline and an
// AVX2 build, picked at run time.
#pragma once

#include <cstdint>

#include "regrad/numerical.hpp"

namespace regrad {

enum class ChunkOp { L1, L2Squared, Entropy, Identity };

namespace avx2 {
/// True when this binary has the AVX2 loops and the CPU runs them.
bool available();
double loop_chunk(ChunkOp op, bool with_grad, const float* x, float* g, const uint8_t* mask, int64_t width,
                  int64_t begin, int64_t end, float scale, float& check);
double loop_chunk(ChunkOp op, bool with_grad, const double* x, double* g, const uint8_t* mask, int64_t width,
                  int64_t begin, int64_t end, double scale, double& check);

/// The AVX2 builds of numerical_loops.hpp's fill_points_np and token_datum_m (same bits as baseline).
bool fill_points(int np, const float* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                 int64_t step_len, float* points, double* spacing);
bool fill_points(int np, const double* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                 int64_t step_len, double* points, double* spacing);
#define REGRAD_TOKEN_DATUM(T, F)                                                                                   \
    bool token_datum(DifferenceMethod method, const T* xj, int64_t len, int64_t kstride, const T* points,        \
                     const F* const* fj, const F* f0j, double loss_eps, T* grad, T* error)
REGRAD_TOKEN_DATUM(float, float);
REGRAD_TOKEN_DATUM(float, double);
REGRAD_TOKEN_DATUM(double, float);
REGRAD_TOKEN_DATUM(double, double);
}  // namespace avx2

}  // namespace regrad
