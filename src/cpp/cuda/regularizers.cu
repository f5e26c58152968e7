// Fused regularizer kernels on the GPU: the CPU's chunking (kReductionChunk elements of whole rows
// per chunk), one thread block per chunk, per-thread double sums combined by a fixed-order tree,
// then per-datum sums in chunk order. No floating-point atomics: the same bits on every run.
#include <cfloat>
#include <climits>
#include <cmath>

#include "device_common.cuh"

namespace regrad::cuda {

namespace {

constexpr long long kNone = LLONG_MAX;  // "no bad element" in the min-reductions

/// Layout of the metadata table: pointers [B] | offsets [B + 1] | first chunk of each datum [B + 1].
struct Meta {
    const int64_t* words;
    int64_t batch;
    __device__ const int64_t* offsets() const { return words + batch; }
    __device__ const int64_t* chunk_first() const { return words + 2 * batch + 1; }
    template <class T>
    __device__ const T* data(int64_t j) const {
        return reinterpret_cast<const T*>(static_cast<std::uintptr_t>(words[j]));
    }
};

/// Elements [begin, end) of chunk c inside its datum j (packed offset base), as the CPU partitions them.
struct ChunkRange {
    int64_t j, base, begin, end;
    __device__ ChunkRange(const Meta& meta, int64_t c, int64_t step) {
        const int64_t* offsets = meta.offsets();
        j = datum_of(meta.chunk_first(), meta.batch, c);
        base = offsets[j];
        const int64_t len = offsets[j + 1] - base;
        begin = (c - meta.chunk_first()[j]) * step;
        end = begin + step < len ? begin + step : len;
    }
};

/// Fixed-order tree over the block's kThreads values (sum); result in sh[0].
__device__ inline void tree_sum(double* sh) {
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    }
    __syncthreads();
}

__device__ inline void tree_max(double* sh) {
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + s]);
    }
    __syncthreads();
}

__device__ inline void tree_min(long long* sh) {
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s && sh[threadIdx.x + s] < sh[threadIdx.x]) sh[threadIdx.x] = sh[threadIdx.x + s];
    }
    __syncthreads();
}

/// One block per chunk: the op's value summed over the chunk (partial[c]), the first non-finite
/// input's packed index (first_bad[c]) and, WithGrad, grad = op gradient * scale * keep and the
/// first element whose gradient is not finite although its input is (first_bad_grad[c]: the
/// derivative overflows T, e.g. entropy's near x = 84.28 in float32).
template <class Op, class T, bool WithGrad>
__global__ void __launch_bounds__(kThreads)
    chunk_pass(Meta meta, int64_t width, int64_t step, const uint8_t* mask, T scale, double* partial,
               long long* first_bad, long long* first_bad_grad, T* grad) {
    __shared__ double sum_sh[kThreads];
    __shared__ long long bad_sh[kThreads];
    __shared__ long long bad_grad_sh[kThreads];
    const int64_t c = blockIdx.x;
    const ChunkRange r(meta, c, step);
    const T* x = meta.data<T>(r.j);
    const uint8_t* m = mask == nullptr ? nullptr : mask + r.base / width;
    double acc = 0.0;
    long long bad = kNone;
    long long bad_grad = kNone;
#pragma unroll 4
    for (int64_t e = r.begin + threadIdx.x; e < r.end; e += kThreads) {
        T xv = x[e];
        T keep = T(1);
        if (m != nullptr) {
            keep = m[width == 1 ? e : e / width] ? T(1) : T(0);  // skip the 64-bit division for [T] data
            xv = keep != T(0) ? xv : T(0);  // masked tokens are ignored entirely
        }
        xv = Op::prepare(xv);  // entropy: -inf (p = 0) contributes 0, as on the CPU
        const bool finite = isfinite(xv);
        if (!finite && bad == kNone) bad = r.base + e;  // elements rise, so the first is the least
        T v, d;
        Op::template eval<DeviceMath>(xv, v, d);
        acc += static_cast<double>(v);
        if (WithGrad) {
            const T g = d * (scale * keep);
            grad[r.base + e] = g;
            if (finite && !isfinite(g) && bad_grad == kNone) bad_grad = r.base + e;
        }
    }
    sum_sh[threadIdx.x] = acc;
    bad_sh[threadIdx.x] = bad;
    tree_sum(sum_sh);
    tree_min(bad_sh);
    if (WithGrad) {
        bad_grad_sh[threadIdx.x] = bad_grad;
        tree_min(bad_grad_sh);
    }
    if (threadIdx.x == 0) {
        partial[c] = sum_sh[0];
        first_bad[c] = bad_sh[0];
        if (WithGrad) first_bad_grad[c] = bad_grad_sh[0];
    }
}

