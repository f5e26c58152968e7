// Internal: the per-chunk loop of the kernels, in a baseline and an AVX2 build, picked at run time.
#pragma once

#include <cstdint>

namespace regrad {

enum class ChunkOp { L1, L2Squared, Entropy, Identity };

namespace avx2 {
/// True when this binary has the AVX2 loops and the CPU runs them.
bool available();
double loop_chunk(ChunkOp op, bool with_grad, const float* x, float* g, const uint8_t* mask, int64_t width,
                  int64_t begin, int64_t end, float scale, float& check);
double loop_chunk(ChunkOp op, bool with_grad, const double* x, double* g, const uint8_t* mask, int64_t width,
                  int64_t begin, int64_t end, double scale, double& check);
}  // namespace avx2

}  // namespace regrad
