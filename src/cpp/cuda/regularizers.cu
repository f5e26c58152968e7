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

/// Fixed-order tree over the block's kThreads values (sum); result in sh[0].
__device__ inline void tree_sum(double* sh) {
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
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
/// input's packed index (first_bad[c]) and, WithGrad, grad = op gradient * scale * keep.
template <class Op, class T, bool WithGrad, bool WithValue>
__global__ void __launch_bounds__(kThreads)
    chunk_pass(Meta meta, int64_t width, int64_t step, const uint8_t* mask, const T* datum_scale, T scale,
               double* partial, long long* first_bad, T* grad) {
    __shared__ double sum_sh[kThreads];
    __shared__ long long bad_sh[kThreads];
    const int64_t c = blockIdx.x;
    const int64_t* offsets = meta.offsets();
    const int64_t j = datum_of(meta.chunk_first(), meta.batch, c);
    const int64_t base = offsets[j];
    const int64_t len = offsets[j + 1] - base;
    const int64_t begin = (c - meta.chunk_first()[j]) * step;
    const int64_t end = begin + step < len ? begin + step : len;
    const T* x = meta.data<T>(j);
    const uint8_t* m = mask == nullptr ? nullptr : mask + base / width;
    const T s = datum_scale != nullptr ? datum_scale[j] : scale;
    double acc = 0.0;
    long long bad = kNone;
#pragma unroll 4
    for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
        T xv = x[e];
        T keep = T(1);
        if (m != nullptr) {
            keep = m[width == 1 ? e : e / width] ? T(1) : T(0);  // skip the 64-bit division for [T] data
            xv = keep != T(0) ? xv : T(0);  // masked tokens are ignored entirely
        }
        xv = Op::prepare(xv);  // entropy: -inf (p = 0) contributes 0, as on the CPU
        if (!isfinite(xv) && bad == kNone) bad = base + e;  // elements rise, so the first is the least
        T v, d;
        Op::template eval<DeviceMath>(xv, v, d);
        if (WithValue) acc += static_cast<double>(v);
        if (WithGrad) grad[base + e] = d * (s * keep);
    }
    sum_sh[threadIdx.x] = acc;
    bad_sh[threadIdx.x] = bad;
    if (WithValue) tree_sum(sum_sh);
    tree_min(bad_sh);
    if (threadIdx.x == 0) {
        if (WithValue) partial[c] = sum_sh[0];
        first_bad[c] = bad_sh[0];
    }
}

/// One block: per-datum sums in chunk order (sqrt and gradient scales for the L2 norm), the batch
/// value by a fixed-order tree, and the status (first non-finite input, else first bad value).
template <class T>
__global__ void __launch_bounds__(kThreads)
    finalize(Meta meta, int64_t nchunks, const double* partial, const long long* first_bad, bool norm,
             double scale, bool mean, T* datum_scale, double* per_datum, double* value, int64_t* status) {
    __shared__ double sum_sh[kThreads];
    __shared__ long long bad_sh[kThreads];
    __shared__ long long bad_value_sh[kThreads];
    const int64_t* chunk_first = meta.chunk_first();
    // Values are summed in float64 but returned in T: as on the CPU, one beyond T's range is an error.
    const double largest = sizeof(T) == sizeof(float) ? static_cast<double>(FLT_MAX) : DBL_MAX;
    double total = 0.0;
    long long bad_value = kNone;
    for (int64_t i = threadIdx.x; i < meta.batch; i += kThreads) {
        double v = 0.0;
        for (int64_t c = chunk_first[i]; c < chunk_first[i + 1]; ++c) v += partial[c];
        if (norm) {
            v = sqrt(v);
            datum_scale[i] = static_cast<T>(formulas::l2_norm_grad_scale(v, scale));
        }
        per_datum[i] = v;
        total += v;
        if (!(fabs(v) <= largest) && bad_value == kNone) bad_value = i;  // also NaN and inf
    }
    long long bad = kNone;
    for (int64_t c = threadIdx.x; c < nchunks; c += kThreads) bad = first_bad[c] < bad ? first_bad[c] : bad;
    sum_sh[threadIdx.x] = total;
    bad_sh[threadIdx.x] = bad;
    bad_value_sh[threadIdx.x] = bad_value;
    tree_sum(sum_sh);
    tree_min(bad_sh);
    tree_min(bad_value_sh);
    if (threadIdx.x == 0) {
        const double batch_value = mean ? sum_sh[0] / static_cast<double>(meta.batch) : sum_sh[0];
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
        }
    }
}

