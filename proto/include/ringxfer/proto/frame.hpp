// Frame: a complete message, the move-only owner of its pooled payload.
// Dropping it (or calling reset()) returns the buffer to its pool. There is no
// copy constructor: to hand the bytes to another language, move the Frame into
// an object the other side owns and expose payload() as a buffer view; the
// memory is valid exactly as long as that object holds the Frame.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/proto/header.hpp"

namespace ringxfer::proto {

/// engine::PoolOptions::page_offset for a pool whose buffers carry payloads
/// of this protocol: over TCP each payload sits right behind its
/// kHeaderSize-byte header in the socket's pages, so buffers that start
/// kHeaderSize bytes into a page copy at full speed (the option's comment
/// says why); Unix sockets lay payloads out from page starts: 0.
constexpr std::size_t payload_page_offset(bool tcp) noexcept { return tcp ? kHeaderSize : 0; }

class Frame {
public:
    Frame() = default;
    /// Takes `payload` (size() bytes are the frame; capacity may be larger).
    explicit Frame(engine::Lease payload, std::uint8_t flags = 0) noexcept
        : lease_(std::move(payload)), flags_(flags) {}

    /// Leases a frame of `size` bytes from `pool`. Returns 0 or -errno.
    static int allocate(engine::BufferPool& pool, std::size_t size, Frame& out,
                        std::uint8_t flags = 0);

    Frame(Frame&&) noexcept = default;
    Frame& operator=(Frame&&) noexcept = default;

    std::span<const std::byte> payload() const noexcept { return lease_.span(); }
    std::span<std::byte> mutable_payload() noexcept { return lease_.span(); }
    std::size_t size() const noexcept { return lease_.size(); }
    std::uint8_t flags() const noexcept { return flags_; }
    bool is_control() const noexcept { return flags_ & kFlagControl; }
    void set_flags(std::uint8_t flags) noexcept { flags_ = flags; }

    /// The underlying lease (fixed-buffer index etc.).
    const engine::Lease& lease() const noexcept { return lease_; }
    /// Gives up the payload buffer to the caller.
    engine::Lease release() && noexcept { return std::move(lease_); }
    void reset() noexcept { lease_.reset(); }

private:
    engine::Lease lease_;
    std::uint8_t flags_ = 0;
};

}  // namespace ringxfer::proto
