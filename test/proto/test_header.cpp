#define BOOST_TEST_MODULE proto_header
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <array>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ringxfer/proto/crc32c.hpp"
#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/header.hpp"
#include "rx_test.hpp"

using namespace ringxfer::proto;

namespace {

using Bytes = std::array<std::byte, kHeaderSize>;

Bytes encode(const FrameHeader& h) {
    Bytes b{};
    encode_header(h, b);
    return b;
}

std::error_code decode(const Bytes& b, std::uint64_t max, FrameHeader& out) {
    return decode_header(std::span<const std::byte, kHeaderSize>(b), max, out);
}

std::error_code decode(const Bytes& b, std::uint64_t max = kDefaultMaxFrame) {
    FrameHeader h;
    return decode(b, max, h);
}

/// Bitwise reference CRC32C (reflected 0x82F63B78), no tables.
std::uint32_t crc32c_reference(std::span<const std::byte> d) {
    std::uint32_t c = 0xffffffffu;
    for (std::byte b : d) {
        c ^= std::to_integer<std::uint32_t>(b);
        for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    }
    return ~c;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(header)

BOOST_AUTO_TEST_CASE(wire_layout_is_little_endian_v1) {
    FrameHeader h{kFlagChecksum | kFlagControl, 0x11223344u, 0x0102030405060708ull};
    Bytes b = encode(h);
    const unsigned char expected[16] = {'R',  'X',  1,    3,    0x44, 0x33, 0x22, 0x11,
                                        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01};
    BOOST_TEST(std::memcmp(b.data(), expected, 16) == 0);
}

BOOST_AUTO_TEST_CASE(round_trip) {
    const FrameHeader cases[] = {
        {0, 0, 0},
        {0, 0, 1},
        {kFlagControl, 0, 12345},
        {kFlagChecksum, 0xdeadbeefu, 100'000'000},
        {kFlagChecksum | kFlagControl, 0xffffffffu, kDefaultMaxFrame},
        {kFlagChecksum, 0, std::numeric_limits<std::uint64_t>::max()},
    };
    for (const FrameHeader& in : cases) {
        BOOST_TEST_CONTEXT("flags " << int(in.flags) << " length " << in.length) {
            FrameHeader out{0xff, 1, 1};
            BOOST_TEST(!decode(encode(in), std::numeric_limits<std::uint64_t>::max(), out));
            BOOST_TEST(out.flags == in.flags);
            BOOST_TEST(out.checksum == in.checksum);
            BOOST_TEST(out.length == in.length);
        }
    }
}

BOOST_AUTO_TEST_CASE(bad_magic_is_rejected) {
    for (int pos : {0, 1}) {
        Bytes b = encode({0, 0, 10});
        b[pos] = std::byte{'x'};
        BOOST_TEST((decode(b) == Errc::bad_magic));
    }
    Bytes http{};
    std::memcpy(http.data(), "GET / HTTP/1.1\r\n", 16);
    BOOST_TEST((decode(http) == Errc::bad_magic));
}

BOOST_AUTO_TEST_CASE(bad_version_is_rejected) {
    for (int v : {0, 2, 255}) {
        Bytes b = encode({0, 0, 10});
        b[2] = std::byte(v);
        BOOST_TEST_CONTEXT("version " << v) { BOOST_TEST((decode(b) == Errc::bad_version)); }
    }
}

BOOST_AUTO_TEST_CASE(each_unknown_flag_bit_is_rejected) {
    for (int bit = 2; bit < 8; ++bit) {
        Bytes b = encode({0, 0, 10});
        b[3] = std::byte(1u << bit);
        BOOST_TEST_CONTEXT("bit " << bit) { BOOST_TEST((decode(b) == Errc::unknown_flags)); }
        b[3] = std::byte((1u << bit) | kFlagChecksum | kFlagControl);
        BOOST_TEST_CONTEXT("bit " << bit << " with known bits") {
            BOOST_TEST((decode(b) == Errc::unknown_flags));
        }
    }
    // The two known bits alone are fine.
    for (std::uint8_t f : {std::uint8_t{0}, kFlagChecksum, kFlagControl,
                           static_cast<std::uint8_t>(kFlagChecksum | kFlagControl)})
        BOOST_TEST(!decode(encode({f, 0, 10})));
}

BOOST_AUTO_TEST_CASE(checksum_field_without_flag_is_rejected) {
    BOOST_TEST((decode(encode({0, 1, 10})) == Errc::reserved_not_zero));
    BOOST_TEST((decode(encode({kFlagControl, 0x80000000u, 10})) == Errc::reserved_not_zero));
    BOOST_TEST(!decode(encode({kFlagChecksum, 1, 10})));
    BOOST_TEST(!decode(encode({kFlagChecksum, 0, 10})));  // a CRC may be 0
}

BOOST_AUTO_TEST_CASE(length_limit_is_inclusive) {
    BOOST_TEST(!decode(encode({0, 0, kDefaultMaxFrame})));
    BOOST_TEST((decode(encode({0, 0, kDefaultMaxFrame + 1})) == Errc::too_large));
    BOOST_TEST((decode(encode({0, 0, std::numeric_limits<std::uint64_t>::max()})) ==
                Errc::too_large));
    BOOST_TEST(!decode(encode({0, 0, 1000}), 1000));
    BOOST_TEST((decode(encode({0, 0, 1001}), 1000) == Errc::too_large));
    BOOST_TEST(!decode(encode({0, 0, 0}), 0));
    BOOST_TEST((decode(encode({0, 0, 1}), 0) == Errc::too_large));
}

BOOST_AUTO_TEST_CASE(rejection_leaves_the_output_alone) {
    FrameHeader out{kFlagControl, 7, 99};
    Bytes b = encode({0, 0, 10});
    b[0] = std::byte{0};
    BOOST_TEST(static_cast<bool>(decode(b, kDefaultMaxFrame, out)));
    BOOST_TEST(out.flags == kFlagControl);
    BOOST_TEST(out.checksum == 7u);
    BOOST_TEST(out.length == 99u);
}

BOOST_AUTO_TEST_CASE(error_codes_have_a_category_and_messages) {
    std::error_code ec = Errc::too_large;
    BOOST_TEST(std::string(ec.category().name()) == "ringxfer.proto");
    BOOST_TEST(&ec.category() == &category());
    for (int e = static_cast<int>(Errc::closed); e <= static_cast<int>(Errc::no_buffer); ++e) {
        std::error_code c = make_error_code(static_cast<Errc>(e));
        BOOST_TEST(!c.message().empty());
        BOOST_TEST(c.message() != "unknown protocol error");
    }
    BOOST_TEST((std::error_code(Errc::closed) != std::error_code(1, std::system_category())));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(crc)

BOOST_AUTO_TEST_CASE(known_vectors) {
    BOOST_TEST(crc32c(rxtest::as_bytes("123456789")) == 0xE3069283u);
    BOOST_TEST(crc32c({}) == 0u);
    // RFC 3720 (iSCSI) B.4 test vectors.
    std::vector<std::byte> zeros(32, std::byte{0}), ones(32, std::byte{0xff}), inc(32), dec(32);
    for (int i = 0; i < 32; ++i) {
        inc[i] = std::byte(i);
        dec[i] = std::byte(31 - i);
    }
    BOOST_TEST(crc32c(zeros) == 0x8A9136AAu);
    BOOST_TEST(crc32c(ones) == 0x62A8AB43u);
    BOOST_TEST(crc32c(inc) == 0x46DD794Eu);
    BOOST_TEST(crc32c(dec) == 0x113FDB5Cu);
}

BOOST_AUTO_TEST_CASE(matches_a_bitwise_reference_at_any_length_and_alignment) {
    auto data = rxtest::pattern_vector(5000, 77);
    for (std::size_t off = 0; off < 9; ++off) {
        for (std::size_t len : {0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4096, 4990}) {
            std::span<const std::byte> s(data.data() + off, len);
            BOOST_TEST_CONTEXT("offset " << off << " length " << len) {
                BOOST_TEST(crc32c(s) == crc32c_reference(s));
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(incremental_equals_one_shot) {
    auto data = rxtest::pattern_vector(100000, 3);
    std::uint32_t whole = crc32c(data);
    for (std::size_t cut : {0, 1, 5, 8, 4097, 99999, 100000}) {
        std::span<const std::byte> all(data);
        std::uint32_t part = crc32c(all.subspan(cut), crc32c(all.first(cut)));
        BOOST_TEST_CONTEXT("cut " << cut) { BOOST_TEST(part == whole); }
    }
    data[50000] ^= std::byte{1};
    BOOST_TEST(crc32c(data) != whole);  // a single flipped bit is caught
}

BOOST_AUTO_TEST_SUITE_END()
