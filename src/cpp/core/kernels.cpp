// Fused regularizer kernels. Work is split into fixed chunks (never by thread), each summed in
// double in a fixed order, so results are bit-identical for any OpenMP thread count.
#include "regrad/kernels.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernel_dispatch.hpp"
#include "kernel_loops.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace regrad {

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

const char* kernel_isa() { return avx2::available() ? "avx2" : "baseline"; }

namespace {

struct Chunk {
    int64_t datum;
    int64_t begin;  // element range inside the datum
    int64_t end;
};

std::vector<Chunk> make_chunks(const int64_t* offsets, int64_t batch, int64_t width) {
    const int64_t rows_per_chunk = kReductionChunk / width > 0 ? kReductionChunk / width : 1;
    const int64_t step = rows_per_chunk * width;
    std::vector<Chunk> chunks;
    for (int64_t i = 0; i < batch; ++i) {
        const int64_t n = offsets[i + 1] - offsets[i];
        for (int64_t b = 0; b < n; b += step) chunks.push_back({i, b, b + step < n ? b + step : n});
    }
    return chunks;
}

template <class T>
double run_chunk(ChunkOp op, bool with_grad, const T* x, T* g, const uint8_t* mask, int64_t width, int64_t begin,
                 int64_t end, T scale, T& check) {
    if (avx2::available()) return avx2::loop_chunk(op, with_grad, x, g, mask, width, begin, end, scale, check);
    return loop_chunk_any<T>(op, with_grad, x, g, mask, width, begin, end, scale, check);
}

/// Throws NonFiniteError naming the first non-finite (unmasked) input of chunk c; returns if there is none
/// (then the chunk was flagged by a gradient that overflowed T).
template <class T>
void throw_non_finite_input(ChunkOp op, const RaggedBatch<T>& batch, const uint8_t* mask, const Chunk& c) {
    const T* x = batch.data[c.datum];
    const int64_t token0 = batch.offsets[c.datum] / batch.width;
    const bool takes_minus_inf = op == ChunkOp::Entropy;  // p = 0 (formulas::Entropy::prepare)
    for (int64_t e = c.begin; e < c.end; ++e) {
        if (mask != nullptr && mask[token0 + e / batch.width] == 0) continue;
        if (takes_minus_inf && x[e] == -std::numeric_limits<T>::infinity()) continue;
        if (!std::isfinite(x[e])) {
            throw NonFiniteError("non-finite input " + std::to_string(x[e]) + " at " +
                                     describe_position(c.datum, e, batch.width),
                                 c.datum, e);
        }
    }
}

/// Names the first gradient element that is not finite although its input is: the derivative overflows T.
template <class T>
[[noreturn]] void throw_gradient_overflow(const RaggedBatch<T>& batch, const T* grad) {
    for (int64_t i = 0; i < batch.batch; ++i) {
        for (int64_t e = 0; e < batch.length(i); ++e) {
            if (!std::isfinite(grad[batch.offsets[i] + e])) {
                throw NonFiniteError("the gradient at " + describe_position(i, e, batch.width) + " (input " +
                                         std::to_string(batch.data[i][e]) +
                                         ") is not finite (overflow of the input's dtype)",
                                     i, e);
            }
        }
    }
    throw NonFiniteError("the gradient is not finite (overflow of the input's dtype)", -1, -1);
}

// One parallel pass over all chunks; per-datum sums are then added in chunk order. Returns true when
// the inputs are finite but a gradient element overflowed (named by the caller after the value checks).
template <class T>
bool reduce_pass(ChunkOp op, bool with_grad, const RaggedBatch<T>& batch, const std::vector<Chunk>& chunks,
                 const uint8_t* mask,
                 const T* datum_scale, double* per_datum, T* grad) {
    const int64_t nchunks = static_cast<int64_t>(chunks.size());
    std::vector<double> partial(chunks.size(), 0.0);
    std::vector<T> check(chunks.size(), T(0));
    // Kernels are cheap per element but split well: 4 chunks already pay for the threads.
    const bool parallel = batch.size() >= 4 * kReductionChunk;
    (void)parallel;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t c = 0; c < nchunks; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t base = batch.offsets[ch.datum];
        const uint8_t* m = mask == nullptr ? nullptr : mask + base / batch.width;
        T* g = with_grad ? grad + base : nullptr;
        partial[c] = run_chunk<T>(op, with_grad, batch.data[ch.datum], g, m, batch.width, ch.begin, ch.end,
                                  datum_scale[ch.datum], check[c]);
    }
    bool gradient_overflow = false;
    for (int64_t i = 0; i < batch.batch; ++i) per_datum[i] = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) {
        if (check[c] != T(0) || std::isnan(check[c])) {
            throw_non_finite_input(op, batch, mask, chunks[c]);
            if (!with_grad) {
                throw NonFiniteError("non-finite input in datum " + std::to_string(chunks[c].datum), chunks[c].datum,
                                     chunks[c].begin);
            }
            gradient_overflow = true;
        }
        per_datum[chunks[c].datum] += partial[c];
    }
    return gradient_overflow;
}

