// Branch-free elementwise math that compilers vectorise (no libm calls in hot loops).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define REGRAD_HD __host__ __device__
#else
#define REGRAD_HD
#endif

namespace regrad {

/// exp for float: Cody-Waite reduction and a degree-6 polynomial, <= 2 ulp on [-87, 88].
/// Below -87 it returns 0 (true value < 1.7e-38, subnormal); above 88 it returns +inf.
REGRAD_HD inline float fast_exp(float x) {
    const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    float xc = x > 88.0f ? 88.0f : x;
    xc = xc < -87.0f ? -87.0f : xc;
    float t = xc * 1.44269504088896341f + kShift;
    float n = t - kShift;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f +
                 r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    int32_t ti;
    std::memcpy(&ti, &t, sizeof ti);
    int32_t bits = (ti - 0x4B400000 + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x > 88.0f ? INFINITY : y;
    return x < -87.0f ? 0.0f : y;
}

/// exp for double: the libm call (accuracy first; float32 is the bandwidth-bound case).
REGRAD_HD inline double fast_exp(double x) { return std::exp(x); }

}  // namespace regrad
