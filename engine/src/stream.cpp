#include "ringxfer/engine/stream.hpp"

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "ringxfer/engine/error.hpp"

namespace ringxfer::engine {
namespace {

// Results that mean "nothing happened, try again": EINTR, EAGAIN (a socket
// that was not ready where the kernel does not poll for us), ENOBUFS (the
// kernel was short of memory or, with provided buffers, of buffers). Retried
// at once, at most this many times in a row, then reported, so a fault that
// persists can never spin a connection forever.
constexpr int kMaxRetries = 1000;

bool retryable(int res) { return res == -EINTR || res == -EAGAIN || res == -ENOBUFS; }

}  // namespace

// ---------------------------------------------------------------------------
// RecvOp: owns the lease until its final CQE; resumes short reads.
class RecvOp final : public Completion {
public:
    explicit RecvOp(SocketStream* s) : stream_(s), ring_(s->ring_), fd_(s->fd()) {}

    /// (Re)arms the operation for one recv; a stream reuses its RecvOp.
    void start(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
               RecvHandler handler) {
        lease_ = std::move(lease);
        offset_ = offset;
        min_ = min;
        max_ = max;
        got_ = 0;
        retries_ = 0;
        handler_ = std::move(handler);
        submit();
    }

    void submit() {
        io_uring_sqe* sqe = ring_.sqe(this);
        std::byte* p = lease_.data() + offset_ + got_;
        std::size_t len = max_ - got_;
        if (stream_->options_.read_fixed && lease_.buf_index() >= 0) {
            io_uring_prep_read_fixed(sqe, fd_, p, static_cast<unsigned>(len), 0,
                                     lease_.buf_index());
        } else {
            // A raised SO_RCVLOWAT wakes the poll once that many bytes are
            // queued; each CQE then sets it anew for what is left. It must
            // not be combined with MSG_WAITALL: the kernel would re-arm the
            // poll itself for the shrinking rest and wait forever for a low
            // water mark above it. Otherwise MSG_WAITALL: the kernel loops
            // until `len` bytes (or EOF/error) when we need them all,
            // instead of one CQE per socket wakeup.
            bool lowat = stream_->set_rcvlowat(min_ - got_);
            io_uring_prep_recv(sqe, fd_, p, len, min_ == max_ && !lowat ? MSG_WAITALL : 0);
            // The last recv drained the socket (it returned less than it
            // could take): the next one will almost surely find nothing, so
            // skip the inline attempt and arm the poll at once (request/
            // response traffic; measured in docs/performance.md).
            if (stream_->drained_ && stream_->options_.poll_first)
                sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
        }
        stream_->counters_.recv_ops++;
    }

    void detach() { stream_ = nullptr; }

    void complete(int32_t res, uint32_t) override {
        if (stream_ == nullptr) {  // stream gone: release buffers, no handler
            delete this;
            return;
        }
        if (res > 0) {
            retries_ = 0;
            stream_->drained_ = static_cast<std::size_t>(res) < max_ - got_;
            got_ += static_cast<std::size_t>(res);
            stream_->counters_.bytes_received += static_cast<std::size_t>(res);
            if (got_ < min_) return submit();
        } else if (retryable(res) && ++retries_ <= kMaxRetries) {
            stream_->counters_.retries++;
            return submit();
        }
        IoResult r;
        r.bytes = got_;
        r.err = res < 0 ? res : 0;
        r.eof = res == 0 && got_ < min_;
        RecvHandler h = std::move(handler_);
        Lease l = std::move(lease_);
        // Kept for the next recv (the handler usually asks for one at once):
        // no allocation per recv.
        stream_->recv_op_ = nullptr;
        stream_->spare_recv_.reset(this);
        h(std::move(l), r);
    }

private:
    SocketStream* stream_;
    Ring& ring_;
    int fd_;
    Lease lease_;
    std::size_t offset_ = 0, min_ = 0, max_ = 0, got_ = 0;
    int retries_ = 0;
    RecvHandler handler_;
};

// ---------------------------------------------------------------------------
// SendOp: owns prefix, body lease and iovecs/msghdr. Queued per stream so
// sends leave in order; only the head of the queue is in the kernel. With
// zero-copy the op outlives its last result CQE until every notification has
// arrived; the stream moves on to the next send meanwhile.
class SendOp final : public Completion {
public:
    explicit SendOp(SocketStream* s) : stream_(s), ring_(s->ring_), fd_(s->fd()) {}