template <class T>
bool fused(ChunkOp op, const RaggedBatch<T>& batch, const std::vector<Chunk>& chunks, const uint8_t* mask, T scale,
           double* per_datum, T* grad) {
    std::vector<T> scales(static_cast<size_t>(batch.batch), scale);
    return reduce_pass<T>(op, grad != nullptr, batch, chunks, mask, scales.data(), per_datum, grad);
}

template <class T>
constexpr bool range_is_numeric_limits() {
    using limits = std::numeric_limits<T>;
    return formulas::Range<T>::tiny == static_cast<double>(limits::min()) &&
           formulas::Range<T>::epsilon == static_cast<double>(limits::epsilon()) &&
           formulas::Range<T>::largest == static_cast<double>(limits::max());
}
static_assert(range_is_numeric_limits<float>() && range_is_numeric_limits<double>(),
              "formulas::Range must be the float and double limits");

/// The L2 norm of datum i from its values divided by their largest magnitude (as BLAS nrm2 does), in
/// double, and with grad its gradient (x / norm) * scale: no overflow or underflow on the way. One
/// serial pass per datum, so the bits do not depend on threads.
template <class T>
double l2_norm_rescaled(const RaggedBatch<T>& batch, const uint8_t* mask, int64_t i, double scale, T* grad) {
    const T* x = batch.data[i];
    const int64_t n = batch.length(i);
    const uint8_t* m = mask == nullptr ? nullptr : mask + batch.offsets[i] / batch.width;
    auto kept = [&](int64_t e) { return m == nullptr || m[e / batch.width] != 0; };
    double largest = 0.0;
    for (int64_t e = 0; e < n; ++e) {
        if (kept(e)) largest = std::fmax(largest, std::fabs(static_cast<double>(x[e])));
    }
    double norm = 0.0;
    if (largest > 0.0) {
        double sum = 0.0;
        for (int64_t e = 0; e < n; ++e) {
            if (!kept(e)) continue;
            const double r = static_cast<double>(x[e]) / largest;
            sum += r * r;
        }
        norm = largest * std::sqrt(sum);
    }
    if (grad != nullptr) {
        T* g = grad + batch.offsets[i];
        for (int64_t e = 0; e < n; ++e) {
            g[e] = norm > 0.0 && kept(e) ? static_cast<T>(static_cast<double>(x[e]) / norm * scale) : T(0);
        }
    }
    return norm;
}

