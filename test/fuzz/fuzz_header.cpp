// Fuzz target: the v1 header decoder (proto/src/header.cpp).
//
// Input: 16 header bytes, optionally followed by 8 little-endian bytes of
// max_length (default: kDefaultMaxFrame). The bytes are read a second time
// here, independently, straight from docs/protocol.md; any disagreement
// aborts:
// - a rejection names the first rule broken, in the documented order (magic,
//   version, flags, reserved checksum, length), is in proto::category(), and
//   leaves the output untouched;
// - an accepted header has exactly the fields on the wire and re-encodes to
//   the same 16 bytes;
// - any header with known flags encodes and decodes back to itself.
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <span>

#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/header.hpp"

using namespace ringxfer::proto;

namespace {

void check(bool ok, const char* what) {
    if (ok) return;
    std::fprintf(stderr, "fuzz_header: invariant violated: %s\n", what);
    std::abort();
}

std::uint64_t le(const std::uint8_t* p, std::size_t n) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{p[i]} << (8 * i);
    return v;
}

bool same(const FrameHeader& a, const FrameHeader& b) {
    return a.flags == b.flags && a.checksum == b.checksum && a.length == b.length;
}

/// The rule `d` breaks first, or 0 when it is a valid header.
int first_broken_rule(const std::uint8_t* d, std::uint64_t max_length) {
    if (d[0] != 'R' || d[1] != 'X') return static_cast<int>(Errc::bad_magic);
    if (d[2] != 1) return static_cast<int>(Errc::bad_version);
    if (d[3] & ~(kFlagChecksum | kFlagControl)) return static_cast<int>(Errc::unknown_flags);
    if (!(d[3] & kFlagChecksum) && le(d + 4, 4) != 0)
        return static_cast<int>(Errc::reserved_not_zero);
    if (le(d + 8, 8) > max_length) return static_cast<int>(Errc::too_large);
    return 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < kHeaderSize) return 0;
    const std::uint64_t max_length =
        size >= kHeaderSize + 8 ? le(data + kHeaderSize, 8) : kDefaultMaxFrame;
    std::span<const std::byte, kHeaderSize> wire(reinterpret_cast<const std::byte*>(data),
                                                 kHeaderSize);

    const FrameHeader untouched{0xee, 0xdeadbeef, 0x0123456789abcdef};
    FrameHeader out = untouched;
    std::error_code ec = decode_header(wire, max_length, out);
    const int broken = first_broken_rule(data, max_length);
    if (ec) {
        check(ec.category() == category(), "rejection outside proto::category()");
        check(ec.value() == broken, "rejection names a different rule than the first one broken");
        check(same(out, untouched), "a rejected header wrote the output");
    } else {
        check(broken == 0, "a header breaking a rule was accepted");
        check(out.flags == data[3] && out.checksum == le(data + 4, 4) &&
                  out.length == le(data + 8, 8),
              "decoded fields differ from the wire");
        std::array<std::byte, kHeaderSize> again{};
        encode_header(out, again);
        check(std::memcmp(again.data(), data, kHeaderSize) == 0, "re-encoding changed the bytes");
    }

    // Round trip of an arbitrary valid header built from the same bytes.
    const std::uint8_t flags = data[3] & kKnownFlags;
    FrameHeader h{flags, (flags & kFlagChecksum) ? static_cast<std::uint32_t>(le(data + 4, 4)) : 0u,
                  le(data + 8, 8)};
    std::array<std::byte, kHeaderSize> enc{};
    encode_header(h, enc);
    FrameHeader back;
    check(!decode_header(enc, std::numeric_limits<std::uint64_t>::max(), back),
          "an encoded valid header was rejected");
    check(same(back, h), "encode/decode round trip changed the header");
    return 0;
}
