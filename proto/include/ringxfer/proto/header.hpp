// Wire format v1 (docs/protocol.md): every frame is a 16-byte little-endian
// header followed by the payload.
//
//   offset size field
//   0      2    magic 'R' 'X'
//   2      1    version = 1
//   3      1    flags: bit 0 checksum present, bit 1 control (JSON payload)
//   4      4    CRC32C of the payload when bit 0 is set, else 0
//   8      8    payload length in bytes
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>

namespace ringxfer::proto {

inline constexpr std::size_t kHeaderSize = 16;
inline constexpr std::uint8_t kVersion = 1;
inline constexpr std::uint8_t kFlagChecksum = 1u << 0;
inline constexpr std::uint8_t kFlagControl = 1u << 1;
inline constexpr std::uint8_t kKnownFlags = kFlagChecksum | kFlagControl;
inline constexpr std::uint64_t kDefaultMaxFrame = std::uint64_t{1} << 30;  // 1 GiB

struct FrameHeader {
    std::uint8_t flags = 0;
    std::uint32_t checksum = 0;
    std::uint64_t length = 0;
};

void encode_header(const FrameHeader& h, std::span<std::byte, kHeaderSize> out) noexcept;

/// Validates and decodes; rejects bad magic, unknown version, unknown flag
/// bits, a checksum field without its flag, and lengths above `max_length`.
/// Nothing is allocated before this succeeds.
std::error_code decode_header(std::span<const std::byte, kHeaderSize> in, std::uint64_t max_length,
                              FrameHeader& out) noexcept;

}  // namespace ringxfer::proto
