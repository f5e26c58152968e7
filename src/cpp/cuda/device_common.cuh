// Helpers shared by the .cu files: error checks, stream-ordered scratch memory, ragged metadata
// on the device, and the CUDA math the shared formulas call.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_api.hpp"
#include "regrad/formulas.hpp"

namespace regrad::cuda {

/// Throws CudaError naming the operation and carrying the runtime's message.
inline void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear a sticky-free error so the next call starts clean
        throw CudaError(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + ": " +
                        cudaGetErrorString(err));
    }
}

/// Checks the launch of the kernels just queued (configuration errors show up here).
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

constexpr int kThreads = 256;  ///< threads per block everywhere: the reduction trees assume it

/// Blocks for a grid-stride loop over n items (capped: every block loops).
inline unsigned grid_for(int64_t n) {
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    return static_cast<unsigned>(blocks < 1 ? 1 : blocks > 65535 * 8 ? 65535 * 8 : blocks);
}

/// Device scratch memory from the stream-ordered allocator, freed on the same stream (so the
/// kernels queued before the free finish first). Several arrays are carved from one allocation.
class Scratch {
public:
    Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
        if (bytes > 0) check(cudaMallocAsync(&base_, bytes, stream), "cudaMallocAsync (scratch)");
        size_ = bytes;
    }
    ~Scratch() {
        if (base_ != nullptr) cudaFreeAsync(base_, stream_);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;

    /// The next `count` objects of type U, 256-byte aligned.
    template <class U>
    U* take(size_t count) {
        used_ = (used_ + 255) / 256 * 256;
        U* p = reinterpret_cast<U*>(static_cast<char*>(base_) + used_);
        used_ += count * sizeof(U);
        if (used_ > size_) throw CudaError("internal error: scratch memory overrun");
        return count > 0 ? p : nullptr;
    }

    /// Bytes to reserve for `count` objects of type U (with alignment slack).
    template <class U>
    static size_t bytes_for(size_t count) {
        return count * sizeof(U) + 256;
    }

private:
    void* base_ = nullptr;
    size_t size_ = 0;
    size_t used_ = 0;
    cudaStream_t stream_;
};

/// Copies a small host table (pointers, offsets) to the device on the stream. The source is
/// pageable: the runtime stages it before returning, so the vector may die right after.
inline void upload(int64_t* dst, const std::vector<int64_t>& src, cudaStream_t stream) {
    if (src.empty()) return;
    check(cudaMemcpyAsync(dst, src.data(), src.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (batch metadata)");
}

/// Device pointers of a ragged batch as int64 words, for the metadata table.
template <class T>
void append_pointers(std::vector<int64_t>& table, const T* const* data, int64_t batch) {
    for (int64_t j = 0; j < batch; ++j) table.push_back(static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(data[j])));
}

/// The datum holding packed element e: the last j with offsets[j] <= e among offsets[0..batch].
__device__ inline int64_t datum_of(const int64_t* offsets, int64_t batch, int64_t e) {
    int64_t lo = 0;
    int64_t hi = batch;  // offsets[lo] <= e < offsets[hi] for a valid e
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (offsets[mid] <= e) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/// The CUDA math library behind the shared formulas (full precision: no fast-math intrinsics).
struct DeviceMath {
    __device__ static float exp(float x) { return expf(x); }
    __device__ static double exp(double x) { return ::exp(x); }
    __device__ static double log(double x) { return ::log(x); }
    __device__ static double sqrt(double x) { return ::sqrt(x); }
    __device__ static double cos(double x) { return ::cos(x); }
    __device__ static float abs(float x) { return fabsf(x); }
    __device__ static double abs(double x) { return fabs(x); }
    __device__ static double infinity() { return INFINITY; }
};

}  // namespace regrad::cuda