/// One block per datum: its L2 norm from its chunks' sums of squares, or, where those cannot give it
/// (formulas::l2_norm_needs_rescale: squares that overflowed or underflowed T, a zero or fully masked
/// datum included), from its kept values divided by their largest magnitude, in double, as the CPU
/// (and BLAS nrm2) does; rescaled[i] says which. Every thread sums the chunks in the same order, so
/// all take the same branch and the barriers are uniform.
template <class T>
__global__ void __launch_bounds__(kThreads)
    l2_norms(Meta meta, int64_t width, const uint8_t* mask, const double* partial, double scale, double* norms,
             uint8_t* rescaled) {
    __shared__ double sh[kThreads];
    const int64_t i = blockIdx.x;
    const int64_t* offsets = meta.offsets();
    const int64_t* chunk_first = meta.chunk_first();
    const int64_t n = offsets[i + 1] - offsets[i];
    double v = 0.0;
    for (int64_t c = chunk_first[i]; c < chunk_first[i + 1]; ++c) v += partial[c];
    if (!formulas::l2_norm_needs_rescale<T, DeviceMath>(v, n, scale)) {
        if (threadIdx.x == 0) {
            norms[i] = sqrt(v);
            rescaled[i] = 0;
        }
        return;
    }
    const T* x = meta.data<T>(i);
    const uint8_t* m = mask == nullptr ? nullptr : mask + offsets[i] / width;
    double largest = 0.0;
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
        if (m == nullptr || m[e / width]) largest = fmax(largest, fabs(static_cast<double>(x[e])));
    }
    sh[threadIdx.x] = largest;
    tree_max(sh);
    largest = sh[0];
    __syncthreads();  // every thread has read sh[0] before sh is reused
    double sum = 0.0;
    if (largest > 0.0) {
        for (int64_t e = threadIdx.x; e < n; e += kThreads) {
            if (m != nullptr && !m[e / width]) continue;
            const double q = static_cast<double>(x[e]) / largest;
            sum += q * q;
        }
    }
    sh[threadIdx.x] = sum;
    tree_sum(sh);
    if (threadIdx.x == 0) {
        norms[i] = largest > 0.0 ? largest * sqrt(sh[0]) : 0.0;
        rescaled[i] = 1;
    }
}

/// One block per chunk: the L2 norm's gradient x * (scale / ||x||) in T as the CPU's gradient pass,
/// or for a rescaled datum (x / ||x||) * scale in double, as the CPU's l2_norm_rescaled; 0 where masked.
template <class T>
__global__ void __launch_bounds__(kThreads)
    l2_norm_grad(Meta meta, int64_t width, int64_t step, const uint8_t* mask, const double* norms,
                 const uint8_t* rescaled, double scale, T* grad) {
    const ChunkRange r(meta, blockIdx.x, step);
    const T* x = meta.data<T>(r.j);
    const uint8_t* m = mask == nullptr ? nullptr : mask + r.base / width;
    const double norm = norms[r.j];
    const bool redo = rescaled[r.j] != 0;
    // scale / norm only where the datum was not rescaled: there l2_norm_needs_rescale kept it inside T's
    // range; for a rescaled one it may not be (1e41 for float32 subnormal data), an undefined conversion.
    const T s = redo ? T(0) : static_cast<T>(formulas::l2_norm_grad_scale(norm, scale));
    for (int64_t e = r.begin + threadIdx.x; e < r.end; e += kThreads) {
        const bool keep = m == nullptr || m[width == 1 ? e : e / width];
        T g = T(0);
        if (keep && redo) {
            g = norm > 0.0 ? static_cast<T>(static_cast<double>(x[e]) / norm * scale) : T(0);
        } else if (keep) {
            g = x[e] * s;
        }
        grad[r.base + e] = g;
    }
}

