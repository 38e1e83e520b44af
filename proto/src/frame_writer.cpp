#include "ringxfer/proto/frame_writer.hpp"

#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/crc32c.hpp"

namespace ringxfer::proto {

FrameWriter::FrameWriter(engine::Stream& stream, WriterOptions options)
    : stream_(stream), options_(options) {}

bool FrameWriter::try_write(Frame& frame, Handler handler) {
    std::size_t cost = kHeaderSize + frame.size();
    if (in_flight_ > 0 && in_flight_ + cost > options_.max_bytes_in_flight) {
        stats_.refused++;
        return false;
    }
    FrameHeader h;
    h.flags = frame.flags();
    h.length = frame.size();
    if (options_.checksum) {
        h.flags |= kFlagChecksum;
        h.checksum = crc32c(frame.payload());
    } else {
        h.flags &= static_cast<std::uint8_t>(~kFlagChecksum);
    }
    engine::SendBuffers b;
    encode_header(h, std::span<std::byte, kHeaderSize>(b.prefix.data(), kHeaderSize));
    b.prefix_len = kHeaderSize;
    b.body_len = frame.size();
    b.user = frame.flags();
    b.body = std::move(frame).release();
    in_flight_ += cost;
    stats_.frames++;
    stats_.payload_bytes += b.body_len;
    stream_.send(std::move(b), [this, cost, handler = std::move(handler)](
                                   engine::SendBuffers sent, engine::IoResult r) mutable {
        in_flight_ -= cost;
        Frame f(std::move(sent.body), static_cast<std::uint8_t>(sent.user));
        handler(std::move(f), r.err ? engine::errno_code(r.err) : std::error_code{});
    });
    return true;
}

}  // namespace ringxfer::proto
