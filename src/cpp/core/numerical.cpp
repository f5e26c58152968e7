// Finite-difference engine. Every loop writes disjoint outputs, so the results are the same bits
// for any OpenMP thread count; errors found inside parallel loops are thrown after them.
#include "regrad/numerical.hpp"

#include "kernel_dispatch.hpp"
#include "numerical_loops.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace regrad {

namespace {

constexpr int64_t kParallelElements = kParallelMinElements;

/// Datum holding packed element e (offsets is sorted, batch + 1 entries).
int64_t datum_of(const int64_t* offsets, int64_t batch, int64_t e) {
    const int64_t* it = std::upper_bound(offsets, offsets + batch + 1, e);
    return static_cast<int64_t>(it - offsets) - 1;
}


/// A number for an error message: %g (std::to_string prints 1e-20 as 0.000000 and 1e300 in full).
std::string number_text(double v) {
    char text[32];
    std::snprintf(text, sizeof text, "%.6g", v);
    return text;
}

enum class PointProblem : int { None = 0, NonFiniteX = 1, BadStep = 2, Underflow = 3, Overflow = 4, Coincide = 5, Subnormal = 6 };

}  // namespace

int points_per_element(DifferenceMethod method) {
    switch (method) {
        case DifferenceMethod::Forward: return 1;
        case DifferenceMethod::Central: return 2;
        case DifferenceMethod::Richardson: return 4;
    }
    return 0;
}

int stacked_rows(DifferenceMethod method) {
    return points_per_element(method) + (method == DifferenceMethod::Forward ? 1 : 0);
}

template <class T>
double default_step_scale(DifferenceMethod method) {
    const double eps = std::numeric_limits<T>::epsilon();
    // Each balances truncation (h, h^2, h^4) against rounding (eps / h) for its order.
    switch (method) {
        case DifferenceMethod::Forward: return std::sqrt(eps);
        case DifferenceMethod::Central: return std::cbrt(eps);
        case DifferenceMethod::Richardson: return std::pow(eps, 0.2);
    }
    return std::cbrt(eps);
}

template double default_step_scale<float>(DifferenceMethod);
template double default_step_scale<double>(DifferenceMethod);