/// One block: per-datum values (the L2 norms when given, else the sums of their chunks), the batch
/// value by a fixed-order tree (a float64 mean whose sum overflows as the sum of v_i / B, as on the
/// CPU), and the status: first non-finite input, else first bad value, else the batch value, else
/// the first gradient that overflowed.
template <class T>
__global__ void __launch_bounds__(kThreads)
    finalize(Meta meta, int64_t nchunks, const double* partial, const long long* first_bad,
             const long long* first_bad_grad, const double* norms, bool mean, double* per_datum, double* value,
             int64_t* status) {
    __shared__ double sum_sh[kThreads];
    __shared__ long long bad_sh[kThreads];
    __shared__ long long bad_value_sh[kThreads];
    __shared__ long long bad_grad_sh[kThreads];
    const int64_t* chunk_first = meta.chunk_first();
    // Values are summed in float64 but returned in T: as on the CPU, one beyond T's range is an error.
    const double largest = formulas::Range<T>::largest;
    double total = 0.0;
    long long bad_value = kNone;
    for (int64_t i = threadIdx.x; i < meta.batch; i += kThreads) {
        double v = 0.0;
        if (norms != nullptr) {
            v = norms[i];
        } else {
            for (int64_t c = chunk_first[i]; c < chunk_first[i + 1]; ++c) v += partial[c];
        }
        per_datum[i] = v;
        total += v;
        if (!(fabs(v) <= largest) && bad_value == kNone) bad_value = i;  // also NaN and inf
    }
    long long bad = kNone;
    long long bad_grad = kNone;
    for (int64_t c = threadIdx.x; c < nchunks; c += kThreads) {
        bad = first_bad[c] < bad ? first_bad[c] : bad;
        if (first_bad_grad != nullptr && first_bad_grad[c] < bad_grad) bad_grad = first_bad_grad[c];
    }
    sum_sh[threadIdx.x] = total;
    bad_sh[threadIdx.x] = bad;
    bad_value_sh[threadIdx.x] = bad_value;
    bad_grad_sh[threadIdx.x] = bad_grad;
    tree_sum(sum_sh);
    tree_min(bad_sh);
    tree_min(bad_value_sh);
    tree_min(bad_grad_sh);
    const double sum = sum_sh[0];
    double batch_value = mean ? sum / static_cast<double>(meta.batch) : sum;
    if (mean && isinf(sum)) {  // (the same branch in every thread) float64 values whose sum overflows
        __syncthreads();       // every thread has read sum_sh[0] before it is reused
        double part = 0.0;
        for (int64_t i = threadIdx.x; i < meta.batch; i += kThreads) part += per_datum[i] / static_cast<double>(meta.batch);
        sum_sh[threadIdx.x] = part;
        tree_sum(sum_sh);
        batch_value = sum_sh[0];
    }
    if (threadIdx.x == 0) {
        *value = batch_value;
        status[0] = kStatusOk;
        status[1] = -1;
        status[2] = -1;
        if (bad_sh[0] != kNone) {
            const int64_t j = datum_of(meta.offsets(), meta.batch, bad_sh[0]);
            status[0] = kStatusNonFiniteInput;
            status[1] = j;
            status[2] = bad_sh[0] - meta.offsets()[j];
        } else if (bad_value_sh[0] != kNone) {
            status[0] = kStatusNonFiniteValue;
            status[1] = bad_value_sh[0];
        } else if (!(fabs(batch_value) <= largest)) {  // finite data whose sum overflows: datum -1, the batch
            status[0] = kStatusNonFiniteValue;
            status[1] = -1;
        } else if (bad_grad_sh[0] != kNone) {
            const int64_t j = datum_of(meta.offsets(), meta.batch, bad_grad_sh[0]);
            status[0] = kStatusGradientOverflow;
            status[1] = j;
            status[2] = bad_grad_sh[0] - meta.offsets()[j];
        }
    }
}

template <class Op, class T>
void launch_chunks(bool with_grad, int64_t nchunks, cudaStream_t stream, Meta meta, int64_t width, int64_t step,
                   const uint8_t* mask, T scale, double* partial, long long* first_bad, long long* first_bad_grad,
                   T* grad) {
    if (nchunks == 0) return;
    const dim3 grid(static_cast<unsigned>(nchunks));
    if (with_grad) {
        chunk_pass<Op, T, true><<<grid, kThreads, 0, stream>>>(meta, width, step, mask, scale, partial, first_bad,
                                                               first_bad_grad, grad);
    } else {
        chunk_pass<Op, T, false><<<grid, kThreads, 0, stream>>>(meta, width, step, mask, scale, partial, first_bad,
                                                                nullptr, nullptr);
    }
    check_launch("regularizer chunk kernel");
}

}  // namespace

