// Fuzz target: FrameReader's state machine (proto/src/frame_reader.cpp).
//
// The input (layout in reader_input.hpp) picks the reader's options, how the
// application reads (from inside the handler or outside, holding frames or
// not, giving up after some frames) and the peer's bytes and chunk sizes.
// The bytes reach the reader through rxtest::MemoryStream: no sockets, no
// ring. A separate walk over the same bytes (expect()) says what the reader
// must report; any difference aborts:
// - every delivered frame has its header's length and flags and the bytes
//   that were sent; a delivered checksum-flagged frame has a matching CRC32C
//   (when verification is on); frames kept until the end (small ones are
//   views of the staging buffer) still hold those bytes then;
// - a rejection is reported once, as the expected proto error (or the
//   transport's errno), with no frame, and read() after it repeats it;
// - progress reports name the frame's header and only report bytes that
//   arrived, never more than the frame's length;
// - the reader never waits without a recv pending;
// - once the reader and its frames are gone, nothing is leased from the pool.
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <system_error>
#include <utility>
#include <vector>

#include "memory_stream.hpp"
#include "reader_input.hpp"
#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/crc32c.hpp"
#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/header.hpp"

using namespace ringxfer;
using namespace ringxfer::proto;
using rxfuzz::ReaderInput;

namespace {

void check(bool ok, const char* what) {
    if (ok) return;
    std::fprintf(stderr, "fuzz_frame_reader: invariant violated: %s\n", what);
    std::abort();
}

/// A frame whose header the reader accepts, and where its payload starts.
struct Accepted {
    FrameHeader header;
    std::size_t offset;
};

struct Expected {
    std::vector<Accepted> frames;  ///< every accepted header, in order
    std::size_t complete = 0;      ///< how many of them are delivered
    std::error_code end;           ///< then this error
};

/// What the reader must report for `wire`, walked frame by frame.
Expected expect(std::span<const std::byte> wire, const ReaderOptions& ro, std::size_t max_buffer,
                bool reset_at_end) {
    const std::error_code reset = engine::errno_code(-ECONNRESET);
    Expected e;
    std::size_t pos = 0;
    std::uint64_t empty_run = 0;
    for (;;) {
        const std::size_t left = wire.size() - pos;
        if (left == 0) {
            e.end = reset_at_end ? reset : make_error_code(Errc::closed);
            return e;
        }
        if (left < kHeaderSize) break;
        FrameHeader h;
        e.end = decode_header(wire.subspan(pos).first<kHeaderSize>(), ro.max_frame, h);
        if (e.end) return e;
        if (h.length == 0 && !(h.flags & kFlagControl)) {
            if (ro.max_consecutive_empty && ++empty_run > ro.max_consecutive_empty) {
                e.end = Errc::too_many_empty;
                return e;
            }
        } else {
            empty_run = 0;
        }
        if (h.length > max_buffer) {
            e.end = Errc::no_buffer;
            return e;
        }
        pos += kHeaderSize;
        e.frames.push_back({h, pos});
        if (wire.size() - pos < h.length) break;
        if ((h.flags & kFlagChecksum) && ro.verify_checksum &&
            crc32c(wire.subspan(pos, h.length)) != h.checksum) {
            e.end = Errc::checksum_mismatch;
            return e;
        }
        pos += h.length;
        e.complete++;
    }
    e.end = reset_at_end ? reset : make_error_code(Errc::truncated);  // ran out mid-frame
    return e;
}

bool same_header(const FrameHeader& a, const FrameHeader& b) {
    return a.flags == b.flags && a.checksum == b.checksum && a.length == b.length;
}

engine::BufferPool& pool_for(bool small) {
    // One pool per kind for the whole run: its regions are mapped once. Each
    // input must leave nothing leased, which is one of the invariants.
    auto options = [](std::size_t max_buffer) {
        engine::PoolOptions po;
        po.max_buffer_bytes = max_buffer;
        po.register_buffers = false;  // no ring here
        po.huge_pages = false;
        return po;
    };
    static engine::BufferPool normal(nullptr, options(rxfuzz::kMaxFrame));
    static engine::BufferPool small_buffers(nullptr, options(rxfuzz::kSmallBufferBytes));
    return small ? small_buffers : normal;
}

class Run {
  public:
    Run(const ReaderInput& in, engine::BufferPool& pool, ReaderOptions ro)
        : in_(in),
          stream_(std::make_unique<rxtest::MemoryStream>(
              in.wire, in.chunks, (in.setup & rxfuzz::kResetAtEnd) ? -ECONNRESET : 0)),
          reader_(std::make_unique<FrameReader>(*stream_, pool, ro)),
          expected_(expect(in.wire, reader_->options(), pool.options().max_buffer_bytes,
                           in.setup & rxfuzz::kResetAtEnd)),
          stop_after_(in.app >> rxfuzz::kStopShift) {}

