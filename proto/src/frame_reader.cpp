#include "ringxfer/proto/frame_reader.hpp"

#include <algorithm>
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
    staging_target_ = options_.initial_staging_bytes
                          ? std::clamp(options_.initial_staging_bytes, kHeaderSize,
                                       options_.staging_bytes)
                          : options_.staging_bytes;
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
        // Need more bytes at begin_: a header, or a whole small frame.
        std::size_t have = end_ - begin_;
        std::size_t need = std::max(kHeaderSize, wanted_) - have;
        if (staging_ && have == 0 && staging_.unique()) begin_ = end_ = 0;
        // Small frames are handed out as views of the staging buffer, so
        // its bytes before begin_ may belong to frames still alive: never
        // move data over them. Receive after end_ while there is room;
        // otherwise move the leftover to the front of this buffer (no
        // views left) or of a fresh one (the views keep the old one alive).
        std::size_t min_room = header_only_ ? need : std::max(need, options_.staging_bytes / 8);
        if (!staging_ || staging_.size() - end_ < min_room) {
            // A small initial staging buffer is replaced, not reused, once
            // traffic raised the target (room for small frames kept whole).
            if (staging_ && staging_.unique() && staging_.size() >= staging_target_) {
                std::memmove(staging_.data(), staging_.data() + begin_, have);
            } else {
                engine::Lease fresh;
                int ret = pool_.lease(staging_target_, fresh);
                if (ret < 0) return deliver(Frame(), Errc::no_buffer);
                if (have) std::memcpy(fresh.data(), staging_.data() + begin_, have);
                staging_ = std::move(fresh);
            }
            stats_.copied_bytes += have;
            begin_ = 0;
            end_ = have;
        }
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
    // A small frame not all here yet: wait for the rest in the staging
    // buffer (one recv brings it and the frames behind it) instead of
    // leasing a buffer for it alone. Small: at most a quarter of staging,
    // and never more than fits behind its header (staging may be 16 bytes).
    const std::size_t small =
        std::min(options_.staging_bytes / 4, options_.staging_bytes - kHeaderSize);
    // (Not when the transport holds the payload whole, to hand over by
    // reference: shared memory.)
    if (h.length > have - kHeaderSize && h.length <= small &&
        !(have == kHeaderSize && stream_.payload_ready(h.length))) {
        wanted_ = kHeaderSize + static_cast<std::size_t>(h.length);
        return false;
    }
    wanted_ = 0;
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
    pending_ = h;
    engine::Lease payload;
    if (h.length > 0 && h.length <= have) {
        // All here: the frame is a view of the staging buffer, no copy.
        payload = staging_.share(begin_, h.length);
        begin_ += h.length;
        received_ = h.length;
        stats_.sliced_frames++;
    } else if (h.length > 0 && have == 0 && stream_.take_payload(h.length, payload)) {
        // Shared memory: the payload is the peer's, handed over whole.
        received_ = h.length;
        stats_.referenced_frames++;
    } else if (h.length > 0) {
        // A large frame: an exactly sized buffer, the bytes already here
        // copied into it, the rest received straight into it.
        int ret = pool_.lease(h.length, payload);
        if (ret < 0) {
            deliver(Frame(), Errc::no_buffer);
            return true;
        }
        std::memcpy(payload.data(), staging_.data() + begin_, have);
        begin_ += have;
        stats_.copied_bytes += have;
        received_ = have;
    } else {
        received_ = 0;
    }
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
    if (r.bytes > 0) staging_target_ = options_.staging_bytes;  // not idle: full size from now
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
