// Per-element formulas shared by the CPU kernel loops and the CUDA kernels: one definition, two
// compilers. REGRAD_HD marks them __host__ __device__ under nvcc and is empty for the C++ compiler.
// The regularizer ops are templated on the value type V, which may be a scalar (float, double) or
// a GCC vector of them: the same source serves the SIMD loops, the scalar tails and the GPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define REGRAD_HD __host__ __device__
#else
#define REGRAD_HD
#endif

namespace regrad {
namespace formulas {

// Each op gives the per-element value v and the unscaled gradient g = dv/dx of x. Math supplies
// exp for V (the CPU passes its vector exp, the GPU the CUDA math library's). `prepare` maps the
// input before eval and before the non-finite check: what remains non-finite is an input error.
struct AsGiven {  ///< prepare of the ops for which every non-finite input is an error
    template <class V>
    REGRAD_HD static V prepare(V x) {
        return x;
    }
};
struct L1 : AsGiven {  ///< v = |x|, g = sign(x) with sign(0) = 0
    template <class Math, class V>
    REGRAD_HD static void eval(V x, V& v, V& g) {
        const V one = V{} + 1;  // broadcast to every lane of a vector
        v = x < 0 ? -x : x;
        g = (x > 0 ? one : V{}) - (x < 0 ? one : V{});
    }
};
struct L2Squared : AsGiven {  ///< v = x^2, g = 2x
    template <class Math, class V>
    REGRAD_HD static void eval(V x, V& v, V& g) {
        v = x * x;
        g = x + x;
    }
};
struct Identity : AsGiven {  ///< gradient pass of the L2 norm (g = x, later scaled by 1/||x||); no value
    template <class Math, class V>
    REGRAD_HD static void eval(V x, V& v, V& g) {
        v = V{};
        g = x;
    }
};
struct Entropy {  ///< v = -exp(x) x, g = -exp(x) (1 + x)
    /// x = -inf is a token of probability 0: 0 log 0 = 0 and its gradient is 0, as at any x where exp
    /// underflows to 0 (float32 and float64 alike below -1000), so -inf is moved there. NaN stays NaN.
    template <class V>
    REGRAD_HD static V prepare(V x) {
        const V floor = V{} - 1000;
        return x < floor ? floor : x;
    }
    template <class Math, class V>
    REGRAD_HD static void eval(V x, V& v, V& g) {
        const V e = Math::exp(x);
        v = -e * x;
        g = -e * (1 + x);
    }
};

/// Gradient scale of the L2 norm of one datum: scale / ||x||, 0 at 0 (the subgradient we pick).
REGRAD_HD inline double l2_norm_grad_scale(double norm, double scale) { return norm > 0 ? scale / norm : 0.0; }

/// The range of float and double as doubles (usable in device code, unlike std::numeric_limits).
template <class T>
struct Range;
template <>
struct Range<float> {
    static constexpr double tiny = 1.17549435082228750797e-38;  // FLT_MIN
    static constexpr double epsilon = 1.1920928955078125e-07;   // FLT_EPSILON
    static constexpr double largest = 3.40282346638528859812e+38;  // FLT_MAX
};
template <>
struct Range<double> {
    static constexpr double tiny = 2.2250738585072014e-308;   // DBL_MIN
    static constexpr double epsilon = 2.220446049250313e-16;  // DBL_EPSILON
    static constexpr double largest = 1.7976931348623157e+308;  // DBL_MAX
};

/// Math for the host compilers: libm. Loops built twice for two ISAs wrap it in a type local to each
/// build (numerical_loops.hpp), so their instantiations never merge across the builds.
struct HostMath {
    static float abs(float x) { return std::fabs(x); }
    static double abs(double x) { return std::fabs(x); }
    static double sqrt(double x) { return std::sqrt(x); }
    static double log(double x) { return std::log(x); }
    static double cos(double x) { return std::cos(x); }
    static constexpr double infinity() { return std::numeric_limits<double>::infinity(); }
};

/// True when a datum's sum of squares (n elements of T, squared in T, summed in double) cannot give
/// its L2 norm and gradient: the squares overflowed T, or were so small that those lost to underflow
/// may matter (below n tiny / eps), or scale / norm falls outside T's normal range (the gradient
/// x * (scale / norm) would lose bits or overflow). CPU and GPU then redo the datum as BLAS nrm2 does:
/// values divided by their largest magnitude, in double. Math supplies sqrt.
template <class T, class Math>
REGRAD_HD inline bool l2_norm_needs_rescale(double sum_squares, int64_t n, double scale) {
    const double lower = static_cast<double>(n) * (Range<T>::tiny / Range<T>::epsilon);
    if (!(sum_squares >= lower && sum_squares <= Range<double>::largest)) return true;
    if (sum_squares == 0.0) return false;  // n == 0 (a zero datum has sum_squares 0 < lower)
    const double s = scale / Math::sqrt(sum_squares);
    return !(s >= Range<T>::tiny && s <= Range<T>::largest);
}

// ---- Finite differences: one definition for the CPU loops (core/numerical_loops.hpp) and the GPU. ----

/// Fraction of h at point k: +h, -h, +h/2, -h/2 (forward uses the first, central two, Richardson four).
REGRAD_HD inline double point_fraction(int k) { return k == 0 ? 1.0 : k == 1 ? -1.0 : k == 2 ? 0.5 : -0.5; }

/// Default step of element x: scale * max(1, |x|).
REGRAD_HD inline double default_step(double x, double scale) {
    const double ax = x < 0 ? -x : x;
    return scale * (ax > 1.0 ? ax : 1.0);
}

/// A quotient and its error estimate in the arithmetic type C (double; float for float32 token losses).
template <class C>
struct Quotient {
    C grad;
    C error;
};

/// One element's quotient from the steps s[k] actually taken (the points are x + s[k], at +h, -h,
/// +h/2, -h/2) and the losses v[k] there; fb is the loss at x (forward only). NP: 1 forward, 2
/// central, 4 Richardson. error: the rounding bound loss_eps (|v0| + |v1|) / (s0 - s1), and for
/// Richardson also the truncation estimate |R - g2|. Math supplies abs (fabs).
template <int NP, class Math, class C>
REGRAD_HD inline Quotient<C> quotient(const C* s, const C* v, C fb, C loss_eps) {
    if constexpr (NP == 1) {
        return {(v[0] - fb) / s[0], loss_eps * (Math::abs(v[0]) + Math::abs(fb)) / s[0]};
    } else {
        const C d1 = s[0] - s[1];
        const C inv1 = C(1) / d1;  // one division per element, not two
        const C g1 = (v[0] - v[1]) * inv1;
        const C r1 = loss_eps * (Math::abs(v[0]) + Math::abs(v[1])) * inv1;
        if constexpr (NP == 2) {
            return {g1, r1};
        } else {
            const C d2 = s[2] - s[3];
            const C g2 = (v[2] - v[3]) / d2;
            const C r2 = loss_eps * (Math::abs(v[2]) + Math::abs(v[3])) / d2;
            // Steps are the rounded ones, so their ratio is only about 2: extrapolate with the true ratio.
            const C ratio2 = (d1 / d2) * (d1 / d2);
            const C extrapolated = (ratio2 * g2 - g1) / (ratio2 - C(1));
            return {extrapolated, Math::abs(extrapolated - g2) + (ratio2 * r2 + r1) / (ratio2 - C(1))};
        }
    }
}

// ---- Counter-based RNG: Philox4x32-10 (Salmon et al., SC'11), on the CPU (regrad/rng.hpp) and the GPU. ----

/// Philox4x32 with 10 rounds on plain arrays: c (4 counter words) is replaced by the output.
REGRAD_HD inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
        const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
        const uint32_t n1 = static_cast<uint32_t>(p1);
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
        const uint32_t n3 = static_cast<uint32_t>(p0);
        c[0] = n0;
        c[1] = n1;
        c[2] = n2;
        c[3] = n3;
    }
}