template <class T>
void difference_points(const RaggedBatch<T>& x, DifferenceMethod method, double scale, const double* step,
                       int64_t step_len, T* points, double* spacing, PointLayout layout) {
    check_batch(x);
    const int64_t n = x.size();
    const int np = points_per_element(method);
    const bool stacked = layout == PointLayout::Stacked;
    const int rows = stacked ? stacked_rows(method) : np;
    if (stacked && spacing != nullptr) throw std::invalid_argument("the stacked point layout has no spacing array");
    check_point_steps(n, scale, step, step_len);
    // First problem per datum (element index, kind); scanned in datum order after the loop.
    std::vector<int64_t> bad_at(static_cast<size_t>(x.batch), -1);
    std::vector<int> bad_kind(static_cast<size_t>(x.batch), 0);
    const bool parallel = n >= kParallelElements && x.batch > 1;
    const bool use_avx2 = avx2::available();
    (void)parallel;
#pragma omp parallel for schedule(dynamic) if (parallel)
    for (int64_t j = 0; j < x.batch; ++j) {
        const int64_t len = x.length(j);
        const int64_t base = x.offsets[j];
        const int64_t kstride = stacked ? len : n;
        T* pj = points + (stacked ? rows * base : base);
        double* sj = spacing != nullptr ? spacing + base : nullptr;
        // Fast pass: branch-free, so it vectorises; any problem only sets a flag.
        bool flagged = false;
        if (use_avx2) {
            flagged = avx2::fill_points(np, x.data[j], len, base, kstride, scale, step, step_len, pj, sj);
        } else {
            flagged = fill_points_np(np, x.data[j], len, base, kstride, scale, step, step_len, pj, sj);
        }
        if (rows > np && len > 0) std::memcpy(pj + np * len, x.data[j], static_cast<size_t>(len) * sizeof(T));
        if (!flagged) continue;
        // Slow pass, only for a flagged datum: find the first problem and say what it is.
        const T* xj = x.data[j];
        for (int64_t i = 0; i < len; ++i) {
            const int64_t e = base + i;
            const T xv = xj[i];
            if (!std::isfinite(xv)) {
                bad_at[j] = i;
                bad_kind[j] = static_cast<int>(PointProblem::NonFiniteX);
                break;
            }
            const double ax = std::fabs(static_cast<double>(xv));
            const double h = step == nullptr ? scale * (ax > 1.0 ? ax : 1.0) : step[step_len == 1 ? 0 : e];
            if (!(h > 0) || !std::isfinite(h)) {
                bad_at[j] = i;
                bad_kind[j] = static_cast<int>(PointProblem::BadStep);
                break;
            }
            bool underflow = false, overflow = false, subnormal = false;
            for (int k = 0; k < np; ++k) {
                const T p = pj[k * kstride + i];
                const double d = std::fabs(static_cast<double>(p) - static_cast<double>(xv));
                underflow = underflow || p == xv;
                subnormal = subnormal || (p != xv && d < kMinSpacing);
                overflow = overflow || !(d < kMaxSpacing);
            }
            const bool coincide = np == 4 && (pj[i] == pj[2 * kstride + i] || pj[kstride + i] == pj[3 * kstride + i]);
            if (underflow || subnormal || overflow || coincide) {
                bad_at[j] = i;
                bad_kind[j] = static_cast<int>(underflow   ? PointProblem::Underflow
                                               : subnormal ? PointProblem::Subnormal
                                               : overflow  ? PointProblem::Overflow
                                                           : PointProblem::Coincide);
                break;
            }
        }
    }
    for (int64_t j = 0; j < x.batch; ++j) {
        if (bad_at[j] < 0) continue;
        const int64_t i = bad_at[j];
        const int64_t e = x.offsets[j] + i;
        const std::string where = describe_position(j, i, x.width);
        const double xv = static_cast<double>(x.data[j][i]);
        const double ax = std::fabs(xv);
        const double h = step == nullptr ? scale * (ax > 1.0 ? ax : 1.0) : step[step_len == 1 ? 0 : e];
        switch (static_cast<PointProblem>(bad_kind[j])) {
            case PointProblem::NonFiniteX:
                throw NonFiniteError("non-finite log-prob " + number_text(xv) + " at " + where, j, i);
            case PointProblem::BadStep:
                throw std::invalid_argument("step " + number_text(h) + " at " + where +
                                            " is not positive and finite");
            case PointProblem::Overflow:
                throw StepUnderflowError("step overflow at " + where + ": x + h is not finite (or h is over 1e300) for x = " +
                                             number_text(xv) + " and h = " + number_text(h) +
                                             " in the working dtype (use a smaller step)",
                                         e);
            case PointProblem::Subnormal:
                throw StepUnderflowError("step underflow at " + where + ": x + h - x is subnormal for x = " +
                                             number_text(xv) + " and h = " + number_text(h) +
                                             " (below " + number_text(kMinSpacing) +
                                             ", its reciprocal overflows; use a larger step)",
                                         e);
            case PointProblem::Coincide:
                throw StepUnderflowError("step too small for richardson at " + where + ": x + h/2 rounds onto x + h for x = " +
                                             number_text(xv) + " and h = " + number_text(h) +
                                             " in the working dtype, so the two steps coincide (use a larger step)",
                                         e);
            default:
                throw StepUnderflowError("step underflow at " + where + ": x + h == x for x = " + number_text(xv) +
                                             " and h = " + number_text(h) +
                                             " in the working dtype (use a larger step)",
                                         e);
        }
    }
}

template void difference_points<float>(const RaggedBatch<float>&, DifferenceMethod, double, const double*, int64_t,
                                       float*, double*, PointLayout);
template void difference_points<double>(const RaggedBatch<double>&, DifferenceMethod, double, const double*,
                                        int64_t, double*, double*, PointLayout);

void check_point_steps(int64_t n, double scale, const double* step, int64_t step_len) {
    if (step != nullptr && step_len != 1 && step_len != n) {
        throw std::invalid_argument("step has " + std::to_string(step_len) + " entries; expected 1 or " +
                                    std::to_string(n) + " (one per log-prob)");
    }
    if (step == nullptr && !(scale > 0 && scale <= 1)) {
        throw std::invalid_argument("relative step must be in (0, 1], got " + std::to_string(scale));
    }
}

