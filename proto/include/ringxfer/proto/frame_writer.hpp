// FrameWriter: sends Frames in order without copying their payloads.
//
// Each frame goes out as one gather send: the 16-byte header (built inline in
// the operation) followed by the payload straight from the frame's pooled
// buffer (or SEND_ZC from the registered buffer, when the stream is set up
// for zero-copy). The frame is handed back to the caller's handler once the
// kernel no longer needs its memory, so senders can reuse buffers.
//
// A frame may also be written from several buffers (try_write_gather): the
// header and every part are queued together (SendBuffers::more) and leave
// gathered into one SENDMSG (up to the stream's gather limits: 128 sends,
// 1 MiB), never joined into one buffer.
//
// Back-pressure: try_write() refuses (returns false, leaving the frame with
// the caller) when accepting the frame would put more than
// max_bytes_in_flight bytes in the queue; a handler run is the signal to try
// again. A frame larger than the bound is accepted when the queue is empty.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <system_error>

#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame.hpp"

namespace ringxfer::proto {

struct WriterOptions {
    std::size_t max_bytes_in_flight = std::size_t{256} << 20;
    bool checksum = false;  ///< compute CRC32C and set header flag bit 0
};

struct WriterStats {
    std::uint64_t frames = 0;
    std::uint64_t payload_bytes = 0;
    std::uint64_t refused = 0;  ///< try_write() calls refused by back-pressure
};

class FrameWriter {
public:
    /// Gets the frame back (payload intact) with the outcome.
    using Handler = engine::Callback<void(Frame, std::error_code)>;

    FrameWriter(engine::Stream& stream, WriterOptions options = {});

    /// Queues `frame` (moved from on success). See back-pressure above.
    bool try_write(Frame& frame, Handler handler);

    /// Runs once the kernel is done with every part of a gathered frame.
    using GatherHandler = engine::Callback<void(std::error_code)>;

    /// Queues one frame whose payload is `parts` in order (empty leases are
    /// zero-length parts). On success the leases are moved from; each is
    /// dropped as soon as the kernel no longer needs it, and `handler` runs
    /// after the last, with the first error of any part. Back-pressure,
    /// `flags` and the checksum (over all parts) as try_write().
    bool try_write_gather(std::span<engine::Lease> parts, std::uint8_t flags,
                          GatherHandler handler);

    std::size_t bytes_in_flight() const noexcept { return in_flight_; }
    const WriterStats& stats() const noexcept { return stats_; }

private:
    engine::Stream& stream_;
    WriterOptions options_;
    WriterStats stats_;
    std::size_t in_flight_ = 0;
};

}  // namespace ringxfer::proto
