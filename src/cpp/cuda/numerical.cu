// The finite-difference engine on the GPU: points and steps, perturbation blocks, difference
// quotients, random blocks and estimates. The quotients, estimates and directions are formulas.hpp's,
// the code the CPU runs, and the module is built with --fmad=false so no multiply-add is contracted
// differently from the CPU: the points, blocks and quotients are the CPU's bits, Rademacher
// directions too; Gaussian directions differ only by the CUDA math library's last-ulp rounding of
// log and cos.
#include <climits>
#include <cmath>

#include "device_common.cuh"
#include "regrad/numerical.hpp"  // check_point_steps, check_difference_block, check_random_indices: shared with the CPU builder

namespace regrad::cuda {

namespace {

/// Pointers [B] | offsets [B + 1], and for blocks the output buffers [B] after them.
struct Ragged {
    const int64_t* words;
    int64_t batch;
    __device__ const int64_t* offsets() const { return words + batch; }
    template <class T>
    __device__ const T* data(int64_t j) const {
        return reinterpret_cast<const T*>(static_cast<std::uintptr_t>(words[j]));
    }
    template <class T>
    __device__ T* out(int64_t j) const {
        return reinterpret_cast<T*>(static_cast<std::uintptr_t>(words[2 * batch + 1 + j]));
    }
};

/// Uploads pointers, offsets and (optionally) output buffers; `scratch` owns the device copy.
template <class T>
Ragged upload_ragged(const RaggedBatch<T>& x, T* const* out, Scratch& scratch, cudaStream_t stream) {
    std::vector<int64_t> table;
    table.reserve(static_cast<size_t>(3 * x.batch + 1));
    append_pointers(table, x.data, x.batch);
    table.insert(table.end(), x.offsets, x.offsets + x.batch + 1);
    if (out != nullptr) append_pointers(table, out, x.batch);
    int64_t* words = scratch.take<int64_t>(table.size());
    upload(words, table, stream);
    return Ragged{words, x.batch};
}


/// First problem in packed order: (element << 3) | code, reduced with an integer atomicMin
/// (order-independent, so the reported element is deterministic).
__device__ inline void report(unsigned long long* first, int64_t e, int64_t code) {
    atomicMin(first, (static_cast<unsigned long long>(e) << 3) | static_cast<unsigned long long>(code));
}

template <class T>
__global__ void points_kernel(Ragged x, int64_t n, int np, double scale, const double* step, int64_t step_len,
                              T* points, double* spacing, unsigned long long* first) {
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t j = datum_of(x.offsets(), x.batch, e);
        const T xv = x.data<T>(j)[e - x.offsets()[j]];
        if (!isfinite(xv)) {
            report(first, e, kStatusNonFiniteInput);
            continue;
        }
        const double h = step == nullptr ? formulas::default_step(static_cast<double>(xv), scale)
                                         : step[step_len == 1 ? 0 : e];
        if (!(h > 0) || !isfinite(h)) {
            report(first, e, kStatusBadStep);
            continue;
        }
        // as the CPU builder: x + h == x or a subnormal spacing (its reciprocal overflows), or a spacing too large
        bool underflow = false, overflow = false;
        for (int k = 0; k < np; ++k) {
            const T p = static_cast<T>(static_cast<double>(xv) + formulas::point_fraction(k) * h);
            const double d = static_cast<double>(p) - static_cast<double>(xv);
            underflow = underflow || fabs(d) < formulas::min_spacing();
            overflow = overflow || !(fabs(d) < formulas::max_spacing());
            points[k * n + e] = p;
            spacing[k * n + e] = d;
        }
        // Richardson: x ± h/2 rounding onto x ± h leaves one step (the extrapolation would read 0/0)
        const bool coincide = np == 4 && (points[e] == points[2 * n + e] || points[n + e] == points[3 * n + e]);
        if (underflow || overflow || coincide) {
            report(first, e, underflow ? kStatusStepUnderflow : overflow ? kStatusStepOverflow : kStatusStepsCoincide);
        }
    }
}

/// status = (code, datum, position) of the first problem, or (0, -1, -1).
__global__ void decode_status(Ragged x, const unsigned long long* first, int64_t* status) {
    const unsigned long long word = *first;
    status[0] = kStatusOk;
    status[1] = -1;
    status[2] = -1;
    if (word == ULLONG_MAX) return;
    const int64_t e = static_cast<int64_t>(word >> 3);
    const int64_t j = datum_of(x.offsets(), x.batch, e);
    status[0] = static_cast<int64_t>(word & 7u);
    status[1] = j;
    status[2] = e - x.offsets()[j];
}

/// Every row of every datum's buffer = x (the first block, or a full rewrite).
template <class T>
__global__ void fill_rows(Ragged x, int64_t n, int64_t rows) {
    const int64_t total = rows * n;
    for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
         t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = t / n;
        const int64_t e = t % n;
        const int64_t j = datum_of(x.offsets(), x.batch, e);
        const int64_t i = e - x.offsets()[j];
        const int64_t len = x.offsets()[j + 1] - x.offsets()[j];
        x.out<T>(j)[r * len + i] = x.data<T>(j)[i];
    }
}