/// The largest step the quotients can difference: s[0] - s[1] and (d1 / d2)^2 stay finite. A point
/// whose |x + h - x| is not below it (inf and NaN included) is a "step overflow" on CPU and GPU.
REGRAD_HD inline constexpr double max_spacing() { return 1e300; }

/// The smallest step the quotients can difference: double's smallest normal number. Below it the
/// quotients' 1 / (s[0] - s[1]) overflows to inf, and an unchanged loss reads 0 * inf = NaN; such a
/// point (|x + h - x| subnormal, or 0) is a "step underflow" on CPU and GPU.
REGRAD_HD inline constexpr double min_spacing() { return 2.2250738585072014e-308; }

/// 128 random bits for element `index` of stream `sample` (e.g. a sample number) under `seed`.
REGRAD_HD inline void random_bits(uint64_t seed, uint64_t sample, uint64_t index, uint32_t out[4]) {
    out[0] = static_cast<uint32_t>(index);
    out[1] = static_cast<uint32_t>(index >> 32);
    out[2] = static_cast<uint32_t>(sample);
    out[3] = static_cast<uint32_t>(sample >> 32);
    philox4x32_10(out, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

/// Uniform double in [0, 1) with 53 random bits.
REGRAD_HD inline double uniform01(uint32_t hi, uint32_t lo) {
    const uint64_t bits = (static_cast<uint64_t>(hi) << 32 | lo) >> 11;
    return static_cast<double>(bits) * 0x1.0p-53;
}

/// Component `index` of random direction `sample`: Rademacher (+-1) or, with gaussian, a standard
/// normal by Box-Muller (Math supplies log, sqrt and cos: libm on the CPU, CUDA's on the GPU).
template <class Math>
REGRAD_HD inline double random_direction(bool gaussian, uint64_t seed, uint64_t sample, uint64_t index) {
    uint32_t r[4];
    random_bits(seed, sample, index, r);
    if (!gaussian) return (r[0] & 1u) ? 1.0 : -1.0;
    const double u1 = 1.0 - uniform01(r[0], r[1]);
    const double u2 = uniform01(r[2], r[3]);
    return Math::sqrt(-2.0 * Math::log(u1)) * Math::cos(6.283185307179586 * u2);
}

/// Element `index`'s randomized estimate from the losses f of `samples` directions (antithetic: f
/// holds f(x + sigma u), f(x - sigma u) per sample, g_s = (f+ - f-) u / (2 sigma); else g_s = (f_s -
/// f0) u / sigma): grad = the mean of g_s and variance = the variance of that mean (Welford, in sample
/// order; infinite for one sample).
template <class Math>
REGRAD_HD inline void random_estimate(bool gaussian, uint64_t seed, uint64_t index, double sigma, const double* f,
                                      int64_t samples, bool antithetic, double f0, double& grad, double& variance) {
    double mean = 0.0;
    double m2 = 0.0;  // Welford's running sum of squared deviations
    for (int64_t s = 0; s < samples; ++s) {
        const double u = random_direction<Math>(gaussian, seed, static_cast<uint64_t>(s), index);
        const double g = antithetic ? (f[2 * s] - f[2 * s + 1]) * u / (2.0 * sigma) : (f[s] - f0) * u / sigma;
        const double delta = g - mean;
        mean += delta / static_cast<double>(s + 1);
        m2 += delta * (g - mean);
    }
    grad = mean;
    variance = samples > 1 ? m2 / static_cast<double>(samples - 1) / static_cast<double>(samples) : Math::infinity();
}

}  // namespace formulas
}  // namespace regrad