/// L2 norm per datum: the squares summed in T's SIMD lanes, then (rarely) rescaled data redone in double.
template <class T>
void l2_norm(const RaggedBatch<T>& batch, const std::vector<Chunk>& chunks, const uint8_t* mask, T scale,
             double* per_datum, T* grad) {
    fused(ChunkOp::L2Squared, batch, chunks, mask, scale, per_datum, static_cast<T*>(nullptr));
    std::vector<T> scales(static_cast<size_t>(batch.batch));
    std::vector<int64_t> rescaled;
    int64_t rescaled_elements = 0;
    for (int64_t i = 0; i < batch.batch; ++i) {
        if (formulas::l2_norm_needs_rescale<T, formulas::HostMath>(per_datum[i], batch.length(i), scale)) {
            rescaled.push_back(i);
            rescaled_elements += batch.length(i);
            scales[i] = T(0);  // the gradient pass writes zeros, l2_norm_rescaled the gradient
        } else {
            per_datum[i] = std::sqrt(per_datum[i]);
            scales[i] = per_datum[i] > 0 ? static_cast<T>(scale / per_datum[i]) : T(0);
        }
    }
    if (grad != nullptr) {
        std::vector<double> unused(static_cast<size_t>(batch.batch));
        reduce_pass<T>(ChunkOp::Identity, true, batch, chunks, mask, scales.data(), unused.data(), grad);
    }
    const int64_t count = static_cast<int64_t>(rescaled.size());
    const bool parallel = rescaled_elements >= 4 * kReductionChunk;
    (void)parallel;
#pragma omp parallel for schedule(dynamic) if (parallel)
    for (int64_t k = 0; k < count; ++k) {
        const int64_t i = rescaled[k];
        per_datum[i] = l2_norm_rescaled(batch, mask, i, static_cast<double>(scale), grad);
    }
}

}  // namespace

template <class T>
double regularizer_value_and_grad(Regularizer kind, const RaggedBatch<T>& batch, const uint8_t* token_mask,
                                  Reduction reduction, double* per_datum, T* grad) {
    check_batch(batch);
    if (reduction == Reduction::Mean && batch.batch == 0) {
        throw std::invalid_argument("reduction='mean' over an empty batch (no data) is undefined");
    }
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(batch.batch) : T(1);
    const std::vector<Chunk> chunks = make_chunks(batch.offsets, batch.batch, batch.width);

    bool gradient_overflow = false;
    switch (kind) {
        case Regularizer::L1:
            gradient_overflow = fused(ChunkOp::L1, batch, chunks, token_mask, scale, per_datum, grad);
            break;
        case Regularizer::L2Squared:
            gradient_overflow = fused(ChunkOp::L2Squared, batch, chunks, token_mask, scale, per_datum, grad);
            break;
        case Regularizer::Entropy:
            gradient_overflow = fused(ChunkOp::Entropy, batch, chunks, token_mask, scale, per_datum, grad);
            break;
        case Regularizer::L2Norm: l2_norm(batch, chunks, token_mask, scale, per_datum, grad); break;
    }
    // Values are summed in float64 but returned in T: a float32 value above FLT_MAX would come back inf.
    const double largest = static_cast<double>(std::numeric_limits<T>::max());
    double total = 0.0;
    for (int64_t i = 0; i < batch.batch; ++i) {
        if (!(std::fabs(per_datum[i]) <= largest)) {  // also NaN and inf
            throw NonFiniteError("the regularizer value of datum " + std::to_string(i) +
                                     " is not finite (overflow of the input's dtype)",
                                 i, -1);
        }
        total += per_datum[i];
    }
    double value = reduction == Reduction::Mean ? total / static_cast<double>(batch.batch) : total;
    if (reduction == Reduction::Mean && std::isinf(total)) {  // float64 values whose sum overflows: their mean may not
        value = 0.0;
        for (int64_t i = 0; i < batch.batch; ++i) value += per_datum[i] / static_cast<double>(batch.batch);
    }
    if (!(std::fabs(value) <= largest)) {
        throw NonFiniteError("the regularizer value of the batch (the " +
                                 std::string(reduction == Reduction::Mean ? "mean" : "sum") +
                                 " over data) is not finite (overflow of the input's dtype)",
                             -1, -1);
    }
    if (gradient_overflow) throw_gradient_overflow(batch, grad);
    return value;
}

template double regularizer_value_and_grad<float>(Regularizer, const RaggedBatch<float>&, const uint8_t*,
                                                  Reduction, double*, float*);
template double regularizer_value_and_grad<double>(Regularizer, const RaggedBatch<double>&, const uint8_t*,
                                                   Reduction, double*, double*);

}  // namespace regrad