/// Row r gets perturbation q_begin + r: element q / P set to its point k = q % P, or, restore,
/// set back to x (undoing the previous block, so a block costs O(rows), not O(rows * n)).
template <class T, bool Restore>
__global__ void scatter_rows(Ragged x, const T* points, int64_t points_stride, int npoints, int64_t q_begin,
                             int64_t count) {
    for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < count;
         r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t q = q_begin + r;
        const int64_t e = q / npoints;
        const int64_t k = q % npoints;
        const int64_t j = datum_of(x.offsets(), x.batch, e);
        const int64_t i = e - x.offsets()[j];
        const int64_t len = x.offsets()[j + 1] - x.offsets()[j];
        x.out<T>(j)[r * len + i] = Restore ? x.data<T>(j)[i] : points[k * points_stride + e];
    }
}

template <int NP>
__global__ void quotients_kernel(int64_t n, const double* spacing, const double* f, int64_t f_stride_e,
                                 int64_t f_stride_k, const double* f0, int64_t f0_stride, double loss_eps,
                                 double* grad, double* error) {
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        double s[NP];
        double v[NP];
        for (int k = 0; k < NP; ++k) {
            s[k] = spacing[k * n + e];
            v[k] = f[e * f_stride_e + k * f_stride_k];
        }
        const formulas::Quotient<double> q =
            formulas::quotient<NP, DeviceMath>(s, v, NP == 1 ? f0[e * f0_stride] : 0.0, loss_eps);
        grad[e] = q.grad;
        error[e] = q.error;
    }
}

template <class T>
__global__ void random_rows(Ragged x, int64_t n, const double* scale, bool gaussian, uint64_t seed,
                            int64_t index_offset, bool antithetic, int64_t q_begin, int64_t count) {
    const int64_t total = count * n;
    for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
         t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = t / n;
        const int64_t e = t % n;
        const int64_t q = q_begin + r;
        const uint64_t sample = static_cast<uint64_t>(antithetic ? q / 2 : q);
        const double sign = (antithetic && (q % 2 == 1)) ? -1.0 : 1.0;
        const int64_t j = datum_of(x.offsets(), x.batch, e);
        const int64_t i = e - x.offsets()[j];
        const int64_t len = x.offsets()[j + 1] - x.offsets()[j];
        const double u = formulas::random_direction<DeviceMath>(gaussian, seed, sample,
                                                                static_cast<uint64_t>(index_offset + e));
        x.out<T>(j)[r * len + i] = static_cast<T>(static_cast<double>(x.data<T>(j)[i]) + sign * scale[e] * u);
    }
}

__global__ void estimate_kernel(bool gaussian, uint64_t seed, int64_t n, int64_t index_offset, const double* scale,
                                const double* f, int64_t samples, bool antithetic, double f0, double* grad,
                                double* variance) {
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        formulas::random_estimate<DeviceMath>(gaussian, seed, static_cast<uint64_t>(index_offset + e), scale[e], f,
                                              samples, antithetic, f0, grad[e], variance[e]);
    }
}

