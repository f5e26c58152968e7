// The finite-difference engine: steps, perturbation blocks, difference quotients with error
// estimates, and randomized (SPSA / Gaussian smoothing) estimators. No Python types here: the
// caller evaluates the loss at the points this engine writes and hands the values back.
//
// Indexing. A ragged batch of n elements is perturbed one element at a time; element e (packed
// layout) has P points (forward 1, central 2, Richardson 4), perturbation q = e * P + k is
// element e at point k. Point values and spacings are stored as [P, n] arrays.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "regrad/ragged.hpp"
#include "regrad/rng.hpp"

namespace regrad {

enum class DifferenceMethod {
    Forward,     ///< (f(x+h) - f(x)) / h, O(h); points {+h}
    Central,     ///< (f(x+h) - f(x-h)) / 2h, O(h^2); points {+h, -h}
    Richardson,  ///< central at h and h/2 combined, O(h^4); points {+h, -h, +h/2, -h/2}
};

/// Points evaluated per element: 1, 2 or 4.
int points_per_element(DifferenceMethod method);

/// Where difference_points writes point k of element e (element i of datum j). Rows: [P, n],
/// points[k * n + e]. Stacked: each datum's copies as one contiguous [R, len_j] block starting at
/// points[R * offsets[j]], row k at point k, R = stacked_rows(method); for forward differences the
/// last row is x itself. Stacked is what a vectorized per-token loss receives: one call gives every
/// loss value the quotients need.
enum class PointLayout { Rows, Stacked };

/// Rows of a datum's block in the stacked layout: the points, plus x for forward differences.
int stacked_rows(DifferenceMethod method);

/// Relative step c of the default h_i = c * max(1, |x_i|) for the working dtype T: eps^(1/2)
/// forward, eps^(1/3) central, eps^(1/5) Richardson (the optimum of each method's order).
template <class T>
double default_step_scale(DifferenceMethod method);

/// x + h rounds back to x: the step is too small for the value (names the element).
class StepUnderflowError : public std::invalid_argument {
public:
    StepUnderflowError(const std::string& what, int64_t element) : std::invalid_argument(what), element_(element) {}
    int64_t element() const { return element_; }

private:
    int64_t element_;
};

/// Writes points[k * n + e] = x_e + frac_k * h_e rounded to T and spacing[k * n + e] = that point
/// minus x_e in double (the step actually taken; spacing may be null when the caller does not need it,
/// and must be null for the stacked layout, which places the points as PointLayout says). h_e = scale * max(1, |x_e|) when step is null,
/// else step[e] (step_len == n) or step[0] (step_len == 1). Throws NonFiniteError for a
/// non-finite x, std::invalid_argument for a step that is not positive and finite (check_point_steps), and
/// StepUnderflowError where a point rounds back to x_e.
template <class T>
void difference_points(const RaggedBatch<T>& x, DifferenceMethod method, double scale, const double* step,
                       int64_t step_len, T* points, double* spacing, PointLayout layout = PointLayout::Rows);

/// Checks the step arguments of difference_points (shared by the CPU and CUDA builders): a relative
/// step scale in (0, 1] when step is null, else step_len 1 or n.
void check_point_steps(int64_t n, double scale, const double* step, int64_t step_len);

/// Checks a difference block's arguments (shared by the CPU and CUDA builders) before any memory is touched.
void check_difference_block(int64_t n, int64_t capacity, int npoints, int64_t points_stride, int64_t q_begin,
                            int64_t count, bool full, int64_t prev_begin, int64_t prev_count);

/// Checks the indices of a random block or estimate (shared by the CPU and CUDA builders): q_begin, count,
/// index_offset and n >= 0, and perturbations [q_begin, q_begin + count) and element indices
/// [index_offset, index_offset + n) within int64 (a wrapped q read another sample's direction, silently).
void check_random_indices(int64_t q_begin, int64_t count, int64_t index_offset, int64_t n);

/// Writes perturbations [q_begin, q_begin + count) of `x` into `out`: row r of datum j's buffer
/// (out[j], `capacity` rows of x.length(j) elements) is x_j with element (q_begin + r) / P set to
/// its point. `points` holds the batch's points at points[k * points_stride + e].
/// full: copy x into every row first. Otherwise the buffers are assumed to hold the previous
/// block [prev_begin, prev_begin + prev_count) and only those elements are restored, so a block
/// costs O(rows) instead of O(rows * n). Throws std::invalid_argument if count > capacity or a
/// perturbation index is out of range (check_difference_block).
template <class T>
void write_difference_block(const RaggedBatch<T>& x, T* const* out, int64_t capacity, const T* points,
                            int64_t points_stride, int npoints, int64_t q_begin, int64_t count, bool full,
                            int64_t prev_begin, int64_t prev_count);

/// One datum's block when its rows already hold x: row r (of `rows`, each `size` elements) gets
/// element r / P set to point r % P, read at points[k * points_stride + i] (points of this datum).
/// Throws std::invalid_argument if a row's element is past `size` or npoints is not 1, 2 or 4.
template <class T>
void write_difference_diagonal(T* out, int64_t size, int64_t rows, const T* points, int64_t points_stride,
                               int npoints);

/// grad[e] and error[e] from the loss values: f[e * f_stride_e + k * f_stride_k] at point k,
/// f0[e * f0_stride] at x (forward only). error is a bound on the rounding error of the quotient
/// (loss_eps * |f| / step) plus, for Richardson, |R - D(h/2)| (the truncation estimate).
void difference_quotients(DifferenceMethod method, int64_t n, const double* spacing, const double* f,
                          int64_t f_stride_e, int64_t f_stride_k, const double* f0, int64_t f0_stride,
                          double loss_eps, double* grad, double* error);

/// Structure "token" (the loss is a sum of per-element terms, each depending on its own element):
/// grad and error (as in difference_quotients) in the working dtype from per-datum loss values.
/// f[k] holds the values at point k with x's layout; f0 (forward only) the values at x. The steps
/// are recomputed from `points` (as difference_points wrote them in `layout`), so no spacing array is
/// needed. Returns -1, or k * n + e for the first non-finite loss value (k = P for f0), in which
/// case grad and error are unspecified, or -2 - e when every loss is finite but the gradient of
/// element e overflows double (losses ~1e308 apart). Throws std::invalid_argument on a layout mismatch.
template <class T, class F>
int64_t token_quotients(DifferenceMethod method, const RaggedBatch<T>& x, const T* points, PointLayout layout,
                        const RaggedBatch<F>* f, const RaggedBatch<F>* f0, double loss_eps, T* grad, T* error);

/// Row r of each datum's buffer (perturbation q = q_begin + r) becomes x + sign * scale * u_s with
/// u_s = random direction s: antithetic: s = q / 2, sign = +1 for even q, -1 for odd; otherwise
/// s = q, sign = +1. Element e uses direction component index_offset + e, so a sub-batch (one datum)
/// sees the same directions as the whole batch.
template <class T>
void write_random_block(const RaggedBatch<T>& x, const double* scale, Direction kind, uint64_t seed,
                        int64_t index_offset, bool antithetic, T* const* out, int64_t capacity, int64_t q_begin,
                        int64_t count);

/// Mean over `samples` of g_s[e] = (f(x + c u_s) - f(x - c u_s)) * u_s[e] / (2 c_e) (antithetic), or
/// (f(x + c u_s) - f0) * u_s[e] / c_e, and the variance of that mean (sample variance / samples;
/// infinity for one sample). f holds 2 * samples values (antithetic, + then -) or samples values.
void random_estimate(Direction kind, uint64_t seed, int64_t n, int64_t index_offset, const double* scale,
                     const double* f, int64_t samples, bool antithetic, double f0, double* grad, double* variance);

}  // namespace regrad