    /// (Re)arms the operation for one send; a stream reuses finished ones.
    void arm(SendBuffers b, SendHandler h) {
        buf_ = std::move(b);
        handler_ = std::move(h);
        next = nullptr;
        riders_ = orphans_ = 0;
        sent_ = 0;
        err_ = retries_ = notifs_pending_ = 0;
        inline_ = results_done_ = false;
        zerocopy_ = stream_->options_.zerocopy_threshold != 0 && !stream_->zerocopy_off_ &&
                    buf_.body_len >= stream_->options_.zerocopy_threshold &&
                    ring_.features().op_send_zc;
    }

    SendOp* next = nullptr;

    std::size_t total() const { return buf_.prefix_len + buf_.body_len; }

    void submit() {
        std::size_t prefix_left = buf_.prefix_len > sent_ ? buf_.prefix_len - sent_ : 0;
        std::size_t body_done = sent_ - (buf_.prefix_len - prefix_left);
        std::byte* body = buf_.body.data() + buf_.body_offset + body_done;
        std::size_t body_left = buf_.body_len - body_done;
        // A small send with nothing queued behind it: header and payload
        // copied next to each other once, then a plain SEND. SENDMSG's
        // msghdr and iovec import cost more than the copy at this size
        // (bench/peers/lat_modes --sendmsg: 64-byte ping-pong p50 1.10x).
        if (!inline_ && sent_ == 0 && !zerocopy_ && next == nullptr &&
            total() <= std::min(stream_->options_.inline_send_max,
                                 SocketStreamOptions::kInlineSendLimit)) {
            if (!inline_buf_)
                inline_buf_ = std::make_unique_for_overwrite<std::byte[]>(
                    SocketStreamOptions::kInlineSendLimit);
            inline_ = true;
            std::memcpy(inline_buf_.get(), buf_.prefix.data(), buf_.prefix_len);
            if (buf_.body_len)
                std::memcpy(inline_buf_.get() + buf_.prefix_len,
                            buf_.body.data() + buf_.body_offset, buf_.body_len);
            stream_->counters_.inline_sends++;
            stream_->counters_.send_copied_bytes += buf_.body_len;
        }
        io_uring_sqe* sqe = ring_.sqe(this);
        if (inline_) {
            io_uring_prep_send(sqe, fd_, inline_buf_.get() + sent_, total() - sent_,
                               MSG_NOSIGNAL | MSG_WAITALL);
            riders_ = 0;
        } else if (zerocopy_ && prefix_left == 0) {
            // Body alone, zero-copy; fixed buffer when registered.
            io_uring_prep_send_zc(sqe, fd_, body, body_left, MSG_NOSIGNAL | MSG_WAITALL,
                                  IORING_SEND_ZC_REPORT_USAGE);
            if (buf_.body.buf_index() >= 0) {
                sqe->ioprio |= IORING_RECVSEND_FIXED_BUF;
                sqe->buf_index = static_cast<__u16>(buf_.body.buf_index());
            }
            ++notifs_pending_;
            stream_->counters_.zc_sends++;
        } else if (zerocopy_) {
            // Prefix first (a few bytes, copied); MSG_MORE keeps it in the
            // same segment as the body that follows.
            io_uring_prep_send(sqe, fd_, buf_.prefix.data() + sent_, prefix_left,
                               MSG_NOSIGNAL | MSG_WAITALL | MSG_MORE);
        } else {
            // Gather: this send's remaining bytes, then whole sends queued
            // behind it (riders), in one SENDMSG. Riders have not reached
            // the kernel yet, so they are whole and their buffers are ours.
            iov_.clear();
            append_iov(iov_, sent_);
            riders_ = 0;
            std::size_t bytes = total() - sent_;
            for (SendOp* r = next; r != nullptr && !r->zerocopy_ && riders_ < kMaxRiders &&
                                   bytes < kMaxGatherBytes;
                 r = r->next) {
                r->append_iov(iov_, 0);
                bytes += r->total();
                ++riders_;
            }
            msg_ = {};
            msg_.msg_iov = iov_.data();
            msg_.msg_iovlen = iov_.size();
            io_uring_prep_sendmsg(sqe, fd_, &msg_, MSG_NOSIGNAL | MSG_WAITALL);
            if (riders_) stream_->counters_.gathered_sends += riders_;
        }
        stream_->counters_.send_ops++;
    }