void check_difference_block(int64_t n, int64_t capacity, int npoints, int64_t points_stride, int64_t q_begin,
                            int64_t count, bool full, int64_t prev_begin, int64_t prev_count) {
    if (npoints != 1 && npoints != 2 && npoints != 4) throw std::invalid_argument("npoints must be 1, 2 or 4");
    if (points_stride < n) throw std::invalid_argument("points_stride is smaller than the batch");
    if (count > capacity) {
        throw std::invalid_argument("block of " + std::to_string(count) + " perturbations exceeds the " +
                                    std::to_string(capacity) + " rows of the buffers");
    }
    const int64_t total = n * npoints;
    check_range("block", q_begin, count, total);
    if (!full) {
        check_range("previous block", prev_begin, prev_count, total);
        if (prev_count > capacity) throw std::invalid_argument("previous block exceeds the buffers");
    }
}

void check_random_indices(int64_t q_begin, int64_t count, int64_t index_offset, int64_t n) {
    if (q_begin < 0 || count < 0 || index_offset < 0 || n < 0) throw std::invalid_argument("negative perturbation index");
    constexpr int64_t largest = std::numeric_limits<int64_t>::max();
    if (q_begin > largest - count || index_offset > largest - n) {
        throw std::invalid_argument("perturbation index " + std::to_string(q_begin) + " + " + std::to_string(count) +
                                    " or element index " + std::to_string(index_offset) + " + " + std::to_string(n) +
                                    " passes 2**63 - 1");
    }
}

template <class T>
void write_difference_block(const RaggedBatch<T>& x, T* const* out, int64_t capacity, const T* points,
                            int64_t points_stride, int npoints, int64_t q_begin, int64_t count, bool full,
                            int64_t prev_begin, int64_t prev_count) {
    check_batch(x);
    const int64_t n = x.size();
    check_difference_block(n, capacity, npoints, points_stride, q_begin, count, full, prev_begin, prev_count);
    if (n == 0) return;  // no elements, nothing to write: looping over `capacity` empty rows could hang (2**59)
    const int64_t batch = x.batch;
    if (full) {
        const bool parallel = capacity * n >= kParallelElements;
        (void)parallel;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t r = 0; r < capacity; ++r) {
            for (int64_t j = 0; j < batch; ++j) {
                const int64_t len = x.length(j);
                if (len > 0) std::memcpy(out[j] + r * len, x.data[j], static_cast<size_t>(len) * sizeof(T));
            }
        }
    } else {
        for (int64_t r = 0; r < prev_count; ++r) {
            const int64_t e = (prev_begin + r) / npoints;
            const int64_t j = datum_of(x.offsets, batch, e);
            const int64_t i = e - x.offsets[j];
            out[j][r * x.length(j) + i] = x.data[j][i];
        }
    }
    for (int64_t r = 0; r < count; ++r) {
        const int64_t q = q_begin + r;
        const int64_t e = q / npoints;
        const int64_t k = q % npoints;
        const int64_t j = datum_of(x.offsets, batch, e);
        const int64_t i = e - x.offsets[j];
        out[j][r * x.length(j) + i] = points[k * points_stride + e];
    }
}

template <class T>
void write_difference_diagonal(T* out, int64_t size, int64_t rows, const T* points, int64_t points_stride,
                               int npoints) {
    if (npoints != 1 && npoints != 2 && npoints != 4) throw std::invalid_argument("npoints must be 1, 2 or 4");
    if (rows < 0 || size < 0 || (rows > 0 && (rows - 1) / npoints >= size)) {
        throw std::invalid_argument(std::to_string(rows) + " rows of " + std::to_string(npoints) +
                                    " points need more than the datum's " + std::to_string(size) + " elements");
    }
    if (rows > 0 && points_stride < size) throw std::invalid_argument("points_stride is smaller than the datum");
#pragma omp parallel for schedule(static) if (rows >= 256)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / npoints;
        out[r * size + i] = points[(r % npoints) * points_stride + i];
    }
}

template void write_difference_diagonal<float>(float*, int64_t, int64_t, const float*, int64_t, int);
template void write_difference_diagonal<double>(double*, int64_t, int64_t, const double*, int64_t, int);

template void write_difference_block<float>(const RaggedBatch<float>&, float* const*, int64_t, const float*, int64_t,
                                            int, int64_t, int64_t, bool, int64_t, int64_t);
template void write_difference_block<double>(const RaggedBatch<double>&, double* const*, int64_t, const double*,
                                             int64_t, int, int64_t, int64_t, bool, int64_t, int64_t);

