// Parsing the string options every binding takes into core enums; errors become Python ValueErrors.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "regrad/kernels.hpp"
#include "regrad/numerical.hpp"
#include "regrad/rng.hpp"

namespace regrad::bindings {

inline Regularizer parse_kind(const std::string& kind) {
    if (kind == "l1") return Regularizer::L1;
    if (kind == "l2") return Regularizer::L2Squared;
    if (kind == "l2_norm") return Regularizer::L2Norm;
    if (kind == "entropy") return Regularizer::Entropy;
    throw pybind11::value_error("unknown regularizer kernel '" + kind + "'; expected l1, l2, l2_norm or entropy");
}

inline Reduction parse_reduction(const std::string& reduction) {
    if (reduction == "mean") return Reduction::Mean;
    if (reduction == "sum") return Reduction::Sum;
    throw pybind11::value_error("reduction must be 'mean' or 'sum', got '" + reduction + "'");
}

inline DifferenceMethod parse_method(const std::string& method) {
    if (method == "forward") return DifferenceMethod::Forward;
    if (method == "central") return DifferenceMethod::Central;
    if (method == "richardson") return DifferenceMethod::Richardson;
    throw pybind11::value_error("unknown difference method '" + method + "'; expected forward, central or richardson");
}

inline Direction parse_direction(const std::string& kind) {
    if (kind == "rademacher") return Direction::Rademacher;
    if (kind == "gaussian") return Direction::Gaussian;
    throw pybind11::value_error("unknown direction kind '" + kind + "'; expected rademacher or gaussian");
}

}  // namespace regrad::bindings
