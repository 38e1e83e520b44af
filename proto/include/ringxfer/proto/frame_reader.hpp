// FrameReader: turns a byte stream into complete Frames.
//
// Path of a payload byte (docs/design.md counts these):
// - The reader receives into a pooled staging buffer (64 KiB by default),
//   as many bytes as the socket has, so one recv brings many small frames.
// - A frame whose payload is all in staging is handed out as a view of the
//   staging buffer (Lease::share): zero copies, no allocation. A small frame
//   (<= staging/4) that is not all here yet is waited for in staging. The
//   views keep the staging slab alive; when it is full the reader continues
//   in a fresh one and the old slab returns to the pool once its last frame
//   is dropped. (So an application that keeps many small frames for long
//   keeps their staging slabs: copy what you keep.) The only bytes copied
//   are a partial frame or header moved to the front of staging when it
//   runs out of room (counted in stats().copied_bytes).
// - A larger frame gets a buffer of exactly its size, leased once its header
//   is validated (before anything is allocated); the bytes already in
//   staging are copied into it and the rest is received straight into it.
// - With `initial_staging_bytes` set (a server with many idle connections)
//   the first staging buffer is that small; the reader moves to
//   `staging_bytes` once anything has arrived.
// - After a frame larger than the staging buffer the next header is read
//   alone (16 bytes), so a stream of large frames is received with no copy
//   at all.
// - A transport that carries payloads by reference (shm) hands a larger
//   frame's payload over whole when none of it is in staging
//   (Stream::take_payload): the frame is then a read-only view of the
//   peer's memory, no buffer leased, no byte copied.
//
// Progressive reads (for relays such as the echo server): read() may also
// take a progress handler, called with the header and a view of the payload
// buffer each time at least `progress_bytes` more payload bytes have landed
// (and once right after the header, and once for the last bytes). A relay
// forwards those bytes with Lease::share() views while the rest is still
// arriving (cut-through), instead of waiting for the whole frame.
//
// One read() at a time; the handler gets the Frame or an error code
// (proto::Errc::closed for a clean close between frames). The handler may
// call read() again. Do not destroy the reader from inside its handler.
#pragma once

#include <cstdint>
#include <functional>
#include <system_error>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame.hpp"

namespace ringxfer::proto {

/// The pool's smallest buffer class: a good `initial_staging_bytes`.
inline constexpr std::size_t kSmallStagingBytes = 4096;

struct ReaderOptions {
    std::uint64_t max_frame = kDefaultMaxFrame;
    std::size_t staging_bytes = 64 * 1024;
    /// Staging buffer until the first bytes arrive, then staging_bytes (0:
    /// staging_bytes from the start). What an idle connection holds.
    std::size_t initial_staging_bytes = 0;
    bool verify_checksum = true;  ///< check CRC32C when the frame carries one
    std::size_t progress_bytes = std::size_t{1} << 20;  ///< progress granularity
    /// Consecutive zero-length data frames allowed before the stream is
    /// refused (they cost the receiver work and carry nothing); 0: no limit.
    std::uint64_t max_consecutive_empty = 1024;
};

struct ReaderStats {
    std::uint64_t frames = 0;
    std::uint64_t payload_bytes = 0;
    std::uint64_t copied_bytes = 0;  ///< bytes copied out of or within staging
    std::uint64_t sliced_frames = 0; ///< frames handed out as views of staging
    /// frames whose payload the stream handed over by reference
    /// (Stream::take_payload: the shm transport), not received into a buffer
    std::uint64_t referenced_frames = 0;
};

class FrameReader {
public:
    using Handler = engine::Callback<void(Frame, std::error_code)>;
    /// (header, payload buffer, bytes of it received so far)
    using ProgressHandler =
        engine::Callback<void(const FrameHeader&, const engine::Lease&, std::size_t ready)>;

    FrameReader(engine::Stream& stream, engine::BufferPool& pool, ReaderOptions options = {});

    /// Reads the next frame; `handler` runs exactly once (possibly before
    /// read() returns, when the frame is already buffered).
    void read(Handler handler, ProgressHandler progress = nullptr);

    const ReaderStats& stats() const noexcept { return stats_; }

    /// The frame being received, for rate limits: its payload size and the
    /// bytes of it received so far (0, 0 between frames).
    std::uint64_t pending_length() const noexcept { return in_payload_ ? pending_.length : 0; }
    std::uint64_t pending_received() const noexcept { return in_payload_ ? received_ : 0; }
    const ReaderOptions& options() const noexcept { return options_; }
    /// Changes the largest frame accepted from the next header on (a
    /// server holds an unauthenticated peer to a few KiB, then lifts it).
    void set_max_frame(std::uint64_t max_frame) noexcept { options_.max_frame = max_frame; }

private:
    void pump();
    bool try_deliver();  // true: delivered (frame or error) or payload recv started
    void deliver(Frame frame, std::error_code ec);
    void on_header_bytes(engine::Lease staging, engine::IoResult r);
    void on_payload(engine::Lease payload, engine::IoResult r);
    void receive_payload(engine::Lease payload);
    void complete_payload(engine::Lease payload);

    engine::Stream& stream_;
    engine::BufferPool& pool_;
    ReaderOptions options_;
    ReaderStats stats_;
    Handler handler_;
    ProgressHandler progress_;
    engine::Lease staging_;
    std::size_t received_ = 0;  // payload bytes of the pending frame in its buffer
    std::size_t begin_ = 0, end_ = 0;  // buffered bytes in staging_
    FrameHeader pending_{};            // header of the payload being received
    bool busy_ = false;                // a recv is in flight
    bool delivering_ = false;
    bool header_only_ = false;
    std::size_t staging_target_ = 0;  // size of the next staging buffer leased
    bool in_payload_ = false;  // between a header and its frame's delivery
    std::uint64_t empty_run_ = 0;  // consecutive zero-length data frames
    std::size_t wanted_ = 0;  // bytes a small frame needs at begin_ (0: a header)
    bool failed_ = false;
    std::error_code failure_;
};

}  // namespace ringxfer::proto
