// The finite-difference loops built with AVX2 (CMake adds -mavx2 on x86-64, and no -mfma: fused
// multiply-adds would round differently from the baseline build); a stub elsewhere.
#include "kernel_dispatch.hpp"

#if defined(__AVX2__)
#include "numerical_loops.hpp"

namespace regrad::avx2 {

bool fill_points(int np, const float* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                 int64_t step_len, float* points, double* spacing) {
    return fill_points_np(np, xj, len, base, kstride, scale, step, step_len, points, spacing);
}

bool fill_points(int np, const double* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                 int64_t step_len, double* points, double* spacing) {
    return fill_points_np(np, xj, len, base, kstride, scale, step, step_len, points, spacing);
}

#define REGRAD_TOKEN_DATUM_AVX2(T, F)                                              \
    REGRAD_TOKEN_DATUM(T, F) {                                                     \
        return token_datum_m(method, xj, len, kstride, points, fj, f0j, loss_eps, grad, error); \
    }
REGRAD_TOKEN_DATUM_AVX2(float, float)
REGRAD_TOKEN_DATUM_AVX2(float, double)
REGRAD_TOKEN_DATUM_AVX2(double, float)
REGRAD_TOKEN_DATUM_AVX2(double, double)

}  // namespace regrad::avx2

#else

namespace regrad::avx2 {

bool fill_points(int, const float*, int64_t, int64_t, int64_t, double, const double*, int64_t, float*, double*) {
    return false;
}
bool fill_points(int, const double*, int64_t, int64_t, int64_t, double, const double*, int64_t, double*, double*) {
    return false;
}
#define REGRAD_TOKEN_DATUM_STUB(T, F) \
    REGRAD_TOKEN_DATUM(T, F) { return true; }
REGRAD_TOKEN_DATUM_STUB(float, float)
REGRAD_TOKEN_DATUM_STUB(float, double)
REGRAD_TOKEN_DATUM_STUB(double, float)
REGRAD_TOKEN_DATUM_STUB(double, double)

}  // namespace regrad::avx2

#endif
