// The inner loops of the regularizer kernels, compiled twice: once for the baseline ISA
// (kernels.cpp) and once with AVX2 + FMA (kernels_avx2.cpp), chosen at run time. Everything
// here has internal linkage so the two copies never mix (no ODR sharing of ISA-specific code).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_dispatch.hpp"
#include "regrad/formulas.hpp"

namespace regrad {
namespace {

#if defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <class T>
struct Vec;
template <>
struct Vec<float> {
    typedef float type __attribute__((vector_size(kVecBytes)));
    typedef int32_t mask __attribute__((vector_size(kVecBytes)));
    static constexpr int width = kVecBytes / 4;
};
template <>
struct Vec<double> {
    typedef double type __attribute__((vector_size(kVecBytes)));
    typedef int64_t mask __attribute__((vector_size(kVecBytes)));
    static constexpr int width = kVecBytes / 8;
};

template <class V>
using Elem = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;

template <class V>
inline V splat(Elem<V> s) {
    return V{} + s;
}

template <class T>
inline typename Vec<T>::type load(const T* p) {
    typename Vec<T>::type v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <class T>
inline void store(T* p, typename Vec<T>::type v) {
    std::memcpy(p, &v, sizeof v);
}

/// exp on a float vector: Cody-Waite reduction, degree-6 polynomial (<= 2 ulp on [-87, 88]),
/// 0 below -87 (true value is subnormal), +inf above 88, NaN stays NaN.
inline Vec<float>::type vexp(Vec<float>::type x) {
    using V = Vec<float>::type;
    using M = Vec<float>::mask;
    const V shift = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    V xc = x > 88.0f ? splat<V>(88.0f) : x;
    xc = xc < -87.0f ? splat<V>(-87.0f) : xc;
    const V t = xc * 1.44269504088896341f + shift;
    const V n = t - shift;
    V r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const V p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f +
                r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    const M bits = ((M)t - 0x4B400000 + 127) << 23;  // vector casts reinterpret bits
    V y = p * (V)bits;
    y = x > 88.0f ? splat<V>(INFINITY) : y;
    return x < -87.0f ? V{} : y;
}

/// exp on a double vector: libm per lane (accuracy first; float32 is the bandwidth-bound case).
inline Vec<double>::type vexp(Vec<double>::type x) {
    Vec<double>::type y;
    for (int j = 0; j < Vec<double>::width; ++j) y[j] = std::exp(x[j]);
    return y;
}

/// The CPU's math for the shared formulas: the vector exp above.
struct VecMath {
    template <class V>
    static V exp(V x) {
        return vexp(x);
    }
};

// The per-element ops are the shared formulas (regrad/formulas.hpp), evaluated on whole vectors.
using L1Op = formulas::L1;
using L2SquaredOp = formulas::L2Squared;
using IdentityOp = formulas::Identity;  // gradient pass of the L2 norm: g = x * (scale / norm)
using EntropyOp = formulas::Entropy;

/// Sums op values over elements [begin, end) of one datum and writes scale * keep * gradient.
/// Lane sums are flushed to double every kFlush elements in a fixed order, so the result depends
/// only on the data (never on threads). `check` stays 0 unless a non-finite input is met or a
/// written gradient is not finite (it overflowed T, e.g. entropy's -exp(x)(1 + x) near x = 84 in float32).
template <class Op, bool WithGrad, class T>
double loop_chunk(const T* x, T* g, const uint8_t* mask, int64_t width, int64_t begin, int64_t end, T scale,
                  T& check) {
    using V = typename Vec<T>::type;
    constexpr int W = Vec<T>::width;
    constexpr int64_t kFlush = 256;
    double total = 0.0;
    V acc{}, chk{};
    int64_t since_flush = 0;
    int64_t e = begin;
    for (; e + W <= end; e += W) {
        V xv = load(x + e);
        V keep = splat<V>(1);
        if (mask != nullptr) {
            if (width == 1) {
                for (int j = 0; j < W; ++j) keep[j] = mask[e + j] ? T(1) : T(0);
            } else {
                for (int j = 0; j < W; ++j) keep[j] = mask[(e + j) / width] ? T(1) : T(0);
            }
            xv = keep != 0 ? xv : V{};  // masked tokens are ignored entirely
        }
        xv = Op::prepare(xv);
        V v, d;
        Op::template eval<VecMath>(xv, v, d);
        acc += v;
        chk += xv - xv;
        if (WithGrad) {
            const V gv = d * (scale * keep);
            store(g + e, gv);
            chk += gv - gv;
        }
        since_flush += W;
        if (since_flush >= kFlush) {
            for (int j = 0; j < W; ++j) total += static_cast<double>(acc[j]);
            acc = V{};
            since_flush = 0;
        }
    }
    for (int j = 0; j < W; ++j) total += static_cast<double>(acc[j]);
    T tail_chk = 0;
    for (; e < end; ++e) {  // the tail, one lane at a time
        const bool on = mask == nullptr || mask[e / width] != 0;
        V xv = Op::prepare(splat<V>(on ? x[e] : T(0)));
        V v, d;
        Op::template eval<VecMath>(xv, v, d);
        total += static_cast<double>(v[0]);
        tail_chk += xv[0] - xv[0];
        if (WithGrad) {
            g[e] = d[0] * scale * (on ? T(1) : T(0));
            tail_chk += g[e] - g[e];
        }
    }
    T c = tail_chk;
    for (int j = 0; j < W; ++j) c += chk[j];
    check = c;
    return total;
}

/// Dispatches on the regularizer op; the one entry point each ISA build exports.
template <class T>
double loop_chunk_any(ChunkOp op, bool with_grad, const T* x, T* g, const uint8_t* mask, int64_t width,
                      int64_t begin, int64_t end, T scale, T& check) {
#define REGRAD_LOOP(OP)                                                                      \
    return with_grad ? loop_chunk<OP, true>(x, g, mask, width, begin, end, scale, check)      \
                     : loop_chunk<OP, false>(x, g, mask, width, begin, end, scale, check)
    switch (op) {
        case ChunkOp::L1: REGRAD_LOOP(L1Op);
        case ChunkOp::L2Squared: REGRAD_LOOP(L2SquaredOp);
        case ChunkOp::Entropy: REGRAD_LOOP(EntropyOp);
        case ChunkOp::Identity: REGRAD_LOOP(IdentityOp);
    }
#undef REGRAD_LOOP
    return 0.0;
}

}  // namespace
}  // namespace regrad
