#include "common.hpp"

#include <pybind11/stl.h>

#include <limits>

#include "regrad/ragged.hpp"

namespace regrad::bindings {

RaggedArrays ragged_from_list(const py::sequence& arrays, const char* what) {
    RaggedArrays out;
    const auto n = static_cast<int64_t>(py::len(arrays));
    out.data.reserve(static_cast<size_t>(n));
    out.offsets.reserve(static_cast<size_t>(n + 1));
    out.keep_alive.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        py::object item = arrays[static_cast<size_t>(i)];
        if (!py::isinstance<py::array>(item)) {
            throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a numpy array");
        }
        auto a = py::reinterpret_borrow<py::array>(item);
        const bool f32 = has_dtype<float>(a);
        const bool f64 = has_dtype<double>(a);
        if (!f32 && !f64) {
            throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] has dtype " +
                                 std::string(py::str(a.dtype())) + "; expected float32 or float64");
        }
        if (i == 0) {
            out.dtype = a.dtype();
            out.is_double = f64;
            out.ndim = static_cast<int>(a.ndim());
        } else if (f64 != out.is_double) {
            throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] has dtype " +
                                 std::string(py::str(a.dtype())) + " but datum 0 has " +
                                 std::string(py::str(out.dtype)) + "; all data must share one dtype");
        }
        if (a.ndim() != 1 && a.ndim() != 2) {
            throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] has " + std::to_string(a.ndim()) +
                                  " dimensions; expected [T] or [T, K]");
        }
        if (a.ndim() != out.ndim) {
            throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] is " + std::to_string(a.ndim()) +
                                  "-D but datum 0 is " + std::to_string(out.ndim) + "-D");
        }
        if (a.ndim() == 2) {
            const int64_t k = a.shape(1);
            if (i == 0) out.width = k;
            if (k != out.width || k < 1) {
                throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] has shape [" +
                                      std::to_string(a.shape(0)) + ", " + std::to_string(k) + "]; expected K = " +
                                      std::to_string(out.width) + " like datum 0");
            }
        }
        if (!(a.flags() & py::array::c_style)) {
            throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] is not C-contiguous");
        }
        if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {  // the core reads whole T, never bytes
            throw py::value_error(std::string(what) + "[" + std::to_string(i) +
                                  "] is not aligned to its dtype (copy it: np.require(a, requirements='CA'))");
        }
        out.data.push_back(a.size() > 0 ? a.data() : nullptr);
        out.offsets.push_back(out.offsets.back() + static_cast<int64_t>(a.size()));
        out.keep_alive.push_back(std::move(a));
    }
    if (n == 0) out.dtype = py::dtype::of<double>();
    return out;
}

RaggedArrays ragged_from_addresses(const py::tuple& spec, const char* what) {
    const auto addresses = spec[0].cast<std::vector<uintptr_t>>();
    const auto sizes = spec[1].cast<std::vector<int64_t>>();
    const auto width = spec[2].cast<int64_t>();
    const auto dtype = spec[3].cast<std::string>();
    if (dtype != "float32" && dtype != "float64") throw py::type_error(std::string(what) + ": dtype " + dtype);
    if (addresses.size() != sizes.size()) throw py::value_error(std::string(what) + ": addresses and sizes differ in length");
    if (width < 1) throw py::value_error(std::string(what) + ": width must be >= 1");
    RaggedArrays out;
    out.is_double = dtype == "float64";
    out.dtype = out.is_double ? py::dtype::of<double>() : py::dtype::of<float>();
    out.width = width;
    out.ndim = width > 1 ? 2 : 1;
    out.data.reserve(addresses.size());
    out.offsets.reserve(addresses.size() + 1);
    for (size_t i = 0; i < addresses.size(); ++i) {
        if (sizes[i] < 0 || sizes[i] % width != 0) {
            throw py::value_error(std::string(what) + "[" + std::to_string(i) + "]: size " + std::to_string(sizes[i]) +
                                  " is not a multiple of the width " + std::to_string(width));
        }
        if (sizes[i] > std::numeric_limits<int64_t>::max() - out.offsets.back()) {
            throw py::value_error(std::string(what) + "[" + std::to_string(i) + "]: size " + std::to_string(sizes[i]) +
                                  " takes the batch past 2**63 - 1 elements");
        }
        if (sizes[i] > 0 && addresses[i] == 0) throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] has no data");
        if (sizes[i] > 0 && addresses[i] % (out.is_double ? sizeof(double) : sizeof(float)) != 0) {
            throw py::value_error(std::string(what) + "[" + std::to_string(i) + "] is not aligned to its dtype");
        }
        out.data.push_back(sizes[i] > 0 ? reinterpret_cast<const void*>(addresses[i]) : nullptr);
        out.offsets.push_back(out.offsets.back() + sizes[i]);
    }
    return out;
}

RaggedArrays ragged_from(const py::object& arrays, const char* what) {
    if (py::isinstance<py::tuple>(arrays) && py::len(arrays) == 4) {
        auto spec = py::reinterpret_borrow<py::tuple>(arrays);
        if (py::isinstance<py::list>(spec[0]) && py::isinstance<py::str>(spec[3])) return ragged_from_addresses(spec, what);
    }
    return ragged_from_list(arrays, what);
}

namespace {
PYBIND11_CONSTINIT py::gil_safe_call_once_and_store<py::object> non_finite_type;
}

void register_errors(py::module_& m) {
    non_finite_type.call_once_and_store_result([&]() {
        return py::reinterpret_steal<py::object>(
            PyErr_NewExceptionWithDoc("regrad._core.NonFiniteError",
                                      "A NaN or infinity in the input; .datum and .position say where.",
                                      PyExc_ValueError, nullptr));
    });
    m.attr("NonFiniteError") = non_finite_type.get_stored();
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const regrad::NonFiniteError& e) {
            py::object type = non_finite_type.get_stored();
            py::object inst = type(e.what());
            inst.attr("datum") = e.datum();
            inst.attr("position") = e.position();
            PyErr_SetObject(type.ptr(), inst.ptr());
        }
    });
}

}  // namespace regrad::bindings
