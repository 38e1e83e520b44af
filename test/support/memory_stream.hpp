// MemoryStream: an engine::Stream over bytes held in memory, for driving
// proto/ without sockets or a ring (the fuzz targets, unit tests).
//
// The peer's bytes are given up front, with a schedule of chunk sizes: each
// run_once() "receives" one chunk into the pending recv, as one short read
// of a socket would, and completes the recv once it has its `min` bytes.
// When the input runs out first the recv completes like a socket's: `eof`
// (clean close), or `end_error` (e.g. -ECONNRESET) when one was given.
// Nothing completes inside recv()/send() itself, so handlers never run
// re-entrantly from the caller's own call, just as with SocketStream.
//
// run_once()/in_flight() have the shapes rxtest::drive() and drain() expect.
// Contract violations by the caller (two recvs at once, min == 0, a range
// outside the lease) abort, in every build type: a fuzz target must see them.
//
// Ownership: like SocketStream, the stream owns a pending operation's lease
// and handler until it completes; destroying the stream drops both without
// calling the handler.
#pragma once

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "ringxfer/engine/stream.hpp"

namespace rxtest {

class MemoryStream final : public ringxfer::engine::Stream {
  public:
    /// `chunks`: sizes of successive reads, cycled; 0 (or an empty schedule)
    /// means "all that is left". The input is not copied: keep it alive.
    explicit MemoryStream(std::span<const std::byte> input, std::vector<std::size_t> chunks = {},
                          int end_error = 0)
        : input_(input), chunks_(std::move(chunks)), end_error_(end_error) {}

    void recv(ringxfer::engine::Lease lease, std::size_t offset, std::size_t min, std::size_t max,
              ringxfer::engine::RecvHandler handler) override {
        require(!recv_, "one recv in flight per stream");
        require(min >= 1 && min <= max, "recv needs 1 <= min <= max");
        require(offset <= lease.capacity() && max <= lease.capacity() - offset,
                "recv range outside the lease");
        recv_.emplace(PendingRecv{std::move(lease), offset, min, max, 0, std::move(handler)});
    }

    /// Sends complete on the next run_once(); their bytes are kept in sent().
    void send(ringxfer::engine::SendBuffers buffers,
              ringxfer::engine::SendHandler handler) override {
        require(buffers.prefix_len <= buffers.prefix.size(), "send prefix too long");
        sends_.emplace_back(std::move(buffers), std::move(handler));
    }

    /// Pending operations complete with -ECANCELED on the next run_once().
    void close() override { closed_ = true; }

    std::string peer() const override { return "memory"; }
    const ringxfer::engine::StreamCounters& counters() const override { return counters_; }

    /// Operations waiting for run_once().
    std::size_t in_flight() const noexcept { return (recv_ ? 1 : 0) + sends_.size(); }

    /// Completes the queued sends, then moves one chunk into the pending recv
    /// (completing it when it has enough). Returns the number of handlers run.
    /// The arguments mirror Ring::run_once and are ignored: nothing waits.
    int run_once(unsigned = 1, std::chrono::nanoseconds = {}) {
        int ran = complete_sends();
        if (recv_) ran += step_recv();
        return ran;
    }

    std::size_t remaining() const noexcept { return input_.size() - pos_; }
    const std::vector<std::byte>& sent() const noexcept { return sent_; }

  private:
    struct PendingRecv {
        ringxfer::engine::Lease lease;
        std::size_t offset, min, max, got;
        ringxfer::engine::RecvHandler handler;
    };

    static void require(bool ok, const char* what) {
        if (ok) return;
        std::fprintf(stderr, "MemoryStream: contract violated: %s\n", what);
        std::abort();
    }

    int complete_sends() {
        auto sends = std::move(sends_);  // handlers may queue more: next run
        sends_.clear();
        for (auto& [b, h] : sends) {
            ringxfer::engine::IoResult r;
            if (closed_) {
                r.err = -ECANCELED;
            } else {
                sent_.insert(sent_.end(), b.prefix.begin(), b.prefix.begin() + b.prefix_len);
                if (b.body_len) {
                    require(b.body_offset <= b.body.size() &&
                                b.body_len <= b.body.size() - b.body_offset,
                            "send body outside its lease");
                    const std::byte* p = b.body.data() + b.body_offset;
                    sent_.insert(sent_.end(), p, p + b.body_len);
                }
                r.bytes = b.prefix_len + b.body_len;
                counters_.bytes_sent += r.bytes;
                counters_.send_ops++;
            }
            h(std::move(b), r);
        }
        return static_cast<int>(sends.size());
    }

    int step_recv() {
        PendingRecv& op = *recv_;
        ringxfer::engine::IoResult r;
        if (closed_) {
            r.err = -ECANCELED;
        } else if (remaining() == 0) {
            if (end_error_)
                r.err = end_error_;
            else
                r.eof = true;
        } else {
            std::size_t chunk = chunks_.empty() ? 0 : chunks_[next_chunk_++ % chunks_.size()];
            std::size_t n = std::min(op.max - op.got, remaining());
            if (chunk) n = std::min(n, chunk);
            std::memcpy(op.lease.data() + op.offset + op.got, input_.data() + pos_, n);
            pos_ += n;
            op.got += n;
            counters_.bytes_received += n;
            counters_.recv_ops++;
            if (op.got < op.min) return 0;  // a short read: resumed on the next run
        }
        r.bytes = op.got;
        PendingRecv done = std::move(op);
        recv_.reset();  // before the handler, which may start the next recv
        done.handler(std::move(done.lease), r);
        return 1;
    }

    std::span<const std::byte> input_;
    std::vector<std::size_t> chunks_;
    int end_error_;
    std::size_t pos_ = 0;
    std::size_t next_chunk_ = 0;
    bool closed_ = false;
    std::optional<PendingRecv> recv_;
    std::vector<std::pair<ringxfer::engine::SendBuffers, ringxfer::engine::SendHandler>> sends_;
    std::vector<std::byte> sent_;
    ringxfer::engine::StreamCounters counters_;
};

}  // namespace rxtest