template <class T>
void regularizer_value_and_grad(Regularizer kind, const RaggedBatch<T>& batch, const uint8_t* mask_dev,
                                Reduction reduction, double* per_datum_dev, T* grad_dev, double* value_dev,
                                int64_t* status_dev, std::uintptr_t stream_handle) {
    check_offsets(batch.offsets, batch.batch, batch.width);
    if (reduction == Reduction::Mean && batch.batch == 0) {
        throw std::invalid_argument("reduction='mean' over an empty batch (no data) is undefined");
    }
    for (int64_t i = 0; i < batch.batch; ++i) {
        if (batch.length(i) > 0 && batch.data[i] == nullptr) {
            throw std::invalid_argument("datum " + std::to_string(i) + " has elements but no data pointer");
        }
    }
    const cudaStream_t stream = as_stream(stream_handle);
    const int64_t b = batch.batch;
    // The CPU's partition: whole rows, about kReductionChunk elements per chunk.
    const int64_t rows_per_chunk = kReductionChunk / batch.width > 0 ? kReductionChunk / batch.width : 1;
    const int64_t step = rows_per_chunk * batch.width;
    std::vector<int64_t> table;
    table.reserve(static_cast<size_t>(3 * b + 2));
    append_pointers(table, batch.data, b);
    table.insert(table.end(), batch.offsets, batch.offsets + b + 1);
    int64_t nchunks = 0;
    for (int64_t i = 0; i < b; ++i) {
        table.push_back(nchunks);
        nchunks += (batch.length(i) + step - 1) / step;
    }
    table.push_back(nchunks);
    if (nchunks > INT_MAX || b > INT_MAX) throw std::invalid_argument("batch too large for one launch");

    const bool norm = kind == Regularizer::L2Norm;
    const bool with_grad = grad_dev != nullptr;
    Scratch scratch(Scratch::bytes_for<int64_t>(table.size()) + Scratch::bytes_for<double>(nchunks) +
                        2 * Scratch::bytes_for<long long>(nchunks) + Scratch::bytes_for<double>(b) +
                        Scratch::bytes_for<uint8_t>(b),
                    stream);
    int64_t* words = scratch.take<int64_t>(table.size());
    double* partial = scratch.take<double>(nchunks);
    long long* first_bad = scratch.take<long long>(nchunks);
    long long* first_bad_grad = with_grad && !norm ? scratch.take<long long>(nchunks) : nullptr;
    double* norms = norm ? scratch.take<double>(b) : nullptr;
    uint8_t* rescaled = norm ? scratch.take<uint8_t>(b) : nullptr;
    upload(words, table, stream);
    const Meta meta{words, b};
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(b) : T(1);  // in T, as the CPU
    const bool mean = reduction == Reduction::Mean;

    switch (kind) {
        case Regularizer::L1:
            launch_chunks<formulas::L1, T>(with_grad, nchunks, stream, meta, batch.width, step, mask_dev, scale,
                                           partial, first_bad, first_bad_grad, grad_dev);
            break;
        case Regularizer::L2Squared:
            launch_chunks<formulas::L2Squared, T>(with_grad, nchunks, stream, meta, batch.width, step, mask_dev,
                                                  scale, partial, first_bad, first_bad_grad, grad_dev);
            break;
        case Regularizer::Entropy:
            launch_chunks<formulas::Entropy, T>(with_grad, nchunks, stream, meta, batch.width, step, mask_dev,
                                                scale, partial, first_bad, first_bad_grad, grad_dev);
            break;
        case Regularizer::L2Norm:  // pass 1: sums of squares; then the norms (rescaled where needed)
            launch_chunks<formulas::L2Squared, T>(false, nchunks, stream, meta, batch.width, step, mask_dev, scale,
                                                  partial, first_bad, nullptr, nullptr);
            if (b > 0) {
                l2_norms<T><<<static_cast<unsigned>(b), kThreads, 0, stream>>>(
                    meta, batch.width, mask_dev, partial, static_cast<double>(scale), norms, rescaled);
                check_launch("regularizer norm kernel (l2 norm)");
            }
            break;
    }
    finalize<T><<<1, kThreads, 0, stream>>>(meta, nchunks, partial, first_bad, first_bad_grad, norms, mean,
                                            per_datum_dev, value_dev, status_dev);
    check_launch("regularizer finalize kernel");
    if (norm && with_grad && nchunks > 0) {  // pass 2: the gradient from the norms
        l2_norm_grad<T><<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
            meta, batch.width, step, mask_dev, norms, rescaled, static_cast<double>(scale), grad_dev);
        check_launch("regularizer gradient kernel (l2 norm)");
    }
}

template void regularizer_value_and_grad<float>(Regularizer, const RaggedBatch<float>&, const uint8_t*, Reduction,
                                                double*, float*, double*, int64_t*, std::uintptr_t);
template void regularizer_value_and_grad<double>(Regularizer, const RaggedBatch<double>&, const uint8_t*,
                                                 Reduction, double*, double*, double*, int64_t*, std::uintptr_t);

}  // namespace regrad::cuda
