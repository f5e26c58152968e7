// Counter-based random numbers: a value is a pure function of (seed, stream, index), so random
// directions are regenerated where needed and never stored, in any order, on any thread.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace regrad {

/// Philox4x32 with 10 rounds (Salmon et al., SC'11): 128 counter bits and 64 key bits to 128 bits.
inline std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
    constexpr uint64_t kMul0 = 0xD2511F53u;
    constexpr uint64_t kMul1 = 0xCD9E8D57u;
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key[0] += 0x9E3779B9u;  // Weyl sequence key schedule
            key[1] += 0xBB67AE85u;
        }
        const uint64_t p0 = kMul0 * counter[0];
        const uint64_t p1 = kMul1 * counter[2];
        counter = {static_cast<uint32_t>(p1 >> 32) ^ counter[1] ^ key[0], static_cast<uint32_t>(p1),
                   static_cast<uint32_t>(p0 >> 32) ^ counter[3] ^ key[1], static_cast<uint32_t>(p0)};
    }
    return counter;
}

/// 128 random bits for element `index` of stream `stream` (e.g. a sample number) under `seed`.
inline std::array<uint32_t, 4> random_bits(uint64_t seed, uint64_t stream, uint64_t index) {
    return philox4x32({static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)},
                      {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}

/// Uniform double in [0, 1) with 53 random bits.
inline double uniform01(uint32_t hi, uint32_t lo) {
    const uint64_t bits = (static_cast<uint64_t>(hi) << 32 | lo) >> 11;
    return static_cast<double>(bits) * 0x1.0p-53;
}

enum class Direction {
    Rademacher,  ///< +1 or -1 with probability 1/2 (SPSA)
    Gaussian,    ///< standard normal (Gaussian smoothing)
};

/// Component `index` of random direction number `sample`: a pure function of its arguments.
inline double random_direction(Direction kind, uint64_t seed, uint64_t sample, uint64_t index) {
    const std::array<uint32_t, 4> r = random_bits(seed, sample, index);
    if (kind == Direction::Rademacher) return (r[0] & 1u) ? 1.0 : -1.0;
    // Box-Muller on two 53-bit uniforms; 1 - u keeps the logarithm's argument in (0, 1].
    const double u1 = 1.0 - uniform01(r[0], r[1]);
    const double u2 = uniform01(r[2], r[3]);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace regrad
