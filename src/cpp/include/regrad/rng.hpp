// Counter-based random numbers: a value is a pure function of (seed, stream, index), so random
// directions are regenerated where needed and never stored, in any order, on any thread. The
// arithmetic is formulas.hpp's, which the GPU runs too.
#pragma once

#include <array>
#include <cstdint>

#include "regrad/formulas.hpp"

namespace regrad {

/// Philox4x32 with 10 rounds: 128 counter bits and 64 key bits to 128 bits.
inline std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
    formulas::philox4x32_10(counter.data(), key[0], key[1]);
    return counter;
}

enum class Direction {
    Rademacher,  ///< +1 or -1 with probability 1/2 (SPSA)
    Gaussian,    ///< standard normal (Gaussian smoothing)
};

#if !defined(__CUDACC__)  // host code only: HostMath's libm calls are not device code (the GPU has its own)
/// Component `index` of random direction number `sample`: a pure function of its arguments.
inline double random_direction(Direction kind, uint64_t seed, uint64_t sample, uint64_t index) {
    return formulas::random_direction<formulas::HostMath>(kind == Direction::Gaussian, seed, sample, index);
}
#endif

}  // namespace regrad
