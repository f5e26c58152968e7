// Thin bindings of the regularizer kernels: check arrays, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "parse.hpp"
#include "common.hpp"
#include "regrad/kernels.hpp"

namespace py = pybind11;

namespace regrad::bindings {

namespace {

template <class T>
py::tuple run(Regularizer kind, const RaggedArrays& ragged, const uint8_t* mask, Reduction reduction,
              bool with_grad) {
    const auto batch_size = static_cast<int64_t>(ragged.data.size());
    std::vector<const T*> ptrs(ragged.data.size());
    for (size_t i = 0; i < ptrs.size(); ++i) ptrs[i] = static_cast<const T*>(ragged.data[i]);
    RaggedBatch<T> batch{ptrs.data(), ragged.offsets.data(), batch_size, ragged.width};
    py::array_t<double> per_datum(batch_size);
    py::array_t<T> grad(with_grad ? ragged.offsets.back() : 0);
    double* pd = per_datum.mutable_data();
    T* g = with_grad ? grad.mutable_data() : nullptr;
    double value;
    {
        py::gil_scoped_release release;
        value = regularizer_value_and_grad<T>(kind, batch, mask, reduction, pd, g);
    }
    return py::make_tuple(value, per_datum, grad);
}

/// regularizer(kind, arrays, mask, reduction, with_grad) -> (value, per_datum float64[B], grad packed)
py::tuple regularizer(const std::string& kind, const py::sequence& arrays,
                      std::optional<py::array_t<uint8_t, py::array::c_style>> mask, const std::string& reduction,
                      bool with_grad) {
    const Regularizer k = parse_kind(kind);
    const Reduction r = parse_reduction(reduction);
    RaggedArrays ragged = ragged_from_list(arrays, "logprobs_list");
    const uint8_t* m = nullptr;
    if (mask) {
        const int64_t tokens = ragged.offsets.back() / ragged.width;
        if (mask->ndim() != 1 || mask->size() != tokens) {
            throw py::value_error("mask has " + std::to_string(mask->size()) + " entries but the batch has " +
                                  std::to_string(tokens) + " tokens");
        }
        m = mask->data();
    }
    if (ragged.is_double) return run<double>(k, ragged, m, r, with_grad);
    return run<float>(k, ragged, m, r, with_grad);
}

}  // namespace

void register_kernels(py::module_& m) {
    m.def("regularizer", &regularizer, py::arg("kind"), py::arg("arrays"), py::arg("mask") = py::none(),
          py::arg("reduction") = "mean", py::arg("with_grad") = true,
          "Fused value, per-datum values and packed gradient of a built-in regularizer over a ragged batch.");
}

}  // namespace regrad::bindings