__global__ void directions_kernel(bool gaussian, uint64_t seed, uint64_t sample, uint64_t index_begin, int64_t count,
                                  double* out) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        out[i] = formulas::random_direction<DeviceMath>(gaussian, seed, sample, index_begin + static_cast<uint64_t>(i));
    }
}

}  // namespace

template <class T>
void difference_points(const RaggedBatch<T>& x, DifferenceMethod method, double scale, const double* step_dev,
                       int64_t step_len, T* points_dev, double* spacing_dev, int64_t* status_dev,
                       std::uintptr_t stream_handle) {
    check_batch(x);
    const int64_t n = x.size();
    check_point_steps(n, scale, step_dev, step_len);  // as the CPU (a relative step above 1 ran here before)
    const cudaStream_t stream = as_stream(stream_handle);
    Scratch scratch(Scratch::bytes_for<int64_t>(2 * x.batch + 1) + Scratch::bytes_for<unsigned long long>(1), stream);
    const Ragged ragged = upload_ragged<T>(x, nullptr, scratch, stream);
    unsigned long long* first = scratch.take<unsigned long long>(1);
    check(cudaMemsetAsync(first, 0xFF, sizeof *first, stream), "cudaMemsetAsync (status)");
    if (n > 0) {
        points_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(ragged, n, points_per_element(method), scale, step_dev,
                                                               step_len, points_dev, spacing_dev, first);
        check_launch("difference points kernel");
    }
    decode_status<<<1, 1, 0, stream>>>(ragged, first, status_dev);
    check_launch("difference points status kernel");
}

template <class T>
void write_difference_block(const RaggedBatch<T>& x, T* const* out, int64_t capacity, const T* points_dev,
                            int64_t points_stride, int npoints, int64_t q_begin, int64_t count, bool full,
                            int64_t prev_begin, int64_t prev_count, std::uintptr_t stream_handle) {
    check_batch(x);
    const int64_t n = x.size();
    check_difference_block(n, capacity, npoints, points_stride, q_begin, count, full, prev_begin, prev_count);
    const cudaStream_t stream = as_stream(stream_handle);
    Scratch scratch(Scratch::bytes_for<int64_t>(3 * x.batch + 1), stream);
    const Ragged ragged = upload_ragged<T>(x, out, scratch, stream);
    if (full) {
        if (capacity * n > 0) {
            fill_rows<T><<<grid_for(capacity * n), kThreads, 0, stream>>>(ragged, n, capacity);
            check_launch("difference block fill kernel");
        }
    } else if (prev_count > 0) {
        scatter_rows<T, true><<<grid_for(prev_count), kThreads, 0, stream>>>(ragged, points_dev, points_stride,
                                                                            npoints, prev_begin, prev_count);
        check_launch("difference block restore kernel");
    }
    if (count > 0) {
        scatter_rows<T, false><<<grid_for(count), kThreads, 0, stream>>>(ragged, points_dev, points_stride, npoints,
                                                                        q_begin, count);
        check_launch("difference block scatter kernel");
    }
}

void difference_quotients(DifferenceMethod method, int64_t n, const double* spacing_dev, const double* f_dev,
                          int64_t f_stride_e, int64_t f_stride_k, const double* f0_dev, int64_t f0_stride,
                          double loss_eps, double* grad_dev, double* error_dev, std::uintptr_t stream_handle) {
    if (method == DifferenceMethod::Forward && f0_dev == nullptr) {
        throw std::invalid_argument("forward differences need the loss at x (f0)");
    }
    if (n <= 0) return;
    const cudaStream_t stream = as_stream(stream_handle);
    const auto launch = [&](auto kernel) {
        kernel<<<grid_for(n), kThreads, 0, stream>>>(n, spacing_dev, f_dev, f_stride_e, f_stride_k, f0_dev, f0_stride,
                                                   loss_eps, grad_dev, error_dev);
    };
    switch (method) {
        case DifferenceMethod::Forward: launch(quotients_kernel<1>); break;
        case DifferenceMethod::Central: launch(quotients_kernel<2>); break;
        case DifferenceMethod::Richardson: launch(quotients_kernel<4>); break;
    }
    check_launch("difference quotients kernel");
}