    /// Adds iovecs for this send's bytes from `from` on (prefix, then body).
    void append_iov(std::vector<iovec>& v, std::size_t from) {
        if (from < buf_.prefix_len) v.push_back({buf_.prefix.data() + from, buf_.prefix_len - from});
        std::size_t body_done = from > buf_.prefix_len ? from - buf_.prefix_len : 0;
        if (body_done < buf_.body_len)
            v.push_back({buf_.body.data() + buf_.body_offset + body_done, buf_.body_len - body_done});
    }

    /// Hands `n` bytes the kernel took to this send and its riders, in order;
    /// marks the sends it completed.
    void distribute(std::size_t n) {
        SendOp* op = this;
        for (unsigned i = 0; op != nullptr && i <= riders_; ++i, op = op->next) {
            std::size_t take = std::min(n, op->total() - op->sent_);
            op->sent_ += take;
            n -= take;
            if (op != this && op->sent_ == op->total()) op->results_done_ = true;
        }
        riders_ = 0;
    }

    bool fully_sent() const { return sent_ >= total(); }

    void detach() { stream_ = nullptr; }

    void complete(int32_t res, uint32_t flags) override {
        if (flags & IORING_CQE_F_NOTIF) {
            // res carries IORING_NOTIF_USAGE_ZC_COPIED when the kernel copied.
            if (stream_) stream_->note_zerocopy_usage(static_cast<uint32_t>(res) &
                                                      IORING_NOTIF_USAGE_ZC_COPIED);
            --notifs_pending_;
            return maybe_finish();
        }
        if (flags & IORING_CQE_F_MORE) {
            // A zero-copy result whose notification is still to come; the
            // counter was raised at submit.
        } else if (zerocopy_ && (sent_ >= buf_.prefix_len)) {
            // Zero-copy request that failed before taking a reference: no
            // notification will follow.
            --notifs_pending_;
        }
        if (stream_ == nullptr) {
            results_done_ = true;
            return maybe_finish();
        }
        if (res > 0) {
            retries_ = 0;
            distribute(static_cast<std::size_t>(res));
            stream_->counters_.bytes_sent += static_cast<std::size_t>(res);
            if (sent_ < total()) return submit();
        } else if (retryable(res) && ++retries_ <= kMaxRetries) {
            stream_->counters_.retries++;
            return submit();
        } else if (res == 0 && total() > sent_) {
            err_ = -EPIPE;
        }
        if (res < 0) err_ = res;
        riders_ = 0;  // on failure the riders were not sent: they go next
        results_done_ = true;
        SocketStream* s = stream_;
        s->pop_head(this);
        // This send's handler first (handlers run in send order), then the
        // next queued send, unless the handler destroyed the stream.
        std::shared_ptr<bool> alive = s->alive_;
        maybe_finish();
        if (*alive) s->start_head();
    }

private:
    friend class SocketStream;

    void maybe_finish() {
        if (!results_done_ || notifs_pending_ > 0) return;
        if (stream_) std::erase(stream_->lingering_, this);
        if (stream_ == nullptr || !handler_) {
            // A stream destroyed while this send was in the kernel left the
            // riders of its gather with it: their bytes were in the SQE.
            for (unsigned i = 0; i < orphans_; ++i) {
                SendOp* r = next;
                next = r->next;
                delete r;
            }
            delete this;
            return;
        }
        SendHandler h = std::move(handler_);
        SendBuffers b = std::move(buf_);
        IoResult r{sent_, err_, false};
        stream_->recycle(this);
        h(std::move(b), r);
    }

    SocketStream* stream_;
    Ring& ring_;
    int fd_;
    SendBuffers buf_;
    SendHandler handler_;
    // Up to this many queued sends ride along in one SENDMSG, while it has
    // fewer than this many bytes: gathering amortises the syscall over small
    // sends; large ones need none, and a 4 MiB gather made 1 MiB streams
    // lumpier (-13%). 64 sends / 256 KiB -> 128 / 1 MiB: stream 64 KiB
    // 1.40x, 4 KiB 1.09x; 256 sends was 0.75x on 1 KiB frames
    // (docs/performance.md).
    static constexpr unsigned kMaxRiders = 128;
    static constexpr std::size_t kMaxGatherBytes = std::size_t{1} << 20;
    // This send goes out of a copy in inline_buf_ with SEND. The buffer is
    // allocated on first use (kInlineSendLimit bytes) and kept while the op
    // is recycled: a 256-byte array in every op measured 0.88x and 0.955x on
    // a 64-byte stream (4096 sends queued: 1 MiB more to touch), allocating
    // on use 1.00x and 1.07x.
    std::unique_ptr<std::byte[]> inline_buf_;
    bool inline_ = false;

