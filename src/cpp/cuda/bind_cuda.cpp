// regrad._cuda: thin bindings of the CUDA kernels. Device memory arrives as integer addresses
// (torch's tensor.data_ptr()) and the stream as an integer (torch.cuda.current_stream().cuda_stream),
// so this module needs neither torch's headers nor the CUDA headers. Shapes are checked by the
// Python caller (regrad._gpu); here: offsets, ranges, and that the addresses are device memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../bindings/parse.hpp"
#include "cuda_api.hpp"

namespace py = pybind11;

namespace regrad::cuda {

using bindings::parse_direction;
using bindings::parse_kind;
using bindings::parse_method;
using bindings::parse_reduction;

namespace {

using Address = std::uintptr_t;

template <class T>
T* ptr(Address a) {
    return reinterpret_cast<T*>(a);
}

bool parse_dtype(const std::string& dtype) {
    if (dtype == "float32") return false;
    if (dtype == "float64") return true;
    throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

/// A ragged batch of device data: per-datum addresses, B + 1 offsets and the row width.
struct DeviceBatch {
    std::vector<Address> data;
    std::vector<int64_t> offsets;
    int64_t width;

    template <class T>
    RaggedBatch<T> view() const {
        return RaggedBatch<T>{reinterpret_cast<const T* const*>(data.data()), offsets.data(),
                              static_cast<int64_t>(data.size()), width};
    }
};

DeviceBatch device_batch(std::vector<Address> data, std::vector<int64_t> offsets, int64_t width) {
    if (offsets.size() != data.size() + 1) {
        throw py::value_error("got " + std::to_string(offsets.size()) + " offsets for " + std::to_string(data.size()) +
                              " data; expected B + 1");
    }
    if (width < 1) throw py::value_error("width must be >= 1");
    for (size_t j = 0; j < data.size(); ++j) {
        if (offsets[j + 1] > offsets[j]) {  // the first non-empty datum: one check per call is enough
            check_device_pointer(ptr<void>(data[j]), ("logprobs_list[" + std::to_string(j) + "]").c_str());
            break;
        }
    }
    return DeviceBatch{std::move(data), std::move(offsets), width};
}

/// Output buffer table: one device address per datum.
std::vector<Address> buffer_table(std::vector<Address> outs, const DeviceBatch& batch) {
    if (outs.size() != batch.data.size()) {
        throw py::value_error("got " + std::to_string(outs.size()) + " output buffers for " +
                              std::to_string(batch.data.size()) + " data");
    }
    if (!outs.empty()) check_device_pointer(ptr<void>(outs[0]), "output buffer 0");
    return outs;
}

void regularizer(const std::string& kind, const std::string& dtype, std::vector<Address> data,
                 std::vector<int64_t> offsets, int64_t width, Address mask, const std::string& reduction,
                 Address per_datum, Address grad, Address value, Address status, Address stream) {
    const Regularizer k = parse_kind(kind);
    const Reduction r = parse_reduction(reduction);
    const bool f64 = parse_dtype(dtype);
    DeviceBatch batch = device_batch(std::move(data), std::move(offsets), width);
    check_device_pointer(ptr<void>(per_datum), "per_datum");
    check_device_pointer(ptr<void>(value), "value");
    check_device_pointer(ptr<void>(status), "status");
    check_device_pointer(ptr<void>(grad), "grad");
    check_device_pointer(ptr<void>(mask), "mask");
    py::gil_scoped_release release;
    if (f64) {
        regularizer_value_and_grad<double>(k, batch.view<double>(), ptr<const uint8_t>(mask), r, ptr<double>(per_datum),
                                           ptr<double>(grad), ptr<double>(value), ptr<int64_t>(status), stream);
    } else {
        regularizer_value_and_grad<float>(k, batch.view<float>(), ptr<const uint8_t>(mask), r, ptr<double>(per_datum),
                                          ptr<float>(grad), ptr<double>(value), ptr<int64_t>(status), stream);
    }
}

void points(const std::string& method, const std::string& dtype, std::vector<Address> data,
            std::vector<int64_t> offsets, int64_t width, double scale, Address step, int64_t step_len, Address points,
            Address spacing, Address status, Address stream) {
    const DifferenceMethod m = parse_method(method);
    const bool f64 = parse_dtype(dtype);
    DeviceBatch batch = device_batch(std::move(data), std::move(offsets), width);
    check_device_pointer(ptr<void>(points), "points");
    check_device_pointer(ptr<void>(spacing), "spacing");
    check_device_pointer(ptr<void>(status), "status");
    py::gil_scoped_release release;
    if (f64) {
        difference_points<double>(batch.view<double>(), m, scale, ptr<const double>(step), step_len,
                                  ptr<double>(points), ptr<double>(spacing), ptr<int64_t>(status), stream);
    } else {
        difference_points<float>(batch.view<float>(), m, scale, ptr<const double>(step), step_len, ptr<float>(points),
                                 ptr<double>(spacing), ptr<int64_t>(status), stream);
    }
}

void block(const std::string& dtype, std::vector<Address> data, std::vector<int64_t> offsets, int64_t width,
           std::vector<Address> outs, int64_t capacity, Address points, int64_t points_stride, int npoints,
           int64_t q_begin, int64_t count, bool full, int64_t prev_begin, int64_t prev_count, Address stream) {
    const bool f64 = parse_dtype(dtype);
    DeviceBatch batch = device_batch(std::move(data), std::move(offsets), width);
    const std::vector<Address> out = buffer_table(std::move(outs), batch);
    py::gil_scoped_release release;
    if (f64) {
        write_difference_block<double>(batch.view<double>(), reinterpret_cast<double* const*>(out.data()), capacity,
                                       ptr<const double>(points), points_stride, npoints, q_begin, count, full,
                                       prev_begin, prev_count, stream);
    } else {
        write_difference_block<float>(batch.view<float>(), reinterpret_cast<float* const*>(out.data()), capacity,
                                      ptr<const float>(points), points_stride, npoints, q_begin, count, full,
                                      prev_begin, prev_count, stream);
    }
}

void quotients(const std::string& method, int64_t n, Address spacing, Address f, int64_t f_stride_e,
               int64_t f_stride_k, Address f0, int64_t f0_stride, double loss_eps, Address grad, Address error,
               Address stream) {
    const DifferenceMethod m = parse_method(method);
    if (n < 0 || f_stride_e < 0 || f_stride_k < 0 || f0_stride < 0) throw py::value_error("sizes and strides must be >= 0");
    check_device_pointer(ptr<void>(f), "f");
    py::gil_scoped_release release;
    difference_quotients(m, n, ptr<const double>(spacing), ptr<const double>(f), f_stride_e, f_stride_k,
                         ptr<const double>(f0), f0_stride, loss_eps, ptr<double>(grad), ptr<double>(error), stream);
}

void random_block(const std::string& dtype, std::vector<Address> data, std::vector<int64_t> offsets, int64_t width,
                  Address scale, const std::string& kind, uint64_t seed, int64_t index_offset, bool antithetic,
                  std::vector<Address> outs, int64_t capacity, int64_t q_begin, int64_t count, Address stream) {
    const bool f64 = parse_dtype(dtype);
    const Direction d = parse_direction(kind);
    DeviceBatch batch = device_batch(std::move(data), std::move(offsets), width);
    const std::vector<Address> out = buffer_table(std::move(outs), batch);
    check_device_pointer(ptr<void>(scale), "scale");
    py::gil_scoped_release release;
    if (f64) {
        write_random_block<double>(batch.view<double>(), ptr<const double>(scale), d, seed, index_offset, antithetic,
                                   reinterpret_cast<double* const*>(out.data()), capacity, q_begin, count, stream);
    } else {
        write_random_block<float>(batch.view<float>(), ptr<const double>(scale), d, seed, index_offset, antithetic,
                                  reinterpret_cast<float* const*>(out.data()), capacity, q_begin, count, stream);
    }
}

void estimate(const std::string& kind, uint64_t seed, int64_t n, int64_t index_offset, Address scale, Address f,
              int64_t samples, bool antithetic, double f0, Address grad, Address variance, Address stream) {
    const Direction d = parse_direction(kind);
    if (index_offset < 0 || n < 0) throw py::value_error("n and index_offset must be >= 0");
    check_device_pointer(ptr<void>(f), "f");
    py::gil_scoped_release release;
    random_estimate(d, seed, n, index_offset, ptr<const double>(scale), ptr<const double>(f), samples, antithetic, f0,
                    ptr<double>(grad), ptr<double>(variance), stream);
}

void directions(const std::string& kind, uint64_t seed, uint64_t sample, uint64_t index_begin, int64_t count,
                Address out, Address stream) {
    const Direction d = parse_direction(kind);
    check_device_pointer(ptr<void>(out), "out");
    py::gil_scoped_release release;
    random_directions(d, seed, sample, index_begin, count, ptr<double>(out), stream);
}

}  // namespace

}  // namespace regrad::cuda

#ifndef REGRAD_CUDA_ARCHITECTURES
#define REGRAD_CUDA_ARCHITECTURES "unknown"
#endif

PYBIND11_MODULE(_cuda, m) {
    using namespace regrad::cuda;
    m.doc() = "regrad's CUDA kernels (private: regrad dispatches CUDA tensors here)";
    py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
    m.def("build_info", []() {
        const RuntimeInfo info = runtime_info();
        py::dict d;
        d["architectures"] = REGRAD_CUDA_ARCHITECTURES;
        d["devices"] = info.devices;
        d["runtime_version"] = info.runtime_version;
        d["driver_version"] = info.driver_version;
        return d;
    }, "Compiled architectures, visible devices, CUDA runtime and driver versions (no device needed).");
    m.def("regularizer", &regularizer, py::arg("kind"), py::arg("dtype"), py::arg("data"), py::arg("offsets"),
          py::arg("width"), py::arg("mask"), py::arg("reduction"), py::arg("per_datum"), py::arg("grad"),
          py::arg("value"), py::arg("status"), py::arg("stream"),
          "Fused value [1] f64, per-datum values [B] f64, packed gradient and status int64[3], queued on the stream.");
    m.def("difference_points", &points, py::arg("method"), py::arg("dtype"), py::arg("data"), py::arg("offsets"),
          py::arg("width"), py::arg("scale"), py::arg("step"), py::arg("step_len"), py::arg("points"),
          py::arg("spacing"), py::arg("status"), py::arg("stream"),
          "Points [P, n] (dtype) and steps taken [P, n] f64; status int64[3] (code, datum, position).");
    m.def("difference_block", &block, py::arg("dtype"), py::arg("data"), py::arg("offsets"), py::arg("width"),
          py::arg("outs"), py::arg("capacity"), py::arg("points"), py::arg("points_stride"), py::arg("npoints"),
          py::arg("q_begin"), py::arg("count"), py::arg("full"), py::arg("prev_begin"), py::arg("prev_count"),
          py::arg("stream"), "Writes a block of one-element perturbations into per-datum [capacity, ...] buffers.");
    m.def("difference_quotients", &quotients, py::arg("method"), py::arg("n"), py::arg("spacing"), py::arg("f"),
          py::arg("f_stride_e"), py::arg("f_stride_k"), py::arg("f0"), py::arg("f0_stride"), py::arg("loss_eps"),
          py::arg("grad"), py::arg("error"), py::arg("stream"), "Gradient and error bound [n] f64 from loss values.");
    m.def("random_block", &random_block, py::arg("dtype"), py::arg("data"), py::arg("offsets"), py::arg("width"),
          py::arg("scale"), py::arg("kind"), py::arg("seed"), py::arg("index_offset"), py::arg("antithetic"),
          py::arg("outs"), py::arg("capacity"), py::arg("q_begin"), py::arg("count"), py::arg("stream"),
          "Writes x +- scale * u_s rows (directions regenerated from the seed) into per-datum buffers.");
    m.def("random_estimate", &estimate, py::arg("kind"), py::arg("seed"), py::arg("n"), py::arg("index_offset"),
          py::arg("scale"), py::arg("f"), py::arg("samples"), py::arg("antithetic"), py::arg("f0"), py::arg("grad"),
          py::arg("variance"), py::arg("stream"), "Randomized gradient estimate [n] f64 and the variance of its mean.");
    m.def("random_directions", &directions, py::arg("kind"), py::arg("seed"), py::arg("sample"),
          py::arg("index_begin"), py::arg("count"), py::arg("out"), py::arg("stream"),
          "Components index_begin.. of random direction `sample` into out [count] f64.");
}
