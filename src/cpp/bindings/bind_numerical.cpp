// Thin bindings of the finite-difference engine and its RNG: check sizes, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "parse.hpp"
#include "common.hpp"
#include "regrad/numerical.hpp"
#include "regrad/rng.hpp"

namespace py = pybind11;

namespace regrad::bindings {

namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

/// Whether (count - 1) * stride + offset < size, for count >= 1 and stride, offset >= 0, without
/// int64 overflow (a product past int64 would wrap negative and pass a plain `<` test).
bool index_within(int64_t count, int64_t stride, int64_t offset, int64_t size) {
    if (offset >= size) return false;
    return count <= 1 || stride <= (size - 1 - offset) / (count - 1);
}

/// Whether elements [offset, offset + size) lie within [0, n), without int64 overflow.
bool span_within(int64_t offset, int64_t size, int64_t n) { return offset >= 0 && size <= n && offset <= n - size; }

/// offset + size for a message (both >= 0: their sum fits uint64).
std::string span_end(int64_t offset, int64_t size) {
    return std::to_string(static_cast<uint64_t>(offset) + static_cast<uint64_t>(size));
}

/// Typed pointer view of checked arrays; `ptrs` must outlive the batch.
template <class T>
RaggedBatch<T> typed_batch(const RaggedArrays& ragged, std::vector<const T*>& ptrs) {
    ptrs.resize(ragged.data.size());
    for (size_t i = 0; i < ptrs.size(); ++i) ptrs[i] = static_cast<const T*>(ragged.data[i]);
    return RaggedBatch<T>{ptrs.data(), ragged.offsets.data(), static_cast<int64_t>(ptrs.size()), ragged.width};
}

/// Checks the output buffers (one per datum: writable, same dtype, C-contiguous, `rows` x datum size).
template <class T>
std::vector<T*> block_buffers(const py::sequence& outs, const RaggedArrays& ragged, int64_t& rows) {
    const auto b = static_cast<int64_t>(ragged.data.size());
    if (static_cast<int64_t>(py::len(outs)) != b) {
        throw py::value_error("got " + std::to_string(py::len(outs)) + " output buffers for " + std::to_string(b) +
                              " data");
    }
    std::vector<T*> ptrs(static_cast<size_t>(b));
    rows = -1;
    for (int64_t j = 0; j < b; ++j) {
        py::object item = outs[static_cast<size_t>(j)];
        if (!py::isinstance<py::array>(item)) throw py::type_error("output buffer " + std::to_string(j) + " is not a numpy array");
        auto a = py::reinterpret_borrow<py::array>(item);
        if (!has_dtype<T>(a)) {
            throw py::type_error("output buffer " + std::to_string(j) + " has dtype " + std::string(py::str(a.dtype())) +
                                 " but the log-probs have " + std::string(py::str(ragged.dtype)));
        }
        if (!(a.flags() & py::array::c_style) || !a.writeable()) {
            throw py::value_error("output buffer " + std::to_string(j) + " must be C-contiguous and writable");
        }
        if (a.ndim() < 1) throw py::value_error("output buffer " + std::to_string(j) + " has no row dimension");
        const int64_t r = a.shape(0);
        if (rows < 0) rows = r;
        const int64_t len = ragged.offsets[j + 1] - ragged.offsets[j];
        // r rows of len by division, not r * len: the product wraps past int64 (a [2**59, 0] buffer of a
        // 32-element datum read as 0 == 0 elements, and the core wrote rows the buffer does not have)
        const bool holds = len == 0 ? a.size() == 0 : a.size() % len == 0 && a.size() / len == r;
        if (r != rows || !holds) {
            throw py::value_error("output buffer " + std::to_string(j) + " has " + std::to_string(a.size()) +
                                  " elements; expected " + std::to_string(rows) + " rows of " + std::to_string(len));
        }
        ptrs[static_cast<size_t>(j)] = static_cast<T*>(a.mutable_data());
    }
    if (rows < 0) rows = 0;
    return ptrs;
}

/// The caller's buffer for the points (checked: the log-probs' dtype, C-contiguous, writable, `size`
/// elements), or a fresh array of `shape`.
template <class T>
py::array_t<T> points_buffer(const std::optional<py::array>& out, const std::vector<int64_t>& shape, int64_t size) {
    if (!out) return py::array_t<T>(shape);
    const py::array& a = *out;
    if (!has_dtype<T>(a)) throw py::type_error("out must have the log-probs' dtype");
    if (!(a.flags() & py::array::c_style) || !a.writeable()) throw py::value_error("out must be C-contiguous and writable");
    if (a.size() != size) {
        throw py::value_error("out has " + std::to_string(a.size()) + " elements; the points need " + std::to_string(size));
    }
    return py::reinterpret_borrow<py::array_t<T>>(a);
}

template <class T>
py::tuple points_impl(const RaggedArrays& ragged, DifferenceMethod method, double scale,
                      const std::optional<DoubleArray>& step, bool with_spacing, bool stacked,
                      const std::optional<py::array>& out) {
    std::vector<const T*> ptrs;
    const RaggedBatch<T> batch = typed_batch<T>(ragged, ptrs);
    const int64_t n = ragged.offsets.back();
    const int np = points_per_element(method);
    if (stacked && with_spacing) throw py::value_error("the stacked point layout has no spacing array");
    const int64_t rows = stacked ? static_cast<int64_t>(stacked_rows(method)) : static_cast<int64_t>(np);
    if (n > std::numeric_limits<int64_t>::max() / rows) {
        throw py::value_error("the points of " + std::to_string(n) + " log-probs (" + std::to_string(rows) +
                              " rows) exceed 2**63 - 1 elements");
    }
    py::array_t<T> points = stacked ? points_buffer<T>(out, {rows * n}, rows * n) : points_buffer<T>(out, {rows, n}, rows * n);
    py::object spacing = py::none();
    double* d = nullptr;
    if (with_spacing) {
        py::array_t<double> s_array({static_cast<int64_t>(np), n});
        d = s_array.mutable_data();
        spacing = std::move(s_array);
    }
    const double* s = step ? step->data() : nullptr;
    const int64_t s_len = step ? step->size() : 0;
    T* p = points.mutable_data();
    {
        py::gil_scoped_release release;
        difference_points<T>(batch, method, scale, s, s_len, p, d, stacked ? PointLayout::Stacked : PointLayout::Rows);
    }
    return py::make_tuple(points, spacing);
}

/// difference_points(arrays, method, scale, step, with_spacing, stacked, out) -> (points [P, n] in the dtype,
/// arrays: numpy arrays or an address tuple (ragged_from),
/// or flat [R * n] in the stacked layout, written into `out` when given; spacing [P, n] float64 or None)
py::tuple points(const py::object& arrays, const std::string& method, double scale, std::optional<DoubleArray> step,
                 bool with_spacing, bool stacked, std::optional<py::array> out) {
    const DifferenceMethod m = parse_method(method);
    RaggedArrays ragged = ragged_from(arrays, "logprobs_list");
    if (ragged.is_double) return points_impl<double>(ragged, m, scale, step, with_spacing, stacked, out);
    return points_impl<float>(ragged, m, scale, step, with_spacing, stacked, out);
}

template <class T>
void block_impl(const RaggedArrays& ragged, const py::sequence& outs, const py::array& points, int64_t element_offset,
                int npoints, int64_t q_begin, int64_t count, bool full, int64_t prev_begin, int64_t prev_count) {
    std::vector<const T*> ptrs;
    const RaggedBatch<T> batch = typed_batch<T>(ragged, ptrs);
    int64_t rows = 0;
    std::vector<T*> out = block_buffers<T>(outs, ragged, rows);
    if (!has_dtype<T>(points) || points.ndim() != 2 || !(points.flags() & py::array::c_style)) {
        throw py::type_error("points must be a C-contiguous [P, n] array of the log-probs' dtype");
    }
    const int64_t stride = points.shape(1);
    if (points.shape(0) != npoints || !span_within(element_offset, batch.size(), stride)) {
        throw py::value_error("points has shape [" + std::to_string(points.shape(0)) + ", " + std::to_string(stride) +
                              "] but the block needs " + std::to_string(npoints) + " points for elements [" +
                              std::to_string(element_offset) + ", " + span_end(element_offset, batch.size()) + ")");
    }
    const T* p = static_cast<const T*>(points.data()) + element_offset;
    py::gil_scoped_release release;
    write_difference_block<T>(batch, out.data(), rows, p, stride, npoints, q_begin, count, full, prev_begin, prev_count);
}

void block(const py::sequence& arrays, const py::sequence& outs, const py::array& points, int64_t element_offset,
           int npoints, int64_t q_begin, int64_t count, bool full, int64_t prev_begin, int64_t prev_count) {
    RaggedArrays ragged = ragged_from_list(arrays, "logprobs_list");
    if (ragged.is_double) {
        block_impl<double>(ragged, outs, points, element_offset, npoints, q_begin, count, full, prev_begin, prev_count);
    } else {
        block_impl<float>(ragged, outs, points, element_offset, npoints, q_begin, count, full, prev_begin, prev_count);
    }
}

/// diagonal(buffer [rows, *shape], points [P, n], element_offset, npoints): row r of one datum's
/// buffer (already x in every row) gets element r / P set to its point k = r % P.
template <class T>
void diagonal_impl(py::array& buffer, const py::array& points, int64_t element_offset, int npoints) {
    if (!has_dtype<T>(points) || points.ndim() != 2 || !(points.flags() & py::array::c_style)) {
        throw py::type_error("points must be a C-contiguous [P, n] array of the buffer's dtype");
    }
    if (buffer.ndim() < 1 || !(buffer.flags() & py::array::c_style) || !buffer.writeable()) {
        throw py::value_error("buffer must be a writable C-contiguous [rows, ...] array");
    }
    const int64_t rows = buffer.shape(0);
    const int64_t size = rows > 0 ? buffer.size() / rows : 0;
    const int64_t n = points.shape(1);
    if (points.shape(0) != npoints || !span_within(element_offset, size, n)) {
        throw py::value_error("points has shape [" + std::to_string(points.shape(0)) + ", " + std::to_string(n) +
                              "] but the datum needs " + std::to_string(npoints) + " points for elements [" +
                              std::to_string(element_offset) + ", " + span_end(element_offset, size) + ")");
    }
    T* out = static_cast<T*>(buffer.mutable_data());
    const T* p = static_cast<const T*>(points.data()) + element_offset;
    py::gil_scoped_release release;
    write_difference_diagonal<T>(out, size, rows, p, n, npoints);
}

void diagonal(py::array buffer, const py::array& points, int64_t element_offset, int npoints) {
    if (has_dtype<double>(buffer)) return diagonal_impl<double>(buffer, points, element_offset, npoints);
    if (has_dtype<float>(buffer)) return diagonal_impl<float>(buffer, points, element_offset, npoints);
    throw py::type_error("buffer must be float32 or float64");
}

/// quotients(method, spacing [P, n], f, f_stride_e, f_stride_k, f0, f0_stride, loss_eps) -> (grad, error) float64 [n]
py::object quotients(const std::string& method, const DoubleArray& spacing, const DoubleArray& f, int64_t f_stride_e,
                     int64_t f_stride_k, std::optional<DoubleArray> f0, int64_t f0_stride, double loss_eps,
                     bool packed) {
    const DifferenceMethod m = parse_method(method);
    const int np = points_per_element(m);
    if (spacing.ndim() != 2 || spacing.shape(0) != np) {
        throw py::value_error("spacing must be [" + std::to_string(np) + ", n] for method " + method);
    }
    const int64_t n = spacing.shape(1);
    if (f_stride_e < 0 || f_stride_k < 0 || f0_stride < 0) throw py::value_error("strides must be >= 0");
    if (n > 0) {
        // the last index read, (n - 1) * f_stride_e + (np - 1) * f_stride_k, checked without overflow
        if (!index_within(np, f_stride_k, 0, f.size()) ||
            !index_within(n, f_stride_e, (np - 1) * f_stride_k, f.size())) {
            throw py::value_error("loss values: " + std::to_string(f.size()) + " given; strides f_stride_e=" +
                                  std::to_string(f_stride_e) + " and f_stride_k=" + std::to_string(f_stride_k) +
                                  " read past them for " + std::to_string(n) + " elements of " + std::to_string(np) +
                                  " points");
        }
        if (m == DifferenceMethod::Forward) {
            if (!f0) throw py::value_error("forward differences need f0, the loss at x");
            if (!index_within(n, f0_stride, 0, f0->size())) throw py::value_error("f0 is too short");
        }
    }
    // packed: one [2n] array, the gradient then the error (split once by the caller).
    py::array_t<double> grad(packed ? 2 * n : n);
    py::array_t<double> error(packed ? 0 : n);
    const double* f0p = f0 ? f0->data() : nullptr;
    const double* sp = spacing.data();
    const double* fp = f.data();
    double* g = grad.mutable_data();
    double* err = packed ? g + n : error.mutable_data();
    {
        py::gil_scoped_release release;
        difference_quotients(m, n, sp, fp, f_stride_e, f_stride_k, f0p, f0_stride, loss_eps, g, err);
    }
    if (packed) return std::move(grad);
    return py::make_tuple(grad, error);
}

/// Loss values as the core reads them: for each call (or row) k, one pointer per datum and the offsets.
struct LossValues {
    std::vector<std::vector<const void*>> data;
    std::vector<std::vector<int64_t>> offsets;
    bool is_double = false;
    std::vector<RaggedArrays> keep_alive;
};

/// values: one list of per-datum arrays per call (each shaped like the log-probs).
LossValues values_per_call(const py::sequence& values, int nf) {
    LossValues v;
    for (int k = 0; k < nf; ++k) {
        v.keep_alive.push_back(ragged_from_list(values[static_cast<size_t>(k)], "loss values"));
        const RaggedArrays& r = v.keep_alive.back();
        if (r.is_double != v.keep_alive.front().is_double) {
            throw py::type_error("loss values: every call's values must share one dtype");
        }
        v.data.push_back(r.data);
        v.offsets.push_back(r.offsets);
    }
    v.is_double = v.keep_alive.front().is_double;
    return v;
}

/// values: one array per datum holding its R stacked rows (any shape of R * len_j elements).
LossValues values_stacked(const py::sequence& values, const RaggedArrays& x, int nf) {
    const auto b = static_cast<int64_t>(x.data.size());
    if (static_cast<int64_t>(py::len(values)) != b) {
        throw py::value_error("got " + std::to_string(py::len(values)) + " loss arrays for " + std::to_string(b) + " data");
    }
    LossValues v;
    v.data.assign(static_cast<size_t>(nf), std::vector<const void*>(static_cast<size_t>(b), nullptr));
    v.offsets.assign(static_cast<size_t>(nf), x.offsets);
    RaggedArrays keep;
    for (int64_t j = 0; j < b; ++j) {
        py::object item = values[static_cast<size_t>(j)];
        const std::string name = "loss values[" + std::to_string(j) + "]";
        if (!py::isinstance<py::array>(item)) throw py::type_error(name + " is not a numpy array");
        auto a = py::reinterpret_borrow<py::array>(item);
        const bool f64 = has_dtype<double>(a);
        if (!f64 && !has_dtype<float>(a)) throw py::type_error(name + " has dtype " + std::string(py::str(a.dtype())));
        if (j == 0) v.is_double = f64;
        if (f64 != v.is_double) throw py::type_error(name + ": every datum's values must share one dtype");
        if (!(a.flags() & py::array::c_style)) throw py::value_error(name + " is not C-contiguous");
        if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {  // the core reads whole T, never bytes
            throw py::value_error(name + " is not aligned to its dtype");
        }
        const int64_t len = x.offsets[static_cast<size_t>(j) + 1] - x.offsets[static_cast<size_t>(j)];
        if (a.size() != nf * len) {
            throw py::value_error(name + " has " + std::to_string(a.size()) + " elements; expected " + std::to_string(nf) +
                                  " rows of " + std::to_string(len));
        }
        const char* base = static_cast<const char*>(a.data());
        for (int k = 0; k < nf && len > 0; ++k) {
            v.data[static_cast<size_t>(k)][static_cast<size_t>(j)] = base + k * len * static_cast<int64_t>(a.itemsize());
        }
        keep.keep_alive.push_back(std::move(a));
    }
    v.keep_alive.push_back(std::move(keep));
    return v;
}

/// values: (addresses, "float32" | "float64"), one address per datum of R * len_j contiguous values
/// (CPU torch tensors' data_ptr(); the caller has checked their dtype, shape and contiguity and
/// keeps them alive for the call).
LossValues values_addresses(const py::tuple& values, const RaggedArrays& x, int nf) {
    const auto b = static_cast<int64_t>(x.data.size());
    const auto addresses = values[0].cast<std::vector<uintptr_t>>();
    const auto dtype = values[1].cast<std::string>();
    if (dtype != "float32" && dtype != "float64") throw py::type_error("loss values: dtype " + dtype);
    if (static_cast<int64_t>(addresses.size()) != b) {
        throw py::value_error("got " + std::to_string(addresses.size()) + " loss addresses for " + std::to_string(b) +
                              " data");
    }
    LossValues v;
    v.is_double = dtype == "float64";
    const int64_t itemsize = v.is_double ? 8 : 4;
    v.data.assign(static_cast<size_t>(nf), std::vector<const void*>(static_cast<size_t>(b), nullptr));
    v.offsets.assign(static_cast<size_t>(nf), x.offsets);
    for (int64_t j = 0; j < b; ++j) {
        const int64_t len = x.offsets[static_cast<size_t>(j) + 1] - x.offsets[static_cast<size_t>(j)];
        const auto* base = reinterpret_cast<const char*>(addresses[static_cast<size_t>(j)]);
        if (len > 0 && base == nullptr) throw py::value_error("loss values[" + std::to_string(j) + "] has no data");
        if (len > 0 && addresses[static_cast<size_t>(j)] % static_cast<uintptr_t>(itemsize) != 0) {
            throw py::value_error("loss values[" + std::to_string(j) + "] is not aligned to its dtype");
        }
        for (int k = 0; k < nf && len > 0; ++k) v.data[static_cast<size_t>(k)][static_cast<size_t>(j)] = base + k * len * itemsize;
    }
    return v;
}

template <class T, class F>
py::tuple token_impl(DifferenceMethod method, const RaggedArrays& ragged, const py::array& points, bool stacked,
                     const LossValues& values, double loss_eps) {
    std::vector<const T*> x_ptrs;
    const RaggedBatch<T> x = typed_batch<T>(ragged, x_ptrs);
    const int64_t n = x.size();
    const int np = points_per_element(method);
    const int64_t rows = stacked ? stacked_rows(method) : np;
    const bool shape_ok = stacked ? points.ndim() == 1 && points.shape(0) == rows * n
                                  : points.ndim() == 2 && points.shape(0) == rows && points.shape(1) == n;
    if (!has_dtype<T>(points) || !(points.flags() & py::array::c_style) || !shape_ok) {
        throw py::value_error(std::string("points must be a C-contiguous ") +
                              (stacked ? "[" + std::to_string(rows * n) + "] (stacked)" :
                                         "[" + std::to_string(rows) + ", " + std::to_string(n) + "]") +
                              " array of the log-probs' dtype");
    }
    const size_t nf = values.data.size();
    std::vector<std::vector<const F*>> ptrs(nf);
    std::vector<RaggedBatch<F>> f;
    f.reserve(nf);
    for (size_t k = 0; k < nf; ++k) {
        ptrs[k].resize(values.data[k].size());
        for (size_t j = 0; j < ptrs[k].size(); ++j) ptrs[k][j] = static_cast<const F*>(values.data[k][j]);
        f.push_back(RaggedBatch<F>{ptrs[k].data(), values.offsets[k].data(), static_cast<int64_t>(ptrs[k].size()),
                                   ragged.width});
    }
    const RaggedBatch<F>* f0 = method == DifferenceMethod::Forward ? &f[static_cast<size_t>(np)] : nullptr;
    py::array_t<T> both(2 * n);  // gradient, then error: one buffer, so the caller splits once
    const T* p = static_cast<const T*>(points.data());
    T* g = both.mutable_data();
    int64_t bad = -1;
    {
        py::gil_scoped_release release;
        bad = token_quotients<T, F>(method, x, p, stacked ? PointLayout::Stacked : PointLayout::Rows, f.data(), f0,
                                    loss_eps, g, g + n);
    }
    return py::make_tuple(both, bad);
}

/// token_quotients(method, arrays, points, values, loss_eps, stacked) -> (grad and error as one [2n]
/// array in the log-probs' dtype, first non-finite index k * n + e, -2 - e for a gradient overflowing double, or -1). values: P lists of per-datum loss
/// arrays (plus the values at x for forward), all float32 or all float64; stacked: one array per
/// datum holding all its rows (or their addresses, see values_addresses), with points in the stacked layout.
py::tuple token(const std::string& method, const py::object& arrays, const py::array& points,
                const py::sequence& values, double loss_eps, bool stacked) {
    const DifferenceMethod m = parse_method(method);
    const int nf = stacked_rows(m);
    RaggedArrays ragged = ragged_from(arrays, "logprobs_list");
    if (!stacked && static_cast<int>(py::len(values)) != nf) {
        throw py::value_error("got " + std::to_string(py::len(values)) + " lists of loss values; method " + method +
                              " needs " + std::to_string(nf));
    }
    LossValues f;
    if (!stacked) {
        f = values_per_call(values, nf);
    } else if (py::isinstance<py::tuple>(values) && py::len(values) == 2 && py::isinstance<py::list>(values[0])) {
        f = values_addresses(py::reinterpret_borrow<py::tuple>(values), ragged, nf);
    } else {
        f = values_stacked(values, ragged, nf);
    }
    const bool f64 = f.is_double;
    if (ragged.is_double) {
        return f64 ? token_impl<double, double>(m, ragged, points, stacked, f, loss_eps)
                   : token_impl<double, float>(m, ragged, points, stacked, f, loss_eps);
    }
    return f64 ? token_impl<float, double>(m, ragged, points, stacked, f, loss_eps)
               : token_impl<float, float>(m, ragged, points, stacked, f, loss_eps);
}

template <class T>
void random_block_impl(const RaggedArrays& ragged, const DoubleArray& scale, Direction kind, uint64_t seed,
                       int64_t index_offset, bool antithetic, const py::sequence& outs, int64_t q_begin, int64_t count) {
    std::vector<const T*> ptrs;
    const RaggedBatch<T> batch = typed_batch<T>(ragged, ptrs);
    int64_t rows = 0;
    std::vector<T*> out = block_buffers<T>(outs, ragged, rows);
    if (scale.size() != batch.size()) {
        throw py::value_error("scale has " + std::to_string(scale.size()) + " entries for " +
                              std::to_string(batch.size()) + " log-probs");
    }
    const double* s = scale.data();
    py::gil_scoped_release release;
    write_random_block<T>(batch, s, kind, seed, index_offset, antithetic, out.data(), rows, q_begin, count);
}

void random_block(const py::sequence& arrays, const DoubleArray& scale, const std::string& kind, uint64_t seed,
                  int64_t index_offset, bool antithetic, const py::sequence& outs, int64_t q_begin, int64_t count) {
    const Direction d = parse_direction(kind);
    RaggedArrays ragged = ragged_from_list(arrays, "logprobs_list");
    if (ragged.is_double) {
        random_block_impl<double>(ragged, scale, d, seed, index_offset, antithetic, outs, q_begin, count);
    } else {
        random_block_impl<float>(ragged, scale, d, seed, index_offset, antithetic, outs, q_begin, count);
    }
}

/// random_estimate(kind, seed, scale [n], index_offset, f, antithetic, f0) -> (grad, variance) float64 [n]
py::tuple estimate(const std::string& kind, uint64_t seed, const DoubleArray& scale, int64_t index_offset,
                   const DoubleArray& f, bool antithetic, double f0) {
    const Direction d = parse_direction(kind);
    const int64_t n = scale.size();
    const int64_t per_sample = antithetic ? 2 : 1;
    if (f.size() == 0 || f.size() % per_sample != 0) {
        throw py::value_error("loss values: " + std::to_string(f.size()) + " given; expected a positive multiple of " +
                              std::to_string(per_sample));
    }
    if (index_offset < 0) throw py::value_error("index_offset must be >= 0");
    py::array_t<double> grad(n);
    py::array_t<double> variance(n);
    const double* s = scale.data();
    const double* fp = f.data();
    double* g = grad.mutable_data();
    double* v = variance.mutable_data();
    const int64_t samples = f.size() / per_sample;
    {
        py::gil_scoped_release release;
        random_estimate(d, seed, n, index_offset, s, fp, samples, antithetic, f0, g, v);
    }
    return py::make_tuple(grad, variance);
}

/// random_directions(kind, seed, sample, index_begin, count) -> float64 [count]
py::array_t<double> directions(const std::string& kind, uint64_t seed, uint64_t sample, uint64_t index_begin,
                               int64_t count) {
    const Direction d = parse_direction(kind);
    if (count < 0) throw py::value_error("count must be >= 0");
    py::array_t<double> out(count);
    double* o = out.mutable_data();
    for (int64_t i = 0; i < count; ++i) o[i] = random_direction(d, seed, sample, index_begin + static_cast<uint64_t>(i));
    return out;
}

}  // namespace