    std::vector<iovec> iov_;
    msghdr msg_{};
    unsigned riders_ = 0;   // queued sends gathered into the SQE in flight
    unsigned orphans_ = 0;  // riders this op owns after the stream died
    std::size_t sent_ = 0;
    int err_ = 0;
    int retries_ = 0;
    int notifs_pending_ = 0;
    bool zerocopy_ = false;
    bool results_done_ = false;
};

void SocketStream::RecvOpDeleter::operator()(RecvOp* op) const noexcept { delete op; }
void SocketStream::SendOpDeleter::operator()(SendOp* op) const noexcept { delete op; }

// ---------------------------------------------------------------------------

SocketStream::SocketStream(Ring& ring, Fd fd, SocketStreamOptions options)
    : ring_(ring), fd_(std::move(fd)), options_(options), peer_(peer_name(fd_.get())) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&ss), &len) == 0)
        tcp_ = ss.ss_family == AF_INET || ss.ss_family == AF_INET6;
    // recycle() runs inside completion handling: it must not allocate (or
    // throw) there.
    spare_sends_.reserve(kSpareSends);
}

void SocketStream::note_zerocopy_usage(bool copied) {
    if (!copied) {
        zc_copied_run_ = 0;
        return;
    }
    counters_.zc_copied++;
    if (options_.zerocopy_fallback_after != 0 && !zerocopy_off_ &&
        ++zc_copied_run_ >= options_.zerocopy_fallback_after) {
        zerocopy_off_ = true;  // sends created from now on copy
        counters_.zc_fallbacks = 1;
    }
}

bool SocketStream::set_rcvlowat(std::size_t need) {
    if (!tcp_ || options_.rcvlowat_max == 0) return false;
    // Capped at rcvlowat_max: the receiver should copy while the sender
    // still sends; waiting for many MiB leaves one side idle (measured in
    // docs/performance.md).
    int want = need >= options_.rcvlowat_min && need > 1
                   ? static_cast<int>(std::min({need, options_.rcvlowat_max, std::size_t{1} << 30}))
                   : 1;
    if (want != rcvlowat_ &&
        ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVLOWAT, &want, sizeof want) == 0)
        rcvlowat_ = want;
    // A failure only costs the optimisation: the recv is correct either way.
    return rcvlowat_ > 1;
}

SocketStream::~SocketStream() {
    *alive_ = false;
    if (recv_op_) {
        recv_op_->detach();
        ring_.cancel(recv_op_);
    }
    // Ops waiting only for zero-copy notifications stay alive on their own;
    // queued ops that never reached the kernel are freed here.
    SendOp* op = send_head_;
    if (op && send_submitted_) {
        // In the kernel, with its riders: it frees them at its final CQE.
        SendOp* last = op;
        for (unsigned i = 0; i < op->riders_ && last->next; ++i) {
            last = last->next;
            last->detach();
        }
        op->orphans_ = op->riders_;
        op->detach();
        ring_.cancel(op);
        SendOp* rest = last->next;
        last->next = nullptr;
        op = rest;
    }
    while (op != nullptr) {
        SendOp* next = op->next;
        delete op;
        op = next;
    }
    for (SendOp* op : lingering_) op->detach();
    ring_.submit();
}

void SocketStream::recv(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
                        RecvHandler handler) {
    assert(recv_op_ == nullptr && "one recv in flight per stream");
    assert(min >= 1 && min <= max && offset + max <= lease.capacity());
    if (closed_) {
        handler(std::move(lease), IoResult{0, -ECANCELED, false});
        return;
    }
    recv_op_ = spare_recv_ ? spare_recv_.release() : new RecvOp(this);
    recv_op_->start(std::move(lease), offset, min, max, std::move(handler));
}

void SocketStream::send(SendBuffers buffers, SendHandler handler) {
    assert(buffers.prefix_len <= SendBuffers::kMaxPrefix);
    if (closed_) {
        handler(std::move(buffers), IoResult{0, -ECANCELED, false});
        return;
    }
    SendOp* op;
    if (!spare_sends_.empty()) {
        op = spare_sends_.back().release();
        spare_sends_.pop_back();
    } else {
        op = new SendOp(this);
    }
    const bool more = buffers.more;
    op->arm(std::move(buffers), std::move(handler));
    if (op->total() == 0) {  // nothing to send: complete in order, without the kernel
        op->results_done_ = true;
    }
    if (send_tail_)
        send_tail_->next = op;
    else
        send_head_ = op;
    send_tail_ = op;
    // A head held back by `more` starts with the send that completes it;
    // otherwise only a new head starts (a queued send waits for its turn).
    if (more) {
        if (send_head_ == op) head_held_ = true;
    } else if (send_head_ == op || head_held_) {
        head_held_ = false;
        start_head();
    }
}

