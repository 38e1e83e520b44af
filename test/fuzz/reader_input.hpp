// Layout of one fuzz_frame_reader input, shared by the target and the corpus
// generator so the two cannot drift apart.
//
//   byte 0   reader/peer setup (bits below)
//   byte 1   how the application reads (bits below)
//   byte 2   n: number of chunk-size bytes that follow
//   n bytes  chunk sizes of the peer's successive writes, cycled (0: the rest)
//   rest     the bytes the peer sends, then it closes (or resets)
//
// Inputs shorter than the three setup bytes are read as all-zero setup.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace rxfuzz {

// byte 0
inline constexpr std::uint8_t kVerifyChecksum = 1u << 0;
inline constexpr std::uint8_t kProgress = 1u << 1;           ///< pass a progress handler
inline constexpr std::uint8_t kProgressEveryByte = 1u << 2;  ///< progress_bytes 0, else 3
inline constexpr std::uint8_t kFewEmpty = 1u << 3;           ///< max_consecutive_empty = 2
inline constexpr unsigned kStagingShift = 4;                 ///< bits 4-5: staging size index
inline constexpr std::uint8_t kSmallBuffers = 1u << 6;       ///< pool serves at most 4 KiB
inline constexpr std::uint8_t kResetAtEnd = 1u << 7;         ///< -ECONNRESET instead of EOF
inline constexpr std::size_t kStagingSizes[4] = {16, 17, 64, 4096};

// byte 1
inline constexpr std::uint8_t kChained = 1u << 0;     ///< read() again from inside the handler
inline constexpr std::uint8_t kHoldFrames = 1u << 1;  ///< keep every frame until the end
inline constexpr unsigned kStopShift =
    2;  ///< bits 2-7: destroy the reader after that many frames (0: never)

inline constexpr std::uint64_t kMaxFrame = 1 << 20;
inline constexpr std::size_t kSmallBufferBytes = 4096;

struct ReaderInput {
    std::uint8_t setup = 0;
    std::uint8_t app = 0;
    std::vector<std::size_t> chunks;
    std::span<const std::byte> wire;

    static ReaderInput parse(const std::uint8_t* data, std::size_t size) {
        ReaderInput in;
        std::size_t pos = 0;
        auto next = [&]() -> std::uint8_t { return pos < size ? data[pos++] : 0; };
        in.setup = next();
        in.app = next();
        std::size_t n = next();
        for (std::size_t i = 0; i < n && pos < size; ++i) in.chunks.push_back(next());
        in.wire = {reinterpret_cast<const std::byte*>(data) + pos, size - pos};
        return in;
    }

    /// The input bytes for (setup, app, chunks, wire): what parse() reads back.
    static std::vector<std::uint8_t> encode(std::uint8_t setup, std::uint8_t app,
                                            std::span<const std::uint8_t> chunks,
                                            std::span<const std::byte> wire) {
        std::vector<std::uint8_t> out;
        out.reserve(3 + chunks.size() + wire.size());
        out.push_back(setup);
        out.push_back(app);
        out.push_back(static_cast<std::uint8_t>(chunks.size()));  // at most 255 of them
        for (std::uint8_t c : chunks) out.push_back(c);
        for (std::byte b : wire) out.push_back(std::to_integer<std::uint8_t>(b));
        return out;
    }
};

}  // namespace rxfuzz
