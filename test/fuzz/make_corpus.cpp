// Writes the seed corpus of the fuzz targets (seed-* files under
// test/fuzz/corpus/<target>/). The files are checked in; run this again after
// changing the input layout (reader_input.hpp) or the wire format:
//
//   ninja -C build test/fuzz/make_corpus && build/test/fuzz/make_corpus test/fuzz/corpus
//
// Inputs that found bugs are kept beside the seeds as regress-* files, by
// hand; this program never touches them.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "reader_input.hpp"
#include "ringxfer/proto/crc32c.hpp"
#include "ringxfer/proto/header.hpp"

using namespace ringxfer::proto;
namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;

namespace {

fs::path g_root;

void write(const std::string& target, const std::string& name, const std::vector<std::uint8_t>& b) {
    fs::create_directories(g_root / target);
    std::ofstream(g_root / target / ("seed-" + name), std::ios::binary)
        .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

Bytes header_bytes(const FrameHeader& h) {
    Bytes b(kHeaderSize);
    encode_header(h, std::span<std::byte, kHeaderSize>(b.data(), kHeaderSize));
    return b;
}

std::vector<std::uint8_t> u8(const Bytes& b) {
    std::vector<std::uint8_t> out;
    for (std::byte x : b) out.push_back(std::to_integer<std::uint8_t>(x));
    return out;
}

Bytes payload(std::size_t n, unsigned seed) {
    Bytes p(n);
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((i * 31 + seed * 7) & 0xff);
    return p;
}

/// Appends one frame; `checksum` adds a correct CRC32C (`corrupt` flips it).
void frame(Bytes& wire, std::size_t n, std::uint8_t flags, unsigned seed, bool corrupt = false) {
    Bytes p = payload(n, seed);
    FrameHeader h{flags, (flags & kFlagChecksum) ? crc32c(p) : 0u, n};
    if (corrupt) h.checksum ^= 1;
    Bytes hb = header_bytes(h);
    wire.insert(wire.end(), hb.begin(), hb.end());
    wire.insert(wire.end(), p.begin(), p.end());
}

void headers() {
    // `patch`: (byte index, value) pairs written over the encoded header.
    auto seed = [](const std::string& name, FrameHeader h,
                   std::initializer_list<std::pair<std::size_t, std::uint8_t>> patch = {}) {
        Bytes b = header_bytes(h);
        for (auto [i, v] : patch) b[i] = static_cast<std::byte>(v);
        write("header", name, u8(b));
    };
    seed("empty", {0, 0, 0});
    seed("data", {0, 0, 100});
    seed("checksum", {kFlagChecksum, 0x12345678, 100});
    seed("control", {kFlagControl, 0, 5});
    seed("checksum-control", {kFlagChecksum | kFlagControl, 0xffffffff, 1 << 20});
    seed("too-large", {0, 0, std::uint64_t{1} << 40});
    seed("bad-magic", {0, 0, 10}, {{0, 'G'}, {1, 'E'}});
    seed("bad-version", {0, 0, 10}, {{2, 2}});
    seed("unknown-flags", {0, 0, 10}, {{3, 0x80}});
    seed("reserved-not-zero", {0, 0xabcd, 10});
    // With an explicit max_length (8 more bytes): exactly at the limit.
    Bytes at_limit = header_bytes({0, 0, 4096});
    for (int i = 0; i < 8; ++i)
        at_limit.push_back(static_cast<std::byte>((4096 >> (8 * i)) & 0xff));
    write("header", "at-explicit-limit", u8(at_limit));
}

void reader() {
    using namespace rxfuzz;
    auto seed = [](const std::string& name, std::uint8_t setup, std::uint8_t app,
                   std::vector<std::uint8_t> chunks, const Bytes& wire) {
        write("frame_reader", name, ReaderInput::encode(setup, app, chunks, wire));
    };
    const std::uint8_t staging16 = 0 << kStagingShift, staging64 = 2 << kStagingShift,
                       staging4k = 3 << kStagingShift;

    Bytes mixed;  // every kind of frame, one larger than the 64-byte staging
    frame(mixed, 0, 0, 1);
    frame(mixed, 1, kFlagControl, 2);
    frame(mixed, 40, kFlagChecksum, 3);
    frame(mixed, 100, 0, 4);
    frame(mixed, 64, kFlagChecksum | kFlagControl, 5);
    frame(mixed, 3, 0, 6);
    seed("mixed-one-read", kVerifyChecksum | staging64, 0, {}, mixed);
    seed("mixed-byte-by-byte", kVerifyChecksum | staging64, kChained, {1}, mixed);
    seed("mixed-odd-chunks", kVerifyChecksum | staging16, kHoldFrames, {1, 3, 16, 255, 7}, mixed);
    seed("mixed-progress", kVerifyChecksum | kProgress | staging64, kChained, {5, 11}, mixed);
    seed("mixed-progress-every-byte", kVerifyChecksum | kProgress | kProgressEveryByte | staging4k,
         kHoldFrames, {2}, mixed);
    seed("mixed-stop-after-2", kVerifyChecksum | staging64, kChained | (2 << kStopShift), {9},
         mixed);
    seed("mixed-reset-at-end", kVerifyChecksum | kResetAtEnd | staging64, 0, {}, mixed);
    seed("empty-input", kVerifyChecksum, 0, {}, {});

    Bytes bad_crc;
    frame(bad_crc, 10, kFlagChecksum, 1);
    frame(bad_crc, 50, kFlagChecksum, 2, /*corrupt=*/true);
    frame(bad_crc, 5, 0, 3);
    seed("checksum-mismatch", kVerifyChecksum | staging64, 0, {}, bad_crc);
    seed("checksum-unverified", staging64, kChained, {4}, bad_crc);

    Bytes truncated;
    frame(truncated, 30, 0, 1);
    frame(truncated, 200, 0, 2);
    truncated.resize(truncated.size() - 50);
    seed("truncated-payload", kVerifyChecksum | staging64, 0, {13}, truncated);
    Bytes mid_header(truncated.begin(), truncated.begin() + 16 + 30 + 7);
    seed("truncated-header", kVerifyChecksum | staging64, 0, {}, mid_header);

    Bytes bad_magic;
    frame(bad_magic, 8, 0, 1);
    Bytes junk = header_bytes({0, 0, 8});
    junk[0] = std::byte{'G'};
    bad_magic.insert(bad_magic.end(), junk.begin(), junk.end());
    seed("bad-magic-after-frame", kVerifyChecksum | staging64, 0, {}, bad_magic);

    Bytes too_large = header_bytes({0, 0, kMaxFrame + 1});
    seed("too-large", kVerifyChecksum, 0, {}, too_large);

    Bytes empties;
    for (int i = 0; i < 3; ++i) frame(empties, 0, 0, 1);
    seed("too-many-empty", kVerifyChecksum | kFewEmpty, 0, {}, empties);

    Bytes big;
    frame(big, kSmallBufferBytes + 1, 0, 1);
    seed("no-buffer", kVerifyChecksum | kSmallBuffers | staging4k, 0, {}, big);
    seed("large-frame-header-only", kVerifyChecksum | staging4k, 0, {0, 100}, big);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_corpus <corpus dir>\n");
        return 2;
    }
    g_root = argv[1];
    headers();
    reader();
    return 0;
}
