// Runtime queries and pointer checks for the bindings (host code; no kernels here).
#include "device_common.cuh"

namespace regrad::cuda {

RuntimeInfo runtime_info() {
    RuntimeInfo info{0, 0, 0};
    if (cudaGetDeviceCount(&info.devices) != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: report zero devices, not an error
        info.devices = 0;
    }
    cudaRuntimeGetVersion(&info.runtime_version);
    cudaDriverGetVersion(&info.driver_version);
    return info;
}

void check_device_pointer(const void* ptr, const char* what) {
    if (ptr == nullptr) return;
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, ptr), what);
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
        throw CudaError(std::string(what) + " is not device memory (move the tensor to the GPU first)");
    }
    int device = -1;
    check(cudaGetDevice(&device), "cudaGetDevice");
    if (attr.type == cudaMemoryTypeDevice && attr.device != device) {
        throw CudaError(std::string(what) + " lives on device " + std::to_string(attr.device) +
                        " but the current device is " + std::to_string(device));
    }
}

}  // namespace regrad::cuda
