#include "regrad/ragged.hpp"

#include <sstream>

namespace regrad {

void check_offsets(const int64_t* offsets, int64_t batch, int64_t width) {
    if (batch < 0) throw std::invalid_argument("batch size must be >= 0, got " + std::to_string(batch));
    if (width < 1) throw std::invalid_argument("row width K must be >= 1, got " + std::to_string(width));
    if (offsets[0] != 0) throw std::invalid_argument("offsets[0] must be 0, got " + std::to_string(offsets[0]));
    for (int64_t i = 0; i < batch; ++i) {
        const int64_t n = offsets[i + 1] - offsets[i];
        if (n < 0) {
            throw std::invalid_argument("offsets must not decrease: datum " + std::to_string(i) + " has length " +
                                        std::to_string(n));
        }
        if (n % width != 0) {
            throw std::invalid_argument("datum " + std::to_string(i) + " has " + std::to_string(n) +
                                        " elements, not a multiple of the row width " + std::to_string(width));
        }
    }
}

void check_range(const char* what, int64_t begin, int64_t count, int64_t total) {
    if (begin < 0 || count < 0 || begin > total || count > total - begin) {
        throw std::invalid_argument(std::string(what) + " [" + std::to_string(begin) + ", " +
                                    std::to_string(begin + count) + ") is outside the " + std::to_string(total) +
                                    " perturbations");
    }
}

std::string describe_position(int64_t datum, int64_t position, int64_t width) {
    std::ostringstream out;
    out << "datum " << datum << ", ";
    if (width == 1) {
        out << "token " << position;
    } else {
        out << "token " << position / width << ", column " << position % width;
    }
    return out.str();
}

}  // namespace regrad