template <class Op, class T>
void launch_chunks(bool with_grad, int64_t nchunks, cudaStream_t stream, Meta meta, int64_t width, int64_t step,
                   const uint8_t* mask, const T* datum_scale, T scale, double* partial, long long* first_bad,
                   T* grad) {
    if (nchunks == 0) return;
    const dim3 grid(static_cast<unsigned>(nchunks));
    if (with_grad) {
        chunk_pass<Op, T, true, true><<<grid, kThreads, 0, stream>>>(meta, width, step, mask, datum_scale, scale,
                                                                     partial, first_bad, grad);
    } else {
        chunk_pass<Op, T, false, true><<<grid, kThreads, 0, stream>>>(meta, width, step, mask, datum_scale, scale,
                                                                      partial, first_bad, grad);
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
    if (nchunks > INT_MAX) throw std::invalid_argument("batch too large for one launch");

    Scratch scratch(Scratch::bytes_for<int64_t>(table.size()) + Scratch::bytes_for<double>(nchunks) +
                        Scratch::bytes_for<long long>(nchunks) + Scratch::bytes_for<T>(b),
                    stream);
    int64_t* words = scratch.take<int64_t>(table.size());
    double* partial = scratch.take<double>(nchunks);
    long long* first_bad = scratch.take<long long>(nchunks);
    T* datum_scale = scratch.take<T>(b);
    upload(words, table, stream);
    const Meta meta{words, b};
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(b) : T(1);  // in T, as the CPU
    const bool mean = reduction == Reduction::Mean;
    const bool norm = kind == Regularizer::L2Norm;
    const bool with_grad = grad_dev != nullptr;

    switch (kind) {
        case Regularizer::L1:
            launch_chunks<formulas::L1, T>(with_grad, nchunks, stream, meta, batch.width, step, mask_dev, nullptr,
                                           scale, partial, first_bad, grad_dev);
            break;
        case Regularizer::L2Squared:
            launch_chunks<formulas::L2Squared, T>(with_grad, nchunks, stream, meta, batch.width, step, mask_dev,
                                                  nullptr, scale, partial, first_bad, grad_dev);
            break;
        case Regularizer::Entropy:
            launch_chunks<formulas::Entropy, T>(with_grad, nchunks, stream, meta, batch.width, step, mask_dev,
                                                nullptr, scale, partial, first_bad, grad_dev);
            break;
        case Regularizer::L2Norm:  // pass 1: sum of squares; the gradient needs the norm first
            launch_chunks<formulas::L2Squared, T>(false, nchunks, stream, meta, batch.width, step, mask_dev,
                                                  nullptr, scale, partial, first_bad, nullptr);
            break;
    }
    finalize<T><<<1, kThreads, 0, stream>>>(meta, nchunks, partial, first_bad, norm, static_cast<double>(scale),
                                            mean, datum_scale, per_datum_dev, value_dev, status_dev);
    check_launch("regularizer finalize kernel");
    if (norm && with_grad && nchunks > 0) {  // pass 2: g = x * (scale / ||x||), per datum
        chunk_pass<formulas::Identity, T, true, false><<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
            meta, batch.width, step, mask_dev, datum_scale, scale, partial, first_bad, grad_dev);
        check_launch("regularizer gradient kernel (l2 norm)");
    }
}

template void regularizer_value_and_grad<float>(Regularizer, const RaggedBatch<float>&, const uint8_t*, Reduction,
                                                double*, float*, double*, int64_t*, std::uintptr_t);
template void regularizer_value_and_grad<double>(Regularizer, const RaggedBatch<double>&, const uint8_t*,
                                                 Reduction, double*, double*, double*, int64_t*, std::uintptr_t);

}  // namespace regrad::cuda
