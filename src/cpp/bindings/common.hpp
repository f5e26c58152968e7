// Helpers shared by the binding files: turning numpy arrays into core views, with checks.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

namespace regrad::bindings {

namespace py = pybind11;

/// True when the array's dtype is T's (by equivalence, not identity: unpickled dtypes are new objects).
template <class T>
bool has_dtype(const py::array& a) {
    return py::isinstance<py::array_t<T>>(a);
}

/// A list of per-datum arrays seen as a ragged batch: pointers into the caller's memory, no copies.
struct RaggedArrays {
    std::vector<const void*> data;
    std::vector<int64_t> offsets{0};
    int64_t width = 1;
    int ndim = 0;            ///< 1 for [T] data, 2 for [T, K]
    py::dtype dtype;
    bool is_double = false;
    std::vector<py::array> keep_alive;
};

/// Checks every array (float32/float64, one dtype, C-contiguous, aligned, all 1-D or all [T, K] with one K)
/// and names the first datum that breaks a rule.
RaggedArrays ragged_from_list(const py::sequence& arrays, const char* what);

/// A batch given by addresses instead of arrays: (addresses, sizes, width, "float32" | "float64"), from
/// contiguous CPU torch tensors of one dtype that the caller has checked and keeps alive for the call
/// (a numpy view of each costs ~1 us; its address ~0.05 us).
RaggedArrays ragged_from_addresses(const py::tuple& spec, const char* what);

/// ragged_from_addresses for such a 4-tuple (a list of ints first), else ragged_from_list.
RaggedArrays ragged_from(const py::object& arrays, const char* what);

/// Registers regrad.NonFiniteError (a ValueError with .datum and .position) and its translator.
void register_errors(py::module_& m);

}  // namespace regrad::bindings
