// Ragged batches of log-probabilities as the core sees them: no Python types here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace regrad {

/// Datum i holds offsets[i+1]-offsets[i] elements, laid out as [T_i, width], starting at data[i].
/// The pointers need not be adjacent in memory, so contiguous per-datum inputs are never packed.
template <class T>
struct RaggedBatch {
    const T* const* data;    ///< one pointer per datum (may be null only for an empty datum)
    const int64_t* offsets;  ///< batch + 1 element offsets of the packed layout, offsets[0] == 0
    int64_t batch;           ///< number of data B
    int64_t width;           ///< row width K (1 for [T] data)

    int64_t size() const { return offsets[batch]; }
    int64_t length(int64_t i) const { return offsets[i + 1] - offsets[i]; }
};

/// A non-finite value (NaN or +-inf) met while reading input; says where.
class NonFiniteError : public std::runtime_error {
public:
    NonFiniteError(const std::string& what, int64_t datum, int64_t position)
        : std::runtime_error(what), datum_(datum), position_(position) {}
    int64_t datum() const { return datum_; }
    int64_t position() const { return position_; }

private:
    int64_t datum_;
    int64_t position_;
};

/// Loops over fewer elements than this run on the calling thread. Below it a parallel region costs
/// more than it saves, and it contends with torch's own OpenMP pool when torch ops run in between
/// (torch wheels bundle a second OpenMP runtime whose threads spin after each op).
constexpr int64_t kParallelMinElements = int64_t(1) << 20;

/// Throws std::invalid_argument unless offsets start at 0, never decrease and stay multiples of width.
void check_offsets(const int64_t* offsets, int64_t batch, int64_t width);

/// check_offsets, and that every non-empty datum has a data pointer.
template <class T>
void check_batch(const RaggedBatch<T>& x) {
    check_offsets(x.offsets, x.batch, x.width);
    for (int64_t j = 0; j < x.batch; ++j) {
        if (x.length(j) > 0 && x.data[j] == nullptr) {
            throw std::invalid_argument("datum " + std::to_string(j) + " has elements but no data pointer");
        }
    }
}

/// Throws std::invalid_argument unless [begin, begin + count) lies within [0, total) perturbations.
void check_range(const char* what, int64_t begin, int64_t count, int64_t total);

/// Names the first non-finite element of datum `datum` (flat `position`) in the [T, width] layout.
std::string describe_position(int64_t datum, int64_t position, int64_t width);

}  // namespace regrad
