#include "ringxfer/proto/frame_writer.hpp"

#include <memory>

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

bool FrameWriter::try_write_gather(std::span<engine::Lease> parts, std::uint8_t flags,
                                   GatherHandler handler) {
    std::size_t payload = 0;
    for (const engine::Lease& p : parts) payload += p.size();
    std::size_t cost = kHeaderSize + payload;
    if (in_flight_ > 0 && in_flight_ + cost > options_.max_bytes_in_flight) {
        stats_.refused++;
        return false;
    }
    FrameHeader h;
    h.flags = flags;
    h.length = payload;
    if (options_.checksum) {
        h.flags |= kFlagChecksum;
        for (const engine::Lease& p : parts) h.checksum = crc32c(p.span(), h.checksum);
    } else {
        h.flags &= static_cast<std::uint8_t>(~kFlagChecksum);
    }
    // One send per part (the header rides in front of the first); the stream
    // keeps them in order and gathers them. What they share: the parts still
    // owed, the first error and the frame's handler. If the stream is
    // destroyed first, its handlers are dropped unrun and so is this.
    struct Gather {
        std::size_t left;
        std::error_code first_error;
        GatherHandler handler;
    };
    std::size_t sends = parts.empty() ? 1 : parts.size();
    auto g = std::make_shared<Gather>(Gather{sends, {}, std::move(handler)});
    in_flight_ += cost;
    stats_.frames++;
    stats_.payload_bytes += payload;
    for (std::size_t i = 0; i < sends; ++i) {
        engine::SendBuffers b;
        if (i == 0) {
            encode_header(h, std::span<std::byte, kHeaderSize>(b.prefix.data(), kHeaderSize));
            b.prefix_len = kHeaderSize;
        }
        if (!parts.empty()) {
            b.body_len = parts[i].size();
            b.body = std::move(parts[i]);
        }
        b.more = i + 1 < sends;  // the parts leave together
        std::size_t part_cost = b.prefix_len + b.body_len;
        stream_.send(std::move(b), [this, g, part_cost](engine::SendBuffers sent,
                                                        engine::IoResult r) mutable {
            in_flight_ -= part_cost;
            sent.body.reset();  // this part's memory is the caller's again
            if (r.err && !g->first_error) g->first_error = engine::errno_code(r.err);
            if (--g->left == 0) g->handler(g->first_error);
        });
    }
    return true;
}

}  // namespace ringxfer::proto
