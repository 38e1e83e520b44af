#include "ringxfer/proto/frame_reader.hpp"

#include <cstring>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/crc32c.hpp"
#include "ringxfer/proto/errors.hpp"

namespace ringxfer::proto {

int Frame::allocate(engine::BufferPool& pool, std::size_t size, Frame& out, std::uint8_t flags) {
    engine::Lease lease;
    int ret = pool.lease(size, lease);
    if (ret < 0) return ret;
    out = Frame(std::move(lease), flags);
    return 0;
}

FrameReader::FrameReader(engine::Stream& stream, engine::BufferPool& pool, ReaderOptions options)
    : stream_(stream), pool_(pool), options_(options) {
    if (options_.staging_bytes < kHeaderSize) options_.staging_bytes = kHeaderSize;
}

void FrameReader::read(Handler handler, ProgressHandler progress) {
    handler_ = std::move(handler);
    progress_ = std::move(progress);
    if (failed_) {
        // A stream that failed stays failed: report it again, never hang.
        deliver(Frame(), failure_);
        return;
    }
    if (!delivering_ && !busy_) pump();
}

void FrameReader::deliver(Frame frame, std::error_code ec) {
    if (ec) {
        failed_ = true;
        failure_ = ec;
    }
    Handler h = std::move(handler_);
    handler_ = nullptr;
    progress_ = nullptr;
    delivering_ = true;
    h(std::move(frame), ec);
    delivering_ = false;
}

// Runs frames out of the staging buffer until one needs the network. The
// loop (instead of recursion from handlers) bounds the stack however many
// small frames one read brought in.
void FrameReader::pump() {
    while (handler_ && !busy_ && !failed_) {
        if (try_deliver()) continue;
        // Need more header bytes: move the partial header to the front and
        // receive after it.
        if (!staging_) {
            int ret = pool_.lease(options_.staging_bytes, staging_);
            if (ret < 0) return deliver(Frame(), Errc::no_buffer);
        }
        std::size_t have = end_ - begin_;
        if (begin_ > 0) {
            std::memmove(staging_.data(), staging_.data() + begin_, have);
            begin_ = 0;
            end_ = have;
        }
        std::size_t need = kHeaderSize - have;
        std::size_t room = header_only_ ? need : staging_.size() - end_;
        busy_ = true;
        stream_.recv(std::move(staging_), end_, need, room,
                     [this](engine::Lease l, engine::IoResult r) { on_header_bytes(std::move(l), r); });
        return;
    }
}

bool FrameReader::try_deliver() {
    std::size_t have = end_ - begin_;
    if (have < kHeaderSize) return false;
    FrameHeader h;
    std::error_code ec = decode_header(
        std::span<const std::byte, kHeaderSize>(staging_.data() + begin_, kHeaderSize),
        options_.max_frame, h);
    if (ec) {
        deliver(Frame(), ec);
        return true;
    }
    if (h.length == 0 && !(h.flags & kFlagControl)) {
        if (options_.max_consecutive_empty && ++empty_run_ > options_.max_consecutive_empty) {
            deliver(Frame(), Errc::too_many_empty);
            return true;
        }
    } else {
        empty_run_ = 0;
    }
    begin_ += kHeaderSize;
    have -= kHeaderSize;
    header_only_ = h.length >= options_.staging_bytes;
    in_payload_ = true;
    Frame frame;
    if (h.length > 0) {
        engine::Lease payload;
        int ret = pool_.lease(h.length, payload);
        if (ret < 0) {
            deliver(Frame(), Errc::no_buffer);
            return true;
        }
        frame = Frame(std::move(payload), h.flags);
    } else {
        frame = Frame(engine::Lease(), h.flags);
    }
    std::size_t n = std::min<std::size_t>(have, h.length);
    if (n) {
        std::memcpy(frame.mutable_payload().data(), staging_.data() + begin_, n);
        begin_ += n;
        stats_.copied_bytes += n;
    }
    if (begin_ == end_) begin_ = end_ = 0;
    pending_ = h;
    received_ = n;
    engine::Lease payload = std::move(frame).release();
    if (progress_) progress_(pending_, payload, received_);
    if (received_ == h.length) {
        complete_payload(std::move(payload));
    } else {
        receive_payload(std::move(payload));
    }
    return true;
}

void FrameReader::receive_payload(engine::Lease payload) {
    std::size_t rest = pending_.length - received_;
    // progress_bytes 0 means "report every arrival": at least one byte.
    std::size_t step = std::max<std::size_t>(1, options_.progress_bytes);
    std::size_t min = progress_ ? std::min(rest, step) : rest;
    busy_ = true;
    stream_.recv(std::move(payload), received_, min, rest,
                 [this](engine::Lease l, engine::IoResult r) { on_payload(std::move(l), r); });
}

void FrameReader::on_header_bytes(engine::Lease staging, engine::IoResult r) {
    busy_ = false;
    staging_ = std::move(staging);
    end_ += r.bytes;
    if (r.err) return deliver(Frame(), engine::errno_code(r.err));
    if (r.eof) return deliver(Frame(), end_ == begin_ ? Errc::closed : Errc::truncated);
    pump();
}

void FrameReader::on_payload(engine::Lease payload, engine::IoResult r) {
    busy_ = false;
    if (r.err) return deliver(Frame(), engine::errno_code(r.err));
    if (r.eof) return deliver(Frame(), Errc::truncated);
    received_ += r.bytes;
    if (progress_) progress_(pending_, payload, received_);
    if (received_ < pending_.length) return receive_payload(std::move(payload));
    complete_payload(std::move(payload));
    pump();
}

void FrameReader::complete_payload(engine::Lease payload) {
    in_payload_ = false;
    Frame frame(std::move(payload), pending_.flags);
    if ((pending_.flags & kFlagChecksum) && options_.verify_checksum &&
        crc32c(frame.payload()) != pending_.checksum) {
        return deliver(Frame(), Errc::checksum_mismatch);
    }
    stats_.frames++;
    stats_.payload_bytes += frame.size();
    deliver(std::move(frame), {});
}

}  // namespace ringxfer::proto
