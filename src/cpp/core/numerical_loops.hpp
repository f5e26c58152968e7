// The inner loops of the finite-difference engine (difference points, token-structure quotients),
// compiled twice: for the baseline ISA (numerical.cpp) and with AVX2 (numerical_avx2.cpp, no FMA so
// both builds give the same bits), chosen at run time. Internal linkage: the two copies never mix.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "regrad/formulas.hpp"
#include "regrad/numerical.hpp"

namespace regrad {
namespace {

constexpr double kFractions[4] = {1.0, -1.0, 0.5, -0.5};

/// max(a, 1) without a branch: log-probs straddle 1 at random, so a branch mispredicts often.
inline double max_with_one(double a) {
    uint64_t ab, ob;
    const double one = 1.0;
    std::memcpy(&ab, &a, sizeof ab);
    std::memcpy(&ob, &one, sizeof ob);
    const uint64_t take_one = -static_cast<uint64_t>(a < 1.0);
    const uint64_t bits = (ob & take_one) | (ab & ~take_one);
    double out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

/// The largest step the quotients can difference (formulas::max_spacing, shared with the GPU).
inline constexpr double kMaxSpacing = formulas::max_spacing();

/// The smallest step the quotients can difference (formulas::min_spacing, shared with the GPU).
inline constexpr double kMinSpacing = formulas::min_spacing();
static_assert(kMinSpacing == std::numeric_limits<double>::min(), "min_spacing is double's smallest normal");

/// Writes the NP difference points of one datum, point k of element i at points[k * kstride + i]
/// (points and spacing already offset to the datum), and (when spacing is given) the steps actually
/// taken; per-element steps are read at step[base + i]. Branch-free so the compiler vectorises it.
/// Returns true if any element is non-finite, has a bad step, underflows or overflows.
template <int NP, int StepKind, bool WithSpacing, class T>  // StepKind: 0 relative, 1 one absolute step, 2 per element
bool fill_points_impl(const T* __restrict xj, int64_t len, int64_t base, int64_t kstride, double scale,
                      const double* __restrict step, T* __restrict points, double* __restrict spacing) {
    // Integer counts, not a floating-point sum: the compiler may not reorder a double reduction
    // without -ffast-math, which would serialise the loop on the add latency.
    int64_t problems = 0;  // non-finite x or h (v - v is NaN then), steps <= 0, points that round onto x
    for (int64_t i = 0; i < len; ++i) {
        const double xd = static_cast<double>(xj[i]);
        const double h = StepKind == 0 ? scale * max_with_one(std::fabs(xd)) : (StepKind == 1 ? step[0] : step[base + i]);
        if constexpr (StepKind == 0) {
            // h = scale * max(1, |x|) with 0 < scale <= 1 (the caller checks): finite and positive whenever x is.
            problems += static_cast<int64_t>(xd - xd != 0.0);
        } else {
            problems += static_cast<int64_t>((xd - xd) + (h - h) != 0.0);
            problems += static_cast<int64_t>(h <= 0.0);
        }
        T p[NP];
        for (int k = 0; k < NP; ++k) {
            p[k] = static_cast<T>(xd + kFractions[k] * h);
            const double d = static_cast<double>(p[k]) - xd;
            // |d| below kMinSpacing (0 too): x + h rounds onto x, or the step is subnormal and its
            // reciprocal overflows; |d| not below kMaxSpacing (inf, NaN too): x + h overflows the
            // dtype, or the differences of two steps would (the quotients then read 0 or NaN)
            problems += static_cast<int64_t>(std::fabs(d) < kMinSpacing) + static_cast<int64_t>(!(std::fabs(d) < kMaxSpacing));
            points[k * kstride + i] = p[k];
            if constexpr (WithSpacing) spacing[k * kstride + i] = d;
        }
        if constexpr (NP == 4) {
            // Richardson: x ± h/2 rounding onto x ± h leaves one step, and the extrapolation reads 0/0
            problems += static_cast<int64_t>(p[0] == p[2]) + static_cast<int64_t>(p[1] == p[3]);
        }
    }
    return problems != 0;
}

template <int NP, bool WithSpacing, class T>
bool fill_points_spacing(const T* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                         int64_t step_len, T* points, double* spacing) {
    if (step == nullptr) return fill_points_impl<NP, 0, WithSpacing>(xj, len, base, kstride, scale, step, points, spacing);
    if (step_len == 1) return fill_points_impl<NP, 1, WithSpacing>(xj, len, base, kstride, scale, step, points, spacing);
    return fill_points_impl<NP, 2, WithSpacing>(xj, len, base, kstride, scale, step, points, spacing);
}

template <int NP, class T>
bool fill_points(const T* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                 int64_t step_len, T* points, double* spacing) {
    if (spacing == nullptr) return fill_points_spacing<NP, false>(xj, len, base, kstride, scale, step, step_len, points, spacing);
    return fill_points_spacing<NP, true>(xj, len, base, kstride, scale, step, step_len, points, spacing);
}

/// fill_points for np = 1, 2 or 4 points per element.
template <class T>
bool fill_points_np(int np, const T* xj, int64_t len, int64_t base, int64_t kstride, double scale, const double* step,
                    int64_t step_len, T* points, double* spacing) {
    switch (np) {
        case 1: return fill_points<1>(xj, len, base, kstride, scale, step, step_len, points, spacing);
        case 2: return fill_points<2>(xj, len, base, kstride, scale, step, step_len, points, spacing);
        default: return fill_points<4>(xj, len, base, kstride, scale, step, step_len, points, spacing);
    }
}

/// formulas::HostMath under a type local to this build: the quotients instantiated with it have
/// internal linkage, so the linker never swaps the AVX2 build's copy into the baseline build.
struct LoopMath : formulas::HostMath {};

/// Points per element: 1 forward, 2 central, 4 Richardson.
template <DifferenceMethod M>
inline constexpr int kPoints = M == DifferenceMethod::Forward ? 1 : (M == DifferenceMethod::Central ? 2 : 4);

/// One element's quotient and error estimate (formulas::quotient, the GPU's arithmetic too) in the
/// arithmetic type C (double, or float for the token structure's float32 values).
template <DifferenceMethod M, class C = double>
inline formulas::Quotient<C> quotient(const C* s, const C* v, C fb, C loss_eps) {
    return formulas::quotient<kPoints<M>, LoopMath>(s, v, fb, loss_eps);
}

/// Structure "token", one datum: steps recomputed from the points (point k of element i at
/// points[k * kstride + i]; points, grad and error already offset to the datum), loss values read
/// from the per-datum outputs, differenced in the arithmetic type C. Returns false if any loss value
/// is non-finite (found later by a slow scan); counts in `unsafe` the elements whose differences or
/// quotient left C's range (the gradient: T's) although every value was finite.
template <DifferenceMethod M, class C, class T, class F>
bool token_datum_in(const T* __restrict xj, int64_t len, int64_t kstride, const T* __restrict points,
                    const F* const* fj, const F* __restrict f0j, double loss_eps, T* __restrict grad,
                    T* __restrict error, int64_t& unsafe) {
    constexpr int NP = kPoints<M>;
    const C eps = static_cast<C>(loss_eps);
    int64_t bad = 0;  // an integer count vectorises; a floating-point sum would serialise the loop
    int64_t out_of_range = 0;
    for (int64_t i = 0; i < len; ++i) {
        const C xd = static_cast<C>(xj[i]);
        C s[NP];
        C v[NP];
        C check = 0;  // NaN if any value is NaN or infinite
        for (int k = 0; k < NP; ++k) {
            s[k] = static_cast<C>(points[k * kstride + i]) - xd;
            v[k] = static_cast<C>(fj[k][i]);
            check += v[k] - v[k];
        }
        const C fb = M == DifferenceMethod::Forward ? static_cast<C>(f0j[i]) : C(0);
        check += fb - fb;
        bad += static_cast<int64_t>(check != 0);
        const formulas::Quotient<C> q = quotient<M, C>(s, v, fb, eps);
        // s[0] - s[1] overflowing C (its reciprocal then reads 0), or a quotient that is not finite
        // (the gradient: once rounded to T, where a float32 result past FLT_MAX becomes inf)
        C span = s[0];
        if constexpr (NP > 1) span = s[0] - s[1];
        const T g = static_cast<T>(q.grad);
        out_of_range += static_cast<int64_t>((span - span) + (q.error - q.error) != 0) + static_cast<int64_t>(g - g != 0);
        grad[i] = g;
        error[i] = static_cast<T>(q.error);
    }
    unsafe = out_of_range;
    return bad == 0;
}

/// token_datum_in in the type that suits T and F: float32 log-probs with float32 losses are
/// differenced in float (8 lanes per AVX2 vector instead of 4): the result is rounded to float32
/// anyway, and float's rounding (~6e-8 relative) is far below the finite-difference error of a
/// float32 loss (~1e-5). A datum whose float differences left float's range (a step near FLT_MAX
/// or below FLT_MIN, losses near FLT_MAX) is differenced again in double. Returns false when a loss
/// value is non-finite or a quotient left double's range too (the caller's slow scan tells which).
template <DifferenceMethod M, class T, class F>
bool token_datum(const T* xj, int64_t len, int64_t kstride, const T* points, const F* const* fj, const F* f0j,
                 double loss_eps, T* grad, T* error) {
    int64_t unsafe = 0;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<F, float>) {
        const bool ok = token_datum_in<M, float>(xj, len, kstride, points, fj, f0j, loss_eps, grad, error, unsafe);
        if (!ok || unsafe == 0) return ok;
    }
    const bool ok = token_datum_in<M, double>(xj, len, kstride, points, fj, f0j, loss_eps, grad, error, unsafe);
    return ok && unsafe == 0;
}

/// token_datum for a method chosen at run time.
template <class T, class F>
bool token_datum_m(DifferenceMethod method, const T* xj, int64_t len, int64_t kstride, const T* points,
                   const F* const* fj, const F* f0j, double loss_eps, T* grad, T* error) {
    switch (method) {
        case DifferenceMethod::Forward:
            return token_datum<DifferenceMethod::Forward>(xj, len, kstride, points, fj, f0j, loss_eps, grad, error);
        case DifferenceMethod::Central:
            return token_datum<DifferenceMethod::Central>(xj, len, kstride, points, fj, f0j, loss_eps, grad, error);
        case DifferenceMethod::Richardson:
            return token_datum<DifferenceMethod::Richardson>(xj, len, kstride, points, fj, f0j, loss_eps, grad, error);
    }
    return true;
}

}  // namespace
}  // namespace regrad
