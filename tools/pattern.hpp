// The payload pattern bench sends and checks: pseudo-random so that a
// misplaced or stale chunk fails verification; the same seed on both sides.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

namespace ringxfer::tools {

inline void fill_pattern(std::span<std::byte> p, std::uint64_t seed) {
    std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    std::size_t i = 0;
    for (; i + 8 <= p.size(); i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::memcpy(p.data() + i, &x, 8);
    }
    for (; i < p.size(); ++i) p[i] = static_cast<std::byte>(i);
}

inline constexpr std::uint64_t kPatternSeed = 42;

}  // namespace ringxfer::tools
