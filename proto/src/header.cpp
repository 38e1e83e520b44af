#include "ringxfer/proto/header.hpp"

#include <cstring>
#include <string>

#include "ringxfer/proto/errors.hpp"

namespace ringxfer::proto {
namespace {

template <typename T>
T load_le(const std::byte* p) noexcept {
    T v = 0;
    for (std::size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(std::to_integer<T>(p[i]) << (8 * i));
    return v;
}

template <typename T>
void store_le(std::byte* p, T v) noexcept {
    for (std::size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}

class Category final : public std::error_category {
public:
    const char* name() const noexcept override { return "ringxfer.proto"; }
    std::string message(int ev) const override {
        switch (static_cast<Errc>(ev)) {
            case Errc::closed: return "peer closed the connection";
            case Errc::truncated: return "peer closed the connection in the middle of a frame";
            case Errc::bad_magic: return "bad frame magic (peer is not speaking ringxfer protocol v1)";
            case Errc::bad_version: return "unsupported protocol version (this side speaks version 1)";
            case Errc::unknown_flags: return "frame header has unknown flag bits set";
            case Errc::reserved_not_zero: return "frame header checksum field set without the checksum flag";
            case Errc::too_large: return "frame length above the configured maximum (--max-frame)";
            case Errc::checksum_mismatch: return "frame checksum (CRC32C) mismatch: payload corrupted";
            case Errc::no_buffer: return "no buffer for the frame: pool budget exhausted";
            case Errc::too_many_empty: return "too many consecutive zero-length frames";
        }
        return "unknown protocol error";
    }
};

}  // namespace

const std::error_category& category() noexcept {
    static const Category c;
    return c;
}

void encode_header(const FrameHeader& h, std::span<std::byte, kHeaderSize> out) noexcept {
    std::byte* p = out.data();
    p[0] = std::byte{'R'};
    p[1] = std::byte{'X'};
    p[2] = std::byte{kVersion};
    p[3] = std::byte{h.flags};
    store_le<std::uint32_t>(p + 4, h.checksum);
    store_le<std::uint64_t>(p + 8, h.length);
}

std::error_code decode_header(std::span<const std::byte, kHeaderSize> in, std::uint64_t max_length,
                              FrameHeader& out) noexcept {
    const std::byte* p = in.data();
    if (p[0] != std::byte{'R'} || p[1] != std::byte{'X'}) return Errc::bad_magic;
    if (p[2] != std::byte{kVersion}) return Errc::bad_version;
    auto flags = std::to_integer<std::uint8_t>(p[3]);
    if (flags & ~kKnownFlags) return Errc::unknown_flags;
    auto checksum = load_le<std::uint32_t>(p + 4);
    if (!(flags & kFlagChecksum) && checksum != 0) return Errc::reserved_not_zero;
    auto length = load_le<std::uint64_t>(p + 8);
    if (length > max_length) return Errc::too_large;
    out = {flags, checksum, length};
    return {};
}

}  // namespace ringxfer::proto
