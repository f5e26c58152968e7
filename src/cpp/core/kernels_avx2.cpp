// The kernel loops built with AVX2 + FMA (CMake adds the flags on x86-64); a stub elsewhere.
#include "kernel_dispatch.hpp"

#include <cstdlib>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include "kernel_loops.hpp"

namespace regrad::avx2 {

bool available() {
    // REGRAD_SIMD=baseline forces the portable loops (to test them on an AVX2 machine).
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           !(std::getenv("REGRAD_SIMD") && std::strcmp(std::getenv("REGRAD_SIMD"), "baseline") == 0);
    return ok;
}

double loop_chunk(ChunkOp op, bool with_grad, const float* x, float* g, const uint8_t* mask, int64_t width,
                  int64_t begin, int64_t end, float scale, float& check) {
    return loop_chunk_any<float>(op, with_grad, x, g, mask, width, begin, end, scale, check);
}

double loop_chunk(ChunkOp op, bool with_grad, const double* x, double* g, const uint8_t* mask, int64_t width,
                  int64_t begin, int64_t end, double scale, double& check) {
    return loop_chunk_any<double>(op, with_grad, x, g, mask, width, begin, end, scale, check);
}

}  // namespace regrad::avx2

#else

namespace regrad::avx2 {

bool available() { return false; }

double loop_chunk(ChunkOp, bool, const float*, float*, const uint8_t*, int64_t, int64_t, int64_t, float, float&) {
    return 0.0;
}

double loop_chunk(ChunkOp, bool, const double*, double*, const uint8_t*, int64_t, int64_t, int64_t, double,
                  double&) {
    return 0.0;
}

}  // namespace regrad::avx2

#endif
