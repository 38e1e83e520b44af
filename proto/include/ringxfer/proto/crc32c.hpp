// CRC32C (Castagnoli), the frame checksum. Uses the SSE4.2 crc32 instruction
// when the CPU has it, a table otherwise.
#pragma once

#include <cstdint>
#include <span>

namespace ringxfer::proto {

std::uint32_t crc32c(std::span<const std::byte> data, std::uint32_t crc = 0) noexcept;

}  // namespace ringxfer::proto
