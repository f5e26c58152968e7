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

template <class T>
[[noreturn]] void throw_non_finite(ChunkOp op, const RaggedBatch<T>& batch, const uint8_t* mask, const Chunk& c) {
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
    throw NonFiniteError("non-finite input in datum " + std::to_string(c.datum), c.datum, c.begin);
}

// One parallel pass over all chunks; per-datum sums are then added in chunk order.
template <class T>
void reduce_pass(ChunkOp op, bool with_grad, const RaggedBatch<T>& batch, const std::vector<Chunk>& chunks,
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
    for (int64_t i = 0; i < batch.batch; ++i) per_datum[i] = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) {
        if (check[c] != T(0) || std::isnan(check[c])) throw_non_finite(op, batch, mask, chunks[c]);
        per_datum[chunks[c].datum] += partial[c];
    }
}

template <class T>
void fused(ChunkOp op, const RaggedBatch<T>& batch, const std::vector<Chunk>& chunks, const uint8_t* mask, T scale,
           double* per_datum, T* grad) {
    std::vector<T> scales(static_cast<size_t>(batch.batch), scale);
    reduce_pass<T>(op, grad != nullptr, batch, chunks, mask, scales.data(), per_datum, grad);
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

    switch (kind) {
        case Regularizer::L1: fused(ChunkOp::L1, batch, chunks, token_mask, scale, per_datum, grad); break;
        case Regularizer::L2Squared: fused(ChunkOp::L2Squared, batch, chunks, token_mask, scale, per_datum, grad); break;
        case Regularizer::Entropy: fused(ChunkOp::Entropy, batch, chunks, token_mask, scale, per_datum, grad); break;
        case Regularizer::L2Norm: {
            fused(ChunkOp::L2Squared, batch, chunks, token_mask, scale, per_datum, static_cast<T*>(nullptr));
            std::vector<T> scales(static_cast<size_t>(batch.batch));
            for (int64_t i = 0; i < batch.batch; ++i) {
                per_datum[i] = std::sqrt(per_datum[i]);
                scales[i] = per_datum[i] > 0 ? static_cast<T>(scale / per_datum[i]) : T(0);
            }
            if (grad != nullptr) {
                std::vector<double> unused(static_cast<size_t>(batch.batch));
                reduce_pass<T>(ChunkOp::Identity, true, batch, chunks, token_mask, scales.data(), unused.data(), grad);
            }
            break;
        }
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
    const double value = reduction == Reduction::Mean ? total / static_cast<double>(batch.batch) : total;
    if (!(std::fabs(value) <= largest)) {
        throw NonFiniteError("the regularizer value of the batch (the sum over data) is not finite (overflow of the "
                                 "input's dtype)",
                             -1, -1);
    }
    return value;
}

template double regularizer_value_and_grad<float>(Regularizer, const RaggedBatch<float>&, const uint8_t*,
                                                  Reduction, double*, float*);
template double regularizer_value_and_grad<double>(Regularizer, const RaggedBatch<double>&, const uint8_t*,
                                                   Reduction, double*, double*);

}  // namespace regrad