namespace {

template <DifferenceMethod M>
void quotients_loop(int64_t n, const double* spacing, const double* f, int64_t f_stride_e, int64_t f_stride_k,
                    const double* f0, int64_t f0_stride, double loss_eps, double* grad, double* error) {
    constexpr int NP = kPoints<M>;
    const bool parallel = n >= kParallelElements;
    (void)parallel;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t e = 0; e < n; ++e) {
        double s[NP];
        double v[NP];
        for (int k = 0; k < NP; ++k) {
            s[k] = spacing[k * n + e];
            v[k] = f[e * f_stride_e + k * f_stride_k];
        }
        const formulas::Quotient<double> q = quotient<M>(s, v, M == DifferenceMethod::Forward ? f0[e * f0_stride] : 0.0, loss_eps);
        grad[e] = q.grad;
        error[e] = q.error;
    }
}

}  // namespace

void difference_quotients(DifferenceMethod method, int64_t n, const double* spacing, const double* f,
                          int64_t f_stride_e, int64_t f_stride_k, const double* f0, int64_t f0_stride,
                          double loss_eps, double* grad, double* error) {
    switch (method) {
        case DifferenceMethod::Forward:
            if (f0 == nullptr) throw std::invalid_argument("forward differences need the loss at x (f0)");
            return quotients_loop<DifferenceMethod::Forward>(n, spacing, f, f_stride_e, f_stride_k, f0, f0_stride,
                                                             loss_eps, grad, error);
        case DifferenceMethod::Central:
            return quotients_loop<DifferenceMethod::Central>(n, spacing, f, f_stride_e, f_stride_k, f0, f0_stride,
                                                             loss_eps, grad, error);
        case DifferenceMethod::Richardson:
            return quotients_loop<DifferenceMethod::Richardson>(n, spacing, f, f_stride_e, f_stride_k, f0, f0_stride,
                                                                loss_eps, grad, error);
    }
}

template <class T, class F>
int64_t token_quotients(DifferenceMethod method, const RaggedBatch<T>& x, const T* points, PointLayout layout,
                        const RaggedBatch<F>* f, const RaggedBatch<F>* f0, double loss_eps, T* grad, T* error) {
    check_batch(x);
    const int np = points_per_element(method);
    const int nf = stacked_rows(method);
    if (method == DifferenceMethod::Forward && f0 == nullptr) {
        throw std::invalid_argument("forward differences need the loss at x (f0)");
    }
    for (int k = 0; k < nf; ++k) {
        const RaggedBatch<F>& fk = k < np ? f[k] : *f0;
        check_batch(fk);
        if (fk.batch != x.batch) {
            throw std::invalid_argument("loss values for " + std::to_string(fk.batch) + " data; the batch has " +
                                        std::to_string(x.batch));
        }
        for (int64_t j = 0; j < x.batch; ++j) {
            if (fk.length(j) != x.length(j)) {
                throw std::invalid_argument("loss values for datum " + std::to_string(j) + " have " +
                                            std::to_string(fk.length(j)) + " elements; its log-probs have " +
                                            std::to_string(x.length(j)));
            }
        }
    }
    const int64_t n = x.size();
    const bool stacked = layout == PointLayout::Stacked;
    std::vector<char> finite(static_cast<size_t>(x.batch), 1);
    const bool parallel = n >= kParallelElements && x.batch > 1;
    const bool use_avx2 = avx2::available();
    (void)parallel;
#pragma omp parallel for schedule(dynamic) if (parallel)
    for (int64_t j = 0; j < x.batch; ++j) {
        const F* fj[4] = {nullptr, nullptr, nullptr, nullptr};
        for (int k = 0; k < np; ++k) fj[k] = f[k].data[j];
        const F* f0j = f0 != nullptr ? f0->data[j] : nullptr;
        const int64_t len = x.length(j);
        const int64_t base = x.offsets[j];
        const int64_t kstride = stacked ? len : n;
        const T* pj = points + (stacked ? nf * base : base);
        const bool ok = use_avx2 ? avx2::token_datum(method, x.data[j], len, kstride, pj, fj, f0j, loss_eps, grad + base, error + base)
                                 : token_datum_m(method, x.data[j], len, kstride, pj, fj, f0j, loss_eps, grad + base, error + base);
        finite[static_cast<size_t>(j)] = ok ? 1 : 0;
    }
    if (std::all_of(finite.begin(), finite.end(), [](char c) { return c != 0; })) return -1;
    // Slow path, only on failure: the first non-finite value in call order (point, then element).
    for (int k = 0; k < nf; ++k) {
        const RaggedBatch<F>& fk = k < np ? f[k] : *f0;
        for (int64_t j = 0; j < x.batch; ++j) {
            for (int64_t i = 0; i < x.length(j); ++i) {
                if (!std::isfinite(fk.data[j][i])) return k * n + x.offsets[j] + i;
            }
        }
    }
    // Every loss finite: a quotient overflowed (losses ~1e308 apart): -2 - the first such element.
    for (int64_t e = 0; e < n; ++e) {
        if (!std::isfinite(grad[e])) return -2 - e;
    }
    return -1;  // only an error bound overflowed (reported as inf)
}