template <class T>
void write_random_block(const RaggedBatch<T>& x, const double* scale_dev, Direction kind, uint64_t seed,
                        int64_t index_offset, bool antithetic, T* const* out, int64_t capacity, int64_t q_begin,
                        int64_t count, std::uintptr_t stream_handle) {
    check_batch(x);
    if (count > capacity) {
        throw std::invalid_argument("block of " + std::to_string(count) + " perturbations exceeds the " +
                                    std::to_string(capacity) + " rows of the buffers");
    }
    const int64_t n = x.size();
    check_random_indices(q_begin, count, index_offset, n);  // as the CPU
    if (count * n == 0) return;
    const cudaStream_t stream = as_stream(stream_handle);
    Scratch scratch(Scratch::bytes_for<int64_t>(3 * x.batch + 1), stream);
    const Ragged ragged = upload_ragged<T>(x, out, scratch, stream);
    random_rows<T><<<grid_for(count * n), kThreads, 0, stream>>>(ragged, n, scale_dev, kind == Direction::Gaussian,
                                                                 seed, index_offset, antithetic, q_begin, count);
    check_launch("random block kernel");
}

void random_estimate(Direction kind, uint64_t seed, int64_t n, int64_t index_offset, const double* scale_dev,
                     const double* f_dev, int64_t samples, bool antithetic, double f0, double* grad_dev,
                     double* variance_dev, std::uintptr_t stream_handle) {
    if (samples < 1) throw std::invalid_argument("need at least one sample");
    check_random_indices(0, 0, index_offset, n);  // as the CPU
    if (n <= 0) return;
    estimate_kernel<<<grid_for(n), kThreads, 0, as_stream(stream_handle)>>>(
        kind == Direction::Gaussian, seed, n, index_offset, scale_dev, f_dev, samples, antithetic, f0, grad_dev,
        variance_dev);
    check_launch("random estimate kernel");
}

void random_directions(Direction kind, uint64_t seed, uint64_t sample, uint64_t index_begin, int64_t count,
                       double* out_dev, std::uintptr_t stream_handle) {
    if (count < 0) throw std::invalid_argument("count must be >= 0");
    if (count == 0) return;
    directions_kernel<<<grid_for(count), kThreads, 0, as_stream(stream_handle)>>>(kind == Direction::Gaussian, seed,
                                                                                 sample, index_begin, count, out_dev);
    check_launch("random directions kernel");
}

template void difference_points<float>(const RaggedBatch<float>&, DifferenceMethod, double, const double*, int64_t,
                                       float*, double*, int64_t*, std::uintptr_t);
template void difference_points<double>(const RaggedBatch<double>&, DifferenceMethod, double, const double*,
                                        int64_t, double*, double*, int64_t*, std::uintptr_t);
template void write_difference_block<float>(const RaggedBatch<float>&, float* const*, int64_t, const float*, int64_t,
                                            int, int64_t, int64_t, bool, int64_t, int64_t, std::uintptr_t);
template void write_difference_block<double>(const RaggedBatch<double>&, double* const*, int64_t, const double*,
                                             int64_t, int, int64_t, int64_t, bool, int64_t, int64_t, std::uintptr_t);
template void write_random_block<float>(const RaggedBatch<float>&, const double*, Direction, uint64_t, int64_t, bool,
                                        float* const*, int64_t, int64_t, int64_t, std::uintptr_t);
template void write_random_block<double>(const RaggedBatch<double>&, const double*, Direction, uint64_t, int64_t,
                                         bool, double* const*, int64_t, int64_t, int64_t, std::uintptr_t);

}  // namespace regrad::cuda