void register_numerical(py::module_& m) {
    m.def("difference_step_scale", [](const std::string& method, const std::string& dtype) {
        const DifferenceMethod dm = parse_method(method);
        if (dtype == "float32") return default_step_scale<float>(dm);
        if (dtype == "float64") return default_step_scale<double>(dm);
        throw py::value_error("dtype must be float32 or float64, got " + dtype);
    }, py::arg("method"), py::arg("dtype"), "Relative step c of h = c * max(1, |x|) for a method and working dtype.");
    m.def("difference_points", &points, py::arg("arrays"), py::arg("method"), py::arg("scale"),
          py::arg("step") = py::none(), py::arg("with_spacing") = true, py::arg("stacked") = false,
          py::arg("out") = py::none(),
          "Perturbed values [P, n] (input dtype; stacked: each datum's rows as one block; into `out` when given) "
          "and the steps taken.");
    m.def("difference_block", &block, py::arg("arrays"), py::arg("outs"), py::arg("points"), py::arg("element_offset"),
          py::arg("npoints"), py::arg("q_begin"), py::arg("count"), py::arg("full"), py::arg("prev_begin") = 0,
          py::arg("prev_count") = 0,
          "Writes a block of one-element perturbations into per-datum [rows, ...] buffers (in place).");
    m.def("difference_diagonal", &diagonal, py::arg("buffer"), py::arg("points"), py::arg("element_offset"),
          py::arg("npoints"), "One datum's perturbations into a buffer whose rows already hold x (in place).");
    m.def("difference_quotients", &quotients, py::arg("method"), py::arg("spacing"), py::arg("f"),
          py::arg("f_stride_e"), py::arg("f_stride_k"), py::arg("f0") = py::none(), py::arg("f0_stride") = 0,
          py::arg("loss_eps") = 0.0, py::arg("packed") = false,
          "Gradient and per-element error estimate from loss values at the points (packed: one [2n] array).");
    m.def("token_quotients", &token, py::arg("method"), py::arg("arrays"), py::arg("points"), py::arg("values"),
          py::arg("loss_eps") = 0.0, py::arg("stacked") = false,
          "Structure 'token': gradient and error estimate (input dtype) from per-datum loss values at the points.");
    m.def("random_block", &random_block, py::arg("arrays"), py::arg("scale"), py::arg("kind"), py::arg("seed"),
          py::arg("index_offset"), py::arg("antithetic"), py::arg("outs"), py::arg("q_begin"), py::arg("count"),
          "Writes x +- scale * u_s rows (random directions regenerated from the seed) into per-datum buffers.");
    m.def("random_estimate", &estimate, py::arg("kind"), py::arg("seed"), py::arg("scale"), py::arg("index_offset"),
          py::arg("f"), py::arg("antithetic"), py::arg("f0") = 0.0,
          "Randomized gradient estimate (mean over samples) and the variance of that mean.");
    m.def("random_directions", &directions, py::arg("kind"), py::arg("seed"), py::arg("sample"),
          py::arg("index_begin"), py::arg("count"), "Components of random direction `sample` (for tests and inspection).");
    m.def("philox4x32", [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) { return philox4x32(counter, key); },
          py::arg("counter"), py::arg("key"), "The Philox4x32-10 block function (known-answer tests).");
}

}  // namespace regrad::bindings
