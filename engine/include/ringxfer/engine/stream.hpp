// Stream: the one interface every transport implements (io_uring sockets now;
// an epoll fallback and same-host shared memory later). proto/ is written
// against it and never sees a ring or a file descriptor.
//
// Buffer ownership follows tokio-uring's rule: an operation takes ownership
// of its buffers and hands them back in its completion handler, on success
// and on error alike. If the Stream is destroyed with operations in flight,
// they are cancelled and their handlers are *not* called; the buffers are
// released when the kernel's final completion arrives, never before.
//
// At most one recv may be in flight per stream. Sends may be queued freely:
// they leave in order, one SQE in the kernel at a time; sends queued behind
// the one being submitted ride along in the same SENDMSG (up to 128 of them,
// while under 1 MiB), so many small frames cost one syscall. A send's handler runs
// when its buffers are free again: once every byte has been handed to the
// kernel, and for zero-copy sends once the kernel's notification arrived.
// The next queued send starts as soon as the previous one's bytes are in the
// kernel; nothing ever waits for a notification.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/callback.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"

namespace ringxfer::engine {

class RecvOp;
class SendOp;

/// Result of a stream operation.
struct IoResult {
    std::size_t bytes = 0;  ///< bytes transferred by this operation
    int err = 0;            ///< 0 or -errno
    bool eof = false;       ///< recv: the peer closed before `min` bytes arrived
    bool ok() const noexcept { return err == 0 && !eof; }
};

/// What one send transmits, in order: `prefix` (copied inline, e.g. a frame
/// header) then `body` bytes [body_offset, body_offset + body_len).
struct SendBuffers {
    static constexpr std::size_t kMaxPrefix = 32;
    std::array<std::byte, kMaxPrefix> prefix{};
    std::size_t prefix_len = 0;
    Lease body;
    std::size_t body_offset = 0;
    std::size_t body_len = 0;
    /// Opaque word for the caller (e.g. frame flags); the stream ignores it.
    std::uint64_t user = 0;
    /// Another send follows at once (the parts of one frame): queue this one
    /// without starting it, so the next send without the flag leaves with
    /// it in one gather instead of after it.
    bool more = false;
};

/// Operation handlers keep targets of up to 96 bytes inline: room for a
/// proto-level handler (a 48-byte Callback) plus the few words a layer adds
/// around it, so a frame's handler chain never allocates.
inline constexpr std::size_t kHandlerInlineBytes = 96;
using RecvHandler = Callback<void(Lease, IoResult), kHandlerInlineBytes>;
using SendHandler = Callback<void(SendBuffers, IoResult), kHandlerInlineBytes>;

struct StreamCounters {
    std::uint64_t bytes_received = 0;
    std::uint64_t bytes_sent = 0;
    std::uint64_t recv_ops = 0;  ///< SQEs (resubmissions after short reads included)
    std::uint64_t send_ops = 0;
    std::uint64_t zc_sends = 0;
    std::uint64_t zc_copied = 0;  ///< notifications that reported the kernel copied
    /// 1 once the stream gave up SEND_ZC because the kernel kept copying
    /// (SocketStreamOptions::zerocopy_fallback_after).
    std::uint64_t zc_fallbacks = 0;
    std::uint64_t retries = 0;    ///< resubmissions after EINTR/EAGAIN/ENOBUFS
    std::uint64_t gathered_sends = 0;  ///< sends that rode in another send's SENDMSG
    /// Small lone sends whose header and payload were copied into the
    /// operation and sent with SEND (SocketStreamOptions::inline_send_max).
    std::uint64_t inline_sends = 0;
    std::uint64_t send_copied_bytes = 0;  ///< payload bytes those copies took
    // Shared memory (shm transport):
    std::uint64_t by_reference_sends = 0;  ///< payloads sent by reference (no copy)
    std::uint64_t by_reference_recvs = 0;  ///< payloads handed over by take_payload()
    std::uint64_t recv_copied_bytes = 0;   ///< bytes recv() copied out of shared memory
    std::uint64_t wakeups_sent = 0;        ///< times the peer was woken (futex or eventfd)
    std::uint64_t sleeps = 0;              ///< times this side armed a wait
};

class Stream {
public:
    virtual ~Stream() = default;

    /// Receives into lease.data()[offset, offset + max) until at least `min`
    /// bytes (1 <= min <= max) have arrived; short reads are resumed.
    virtual void recv(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
                      RecvHandler handler) = 0;

    /// Sends every byte of `buffers`; short writes are resumed.
    virtual void send(SendBuffers buffers, SendHandler handler) = 0;

    /// Cancels in-flight operations (their handlers see -ECANCELED) and shuts
    /// the connection down. Idempotent.
    virtual void close() = 0;

    /// Peer address for log lines.
    virtual std::string peer() const = 0;

    /// Bytes that arrived and wait in the kernel for a recv; 0 where the
    /// transport cannot tell. Progress checks (a minimum rate) count them: a
    /// large recv waits for a low water mark before it takes them.
    virtual std::size_t pending_input() const { return 0; }

    /// Transports that carry payloads by reference (shm): when the next
    /// `length` bytes of the stream are one payload the peer placed in shared
    /// memory, moves them into `out` as a read-only view of the peer's memory
    /// (Lease::read_only), with no copy, and returns true; releasing the
    /// lease gives the memory back to the peer. false: receive them with
    /// recv(). Never with a recv in flight.
    virtual bool take_payload(std::size_t length, Lease& out) {
        (void)length;
        (void)out;
        return false;
    }
    /// True when take_payload(length) would succeed now (the next bytes are
    /// one payload of that length, already announced): a reader waits for
    /// nothing more and takes it by reference.
    virtual bool payload_ready(std::size_t length) const {
        (void)length;
        return false;
    }

