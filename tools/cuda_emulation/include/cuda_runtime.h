// Host emulation of the bits of the CUDA runtime / device language that regrad's .cu files use.
// Each block runs as kThreads std::threads with a std::barrier for __syncthreads (exited threads
// drop out of the barrier). Every __syncthreads phase checks that all live threads hit the same line.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <functional>

using std::isfinite;
using std::isinf;
using std::isnan;

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3e { unsigned x = 0, y = 0, z = 0; };

namespace emu {
struct ThreadCtx { uint3e threadIdx, blockIdx; dim3 blockDim, gridDim; };
inline thread_local ThreadCtx ctx;
inline std::barrier<>* bar = nullptr;
inline std::atomic<int> sync_line{-1};
inline std::atomic<long> sync_mismatch{0};
inline std::atomic<long> oob{0};

inline void sync(int line) {
    // all live threads of a phase must be at the same __syncthreads
    int expected = -1;
    if (!sync_line.compare_exchange_strong(expected, line) && expected != line) {
        ++sync_mismatch;
        std::fprintf(stderr, "EMU: divergent __syncthreads (line %d vs %d)\n", line, expected);
        std::abort();  // pytest captures stderr: a message alone lets the test pass (UB on a GPU)
    }
    bar->arrive_and_wait();
    sync_line.store(-1);
    bar->arrive_and_wait();
}

struct Cfg { dim3 grid; dim3 block; size_t shmem = 0; void* stream = nullptr;
    Cfg(dim3 g, dim3 b, size_t s = 0, void* st = nullptr) : grid(g), block(b), shmem(s), stream(st) {} };

template <class... P, class... A>
void launch(Cfg cfg, void (*k)(P...), A&&... args) {
    std::tuple<P...> params(std::forward<A>(args)...);  // by value, as a kernel's parameters
    const unsigned nthreads = cfg.block.x;
    if (nthreads == 0 || nthreads > 1024 || cfg.grid.x == 0) {
        std::fprintf(stderr, "EMU: bad launch config grid=%u block=%u\n", cfg.grid.x, nthreads);
        std::abort();
    }
    for (unsigned b = 0; b < cfg.grid.x; ++b) {
        std::barrier<> barrier(nthreads);
        bar = &barrier;
        sync_line = -1;
        std::vector<std::thread> ts;
        ts.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t) {
            ts.emplace_back([&, t, b] {
                ctx.threadIdx.x = t; ctx.blockIdx.x = b; ctx.blockDim = cfg.block; ctx.gridDim = cfg.grid;
                std::apply([&](auto... p) { k(p...); }, params);
                barrier.arrive_and_drop();
            });
        }
        for (auto& th : ts) th.join();
        bar = nullptr;
    }
}
}  // namespace emu

#define threadIdx (emu::ctx.threadIdx)
#define blockIdx (emu::ctx.blockIdx)
#define blockDim (emu::ctx.blockDim)
#define gridDim (emu::ctx.gridDim)
#define __syncthreads() emu::sync(__LINE__)

inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}

// ---- runtime API
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef struct CUstream_st* cudaStream_t;
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes { cudaMemoryType type; int device; void* devicePointer; void* hostPointer; };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
    *p = std::malloc(n);
    std::memset(*p, 0xCD, n);  // garbage, as uninitialised device memory
    return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) { std::memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
    a->type = cudaMemoryTypeDevice; a->device = 0; a->devicePointer = const_cast<void*>(p); a->hostPointer = nullptr;
    return cudaSuccess;
}