void SocketStream::start_head() {
    // Re-entrant: a handler run here may queue (and start) another send; the
    // send_submitted_ check keeps the head from being submitted twice.
    std::shared_ptr<bool> alive = alive_;
    while (send_head_ && !send_submitted_ && send_head_->fully_sent()) {
        // Empty sends, and sends that rode along in an earlier gather.
        send_head_->results_done_ = true;
        SendOp* op = send_head_;
        send_head_ = op->next;
        if (!send_head_) send_tail_ = nullptr;
        op->maybe_finish();
        if (!*alive) return;  // the handler destroyed the stream
    }
    if (send_head_ && !send_submitted_) {
        send_submitted_ = true;
        send_head_->submit();
    }
}

void SocketStream::pop_head(SendOp* op) {
    assert(op == send_head_);
    send_submitted_ = false;
    send_head_ = op->next;
    if (!send_head_) send_tail_ = nullptr;
    if (op->notifs_pending_ > 0) lingering_.push_back(op);  // SendOp::maybe_finish removes it
}

void SocketStream::recycle(SendOp* op) {
    // A few finished sends are kept for reuse (with their inline copy buffer
    // and iovec capacity), enough for the sends a connection has in flight
    // at small sizes; more would only hold memory at 1000 connections.
    if (spare_sends_.size() >= kSpareSends || op->iov_.capacity() > kSpareIovecs) {
        delete op;
        return;
    }
    op->buf_ = SendBuffers{};
    spare_sends_.emplace_back(op);  // within the reserved capacity
}

void SocketStream::close() {
    if (closed_) return;
    closed_ = true;
    // shutdown() completes a blocked recv with 0 and pending sends with EPIPE
    // even when async cancel cannot interrupt them.
    ::shutdown(fd_.get(), SHUT_RDWR);
    if (recv_op_) ring_.cancel(recv_op_);
    if (send_head_ && send_submitted_) ring_.cancel(send_head_);
    ring_.submit();
}

// ---------------------------------------------------------------------------

namespace {

class AcceptOp final : public Completion {
public:
    AcceptOp(std::function<void(Fd, int)> h) : handler_(std::move(h)) {}
    void complete(int32_t res, uint32_t) override {
        std::function<void(Fd, int)> h = std::move(handler_);
        delete this;
        if (res >= 0)
            h(Fd(res), 0);
        else
            h(Fd(), res);
    }

private:
    std::function<void(Fd, int)> handler_;
};

class ConnectOp final : public Completion {
public:
    ConnectOp(SockAddr addr, Fd fd, std::function<void(Fd, int)> h)
        : addr_(addr), fd_(std::move(fd)), handler_(std::move(h)) {}
    const SockAddr& addr() const { return addr_; }
    int fd() const { return fd_.get(); }
    void complete(int32_t res, uint32_t) override {
        std::function<void(Fd, int)> h = std::move(handler_);
        Fd fd = std::move(fd_);
        delete this;
        if (res == 0)
            h(std::move(fd), 0);
        else
            h(Fd(), res);
    }

private:
    SockAddr addr_;  // the kernel reads it until the CQE
    Fd fd_;
    std::function<void(Fd, int)> handler_;
};

}  // namespace

Completion* async_accept(Ring& ring, int listen_fd, std::function<void(Fd, int)> handler) {
    auto* op = new AcceptOp(std::move(handler));
    io_uring_prep_accept(ring.sqe(op), listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    return op;
}

void async_connect(Ring& ring, const Endpoint& ep, std::function<void(Fd, int)> handler) {
    SockAddr addr = resolve(ep);
    Fd fd(::socket(addr.family(), ep.socket_type() | SOCK_CLOEXEC, 0));
    if (!fd) {
        handler(Fd(), -errno);
        return;
    }
    auto* op = new ConnectOp(addr, std::move(fd), std::move(handler));
    io_uring_prep_connect(ring.sqe(op), op->fd(), op->addr().get(), op->addr().len);
}

}  // namespace ringxfer::engine