template int64_t token_quotients<float, float>(DifferenceMethod, const RaggedBatch<float>&, const float*, PointLayout,
                                               const RaggedBatch<float>*, const RaggedBatch<float>*, double, float*,
                                               float*);
template int64_t token_quotients<float, double>(DifferenceMethod, const RaggedBatch<float>&, const float*, PointLayout,
                                                const RaggedBatch<double>*, const RaggedBatch<double>*, double, float*,
                                                float*);
template int64_t token_quotients<double, float>(DifferenceMethod, const RaggedBatch<double>&, const double*, PointLayout,
                                                const RaggedBatch<float>*, const RaggedBatch<float>*, double, double*,
                                                double*);
template int64_t token_quotients<double, double>(DifferenceMethod, const RaggedBatch<double>&, const double*, PointLayout,
                                                 const RaggedBatch<double>*, const RaggedBatch<double>*, double,
                                                 double*, double*);

template <class T>
void write_random_block(const RaggedBatch<T>& x, const double* scale, Direction kind, uint64_t seed,
                        int64_t index_offset, bool antithetic, T* const* out, int64_t capacity, int64_t q_begin,
                        int64_t count) {
    check_batch(x);
    if (count > capacity) {
        throw std::invalid_argument("block of " + std::to_string(count) + " perturbations exceeds the " +
                                    std::to_string(capacity) + " rows of the buffers");
    }
    check_random_indices(q_begin, count, index_offset, x.size());
    if (x.size() == 0) return;  // no elements, nothing to write: count * batch idle tasks could hang (2**59)
    const int64_t batch = x.batch;
    const int64_t tasks = count * batch;
    const bool parallel = count * x.size() >= kParallelElements / 4;  // RNG work is heavier than a copy
    (void)parallel;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t r = t / batch;
        const int64_t j = t % batch;
        const int64_t q = q_begin + r;
        const uint64_t sample = static_cast<uint64_t>(antithetic ? q / 2 : q);
        const double sign = (antithetic && (q % 2 == 1)) ? -1.0 : 1.0;
        const int64_t len = x.length(j);
        const int64_t base = x.offsets[j];
        const T* xj = x.data[j];
        T* row = out[j] + r * len;
        for (int64_t i = 0; i < len; ++i) {
            const int64_t e = base + i;
            const double u = random_direction(kind, seed, sample, static_cast<uint64_t>(index_offset + e));
            row[i] = static_cast<T>(static_cast<double>(xj[i]) + sign * scale[e] * u);
        }
    }
}

template void write_random_block<float>(const RaggedBatch<float>&, const double*, Direction, uint64_t, int64_t, bool,
                                        float* const*, int64_t, int64_t, int64_t);
template void write_random_block<double>(const RaggedBatch<double>&, const double*, Direction, uint64_t, int64_t,
                                         bool, double* const*, int64_t, int64_t, int64_t);

void random_estimate(Direction kind, uint64_t seed, int64_t n, int64_t index_offset, const double* scale,
                     const double* f, int64_t samples, bool antithetic, double f0, double* grad, double* variance) {
    if (samples < 1) throw std::invalid_argument("need at least one sample");
    check_random_indices(0, 0, index_offset, n);
    const bool parallel = n * samples >= kParallelElements / 4;
    (void)parallel;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t e = 0; e < n; ++e) {
        formulas::random_estimate<formulas::HostMath>(kind == Direction::Gaussian, seed,
                                                      static_cast<uint64_t>(index_offset + e), scale[e], f, samples,
                                                      antithetic, f0, grad[e], variance[e]);
    }
}

}  // namespace regrad
