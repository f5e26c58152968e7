// The compiled core of regrad: this file only registers each area's bindings.
#include <pybind11/pybind11.h>

#include "regrad/kernels.hpp"

namespace py = pybind11;

namespace regrad::bindings {
void register_errors(py::module_& m);
void register_kernels(py::module_& m);
void register_numerical(py::module_& m);
}  // namespace regrad::bindings

#ifndef REGRAD_COMPILER
#define REGRAD_COMPILER "unknown"
#endif

PYBIND11_MODULE(_core, m) {
    m.doc() = "regrad's C++ core (private: use the regrad package)";
    regrad::bindings::register_errors(m);
    regrad::bindings::register_kernels(m);
    regrad::bindings::register_numerical(m);
    m.def("build_info", []() {
        py::dict info;
        info["version"] = REGRAD_VERSION;
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["max_threads"] = regrad::max_threads();
        info["compiler"] = REGRAD_COMPILER;
        info["simd"] = regrad::kernel_isa();
        return info;
    }, "What the core was built with: version, openmp, max_threads, compiler, simd.");
}