    /// What went wrong, when the stream can say more than its -errno (a peer
    /// that broke the protocol: what it sent); empty otherwise.
    virtual std::string error_message() const { return {}; }

    virtual const StreamCounters& counters() const = 0;
};

struct SocketStreamOptions {
    /// Send bodies with SEND_ZC (fixed buffer when registered) from this size
    /// up; 0 disables zero-copy sends. The kernel may still copy (loopback
    /// always does): notifications say so and are counted.
    std::size_t zerocopy_threshold = 0;
    /// After this many notifications in a row that report the kernel copied
    /// anyway (IORING_NOTIF_USAGE_ZC_COPIED: loopback, a device without
    /// scatter-gather or checksum offload), the stream sends with copies
    /// from then on: the copying path is the faster one when a copy happens
    /// either way (100 MB stream with SEND_ZC on loopback: 0.86x). 0: never.
    unsigned zerocopy_fallback_after = 2;
    /// Receive with READ_FIXED into registered buffers instead of RECV
    /// (MSG_WAITALL): fewer page-table walks, more round trips on big reads.
    bool read_fixed = false;
    /// After a recv that drained the socket, submit the next one with
    /// IORING_RECVSEND_POLL_FIRST (arm the poll without a doomed attempt).
    bool poll_first = true;
    /// A send of at most this many bytes (prefix + body) with no other send
    /// queued behind it is copied into the operation and sent with SEND
    /// instead of a two-iovec SENDMSG: copying a few dozen bytes costs less
    /// than the msghdr and iovec import (64-byte echo 1.12x round trips/s,
    /// docs/performance.md). Counted in StreamCounters::send_copied_bytes.
    /// 0: never copy.
    static constexpr std::size_t kInlineSendLimit = 256;  ///< largest inline_send_max
    std::size_t inline_send_max = kInlineSendLimit;
    /// TCP: a recv that still needs at least `rcvlowat_min` bytes first sets
    /// SO_RCVLOWAT to that many, at most `rcvlowat_max` (the kernel caps it
    /// further at half the receive buffer), so its poll wakes once per
    /// `rcvlowat_max` bytes instead of once per arriving segment; smaller
    /// recvs put it back to 1. rcvlowat_max = 0: never. 256 KiB: a receiver
    /// that waits for more than the sender may keep unacknowledged (the
    /// 512 KiB same-host send buffer, SocketTuning) stalls the pair; 1 MiB
    /// lost to 256 KiB by 1.24-2.19x on TCP streams and echoes once that send
    /// buffer was in (docs/performance.md).
    std::size_t rcvlowat_min = std::size_t{64} << 10;
    std::size_t rcvlowat_max = std::size_t{256} << 10;
};

/// A connected socket driven by a Ring.
class SocketStream final : public Stream {
public:
    SocketStream(Ring& ring, Fd fd, SocketStreamOptions options = {});
    ~SocketStream() override;

    void recv(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
              RecvHandler handler) override;
    void send(SendBuffers buffers, SendHandler handler) override;
    void close() override;
    std::string peer() const override { return peer_; }
    std::size_t pending_input() const override { return engine::pending_input(fd_.get()); }
    const StreamCounters& counters() const override { return counters_; }

    int fd() const noexcept { return fd_.get(); }

private:
    friend class RecvOp;
    friend class SendOp;
    void start_head();
    void pop_head(SendOp* op);
    bool set_rcvlowat(std::size_t need);  // true: raised above 1
    void note_zerocopy_usage(bool copied);
    void recycle(SendOp* op);  // a finished send: keep for reuse or free

    struct RecvOpDeleter {
        void operator()(RecvOp* op) const noexcept;
    };
    struct SendOpDeleter {
        void operator()(SendOp* op) const noexcept;
    };
    // Finished operations kept for reuse: a frame's recv and send allocate
    // nothing once a connection has warmed up.
    static constexpr std::size_t kSpareSends = 4;
    static constexpr std::size_t kSpareIovecs = 64;  // larger iovec arrays are freed

    Ring& ring_;
    Fd fd_;
    SocketStreamOptions options_;
    std::string peer_;
    StreamCounters counters_;
    RecvOp* recv_op_ = nullptr;
    std::unique_ptr<RecvOp, RecvOpDeleter> spare_recv_;
    std::vector<std::unique_ptr<SendOp, SendOpDeleter>> spare_sends_;
    // FIFO of sends; only the head is in the kernel.
    SendOp* send_head_ = nullptr;
    SendOp* send_tail_ = nullptr;
    bool send_submitted_ = false;
    bool head_held_ = false;  // the head waits for the rest of its frame (SendBuffers::more)
    bool drained_ = false;  // the last recv got less than it asked for
    bool zerocopy_off_ = false;  // fell back: the kernel kept copying
    unsigned zc_copied_run_ = 0;  // consecutive notifications that said "copied"
    bool tcp_ = false;      // SO_RCVLOWAT gates TCP's wake-ups (not AF_UNIX's)
    int rcvlowat_ = 1;      // the socket's SO_RCVLOWAT as last set
    bool closed_ = false;
    // Zero-copy sends done with their results, still waiting for notifications.
    std::vector<SendOp*> lingering_;
    // False once destroyed: a handler may drop the last owner of the stream.
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

/// Accepts one connection on `listen_fd`; handler gets the new fd or -errno.
/// Returns the operation, for Ring::cancel() (valid until the handler ran).
Completion* async_accept(Ring& ring, int listen_fd, std::function<void(Fd, int err)> handler);

/// Connects a new socket to `ep` (resolved now); handler gets it or -errno.
void async_connect(Ring& ring, const Endpoint& ep, std::function<void(Fd, int err)> handler);

}  // namespace ringxfer::engine