    void go() {
        while (!ended_ && !stopped()) {
            if (!reading_) start_read();
            if (!reading_) continue;  // delivered at once, from buffered bytes
            check(stream_->in_flight() > 0, "the reader waits for a frame with no recv pending");
            stream_->run_once();
        }
        if (ended_) {
            check(reader_->stats().frames == delivered_, "stats().frames differs from deliveries");
            // A failed stream stays failed: read() reports the same error at once.
            bool again = false;
            reader_->read([&](Frame f, std::error_code ec) {
                check(!f.lease() && ec == expected_.end, "a second read() after the end differs");
                again = true;
            });
            check(again, "a second read() after the end did not answer at once");
        } else {
            check(delivered_ == stop_after_, "stopped early");
        }
        // Tear down as an application would: the stream first (its pending
        // recv and lease are dropped, the handler never runs), then the reader.
        stream_.reset();
        reader_.reset();
        for (const auto& [f, offset] : held_)
            check(f.size() == 0 ||
                      std::memcmp(f.payload().data(), in_.wire.data() + offset, f.size()) == 0,
                  "a frame kept by the application changed after delivery");
        held_.clear();
    }

  private:
    bool stopped() const { return stop_after_ != 0 && delivered_ >= stop_after_; }

    void start_read() {
        reading_ = true;
        FrameReader::ProgressHandler progress;
        if (in_.setup & rxfuzz::kProgress) {
            progress = [this](const FrameHeader& h, const engine::Lease& payload,
                              std::size_t ready) { on_progress(h, payload, ready); };
        }
        reader_->read([this](Frame f, std::error_code ec) { on_frame(std::move(f), ec); },
                      std::move(progress));
    }

    void on_frame(Frame f, std::error_code ec) {
        check(reading_, "a handler ran without a read()");
        check(!ended_, "the handler ran after the stream ended");
        reading_ = false;
        progress_frame_ = SIZE_MAX;
        if (ec) {
            check(ec == expected_.end, "the stream ended with a different error");
            check(delivered_ == expected_.complete,
                  "the stream ended after a different frame count");
            check(!f.lease(), "an error came with a frame");
            ended_ = true;
            return;
        }
        check(delivered_ < expected_.complete, "a frame was delivered beyond the last valid one");
        const Accepted& a = expected_.frames[delivered_];
        check(f.size() == a.header.length, "delivered frame length differs from its header");
        check(f.flags() == a.header.flags, "delivered frame flags differ from its header");
        check(f.size() == 0 ||
                  std::memcmp(f.payload().data(), in_.wire.data() + a.offset, f.size()) == 0,
              "delivered payload differs from the bytes sent");
        if ((a.header.flags & kFlagChecksum) && reader_->options().verify_checksum)
            check(crc32c(f.payload()) == a.header.checksum, "delivered frame fails its CRC32C");
        delivered_++;
        if (in_.app & rxfuzz::kHoldFrames) held_.emplace_back(std::move(f), a.offset);
        if ((in_.app & rxfuzz::kChained) && !stopped()) start_read();
    }

    void on_progress(const FrameHeader& h, const engine::Lease& payload, std::size_t ready) {
        check(reading_, "progress without a read()");
        check(delivered_ < expected_.frames.size(), "progress for a header that was not accepted");
        const Accepted& a = expected_.frames[delivered_];
        check(same_header(h, a.header), "progress names a different header");
        check(payload.size() == h.length, "progress buffer is not the frame's size");
        check(ready <= h.length, "progress reports more bytes than the frame has");
        std::size_t prev = progress_frame_ == delivered_ ? progress_ready_ : 0;
        check(ready >= prev, "progress went backwards");
        check(ready == prev || std::memcmp(payload.data() + prev, in_.wire.data() + a.offset + prev,
                                           ready - prev) == 0,
              "progress reports bytes that differ from the bytes sent");
        progress_frame_ = delivered_;
        progress_ready_ = ready;
    }

    const ReaderInput& in_;
    std::unique_ptr<rxtest::MemoryStream> stream_;
    std::unique_ptr<FrameReader> reader_;
    const Expected expected_;
    const std::size_t stop_after_;
    std::vector<std::pair<Frame, std::size_t>> held_;  // with its payload's offset in the wire
    std::size_t delivered_ = 0;
    bool reading_ = false;
    bool ended_ = false;
    std::size_t progress_frame_ = SIZE_MAX;
    std::size_t progress_ready_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const ReaderInput in = ReaderInput::parse(data, size);
    ReaderOptions ro;
    ro.max_frame = rxfuzz::kMaxFrame;
    ro.staging_bytes = rxfuzz::kStagingSizes[(in.setup >> rxfuzz::kStagingShift) & 3];
    ro.verify_checksum = in.setup & rxfuzz::kVerifyChecksum;
    ro.progress_bytes = (in.setup & rxfuzz::kProgressEveryByte) ? 0 : 3;
    if (in.setup & rxfuzz::kFewEmpty) ro.max_consecutive_empty = 2;
    engine::BufferPool& pool = pool_for(in.setup & rxfuzz::kSmallBuffers);
    Run(in, pool, ro).go();
    const engine::PoolStats s = pool.stats();
    check(s.leased_buffers == 0 && s.leased_bytes == 0, "pool leases outlive the reader");
    return 0;
}
