#include "ringxfer/engine/shm_stream.hpp"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <poll.h>
#include <string>
#include <vector>

#include "ringxfer/engine/compat.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/shm_region.hpp"
#include "ringxfer/engine/shm_ring.hpp"

namespace ringxfer::engine {
namespace {

// Rendezvous messages (one SOCK_SEQPACKET message each, fds attached).
constexpr std::uint32_t kCtlMagic = 0x48535852;  // "RXSH"
constexpr std::uint32_t kCtlVersion = 1;
enum CtlType : std::uint32_t {
    kHello = 1,     // connector: arg = ring capacity, a = bytes of the rings memfd; fds: rings, eventfd
    kHelloAck = 2,  // acceptor; fds: eventfd
    kRegion = 3,    // arg = region number, a = its bytes; fds: the region's memfd
};
constexpr std::uint32_t kWakeByEventfd = 1;  // CtlMsg::flags: "wake me through my eventfd"
struct CtlMsg {
    std::uint32_t magic = kCtlMagic;
    std::uint32_t version = kCtlVersion;
    std::uint32_t type = 0;
    std::uint32_t arg = 0;
    std::uint32_t flags = 0;
    std::uint32_t reserved = 0;
    std::uint64_t a = 0;
};
static_assert(sizeof(CtlMsg) == 32);

// Descriptor types (ShmDescriptor::flags, low byte).
enum DescType : std::uint32_t {
    kInline = 1,   // bytes 8..31 of the descriptor carry (flags >> 8) & 0xff bytes
    kPayload = 2,  // region, offset, length: bytes in the sender's region; cookie: its handle
    kRelease = 3,  // cookie: a payload of the receiver of this descriptor, given back
    kClose = 4,    // the sender closed its side: end of stream after what came before
    // A payload of the receiver of this descriptor, sent back by reference
    // (an echo of a frame received by reference): offset = the receiver's
    // cookie of that payload, region = bytes into it, length; cookie: the
    // sender's handle, released like a kPayload's.
    kReturn = 5,
};
constexpr std::size_t kInlineBytes = 24;
constexpr std::uint32_t kMaxPeerRegions = 1u << 16;
constexpr std::uint64_t kMaxRegionBytes = std::uint64_t{64} << 30;
constexpr std::uint32_t kMinCapacity = 64, kMaxCapacity = 65536;

std::uint32_t type_of(const ShmDescriptor& d) { return d.flags & 0xff; }
std::size_t inline_len(const ShmDescriptor& d) { return (d.flags >> 8) & 0xff; }
const std::byte* inline_data(const ShmDescriptor& d) {
    return reinterpret_cast<const std::byte*>(&d.offset);
}
std::size_t ring_span(std::uint32_t capacity) {
    return (ShmRing::bytes_for(capacity) + 4095) / 4096 * 4096;
}
bool valid_capacity(std::uint32_t c) {
    return c >= kMinCapacity && c <= kMaxCapacity && (c & (c - 1)) == 0;
}

}  // namespace

namespace detail {

// What both ends of one connection share, and what outlives the stream
// object while the application holds views of the peer's memory: the rings,
// the peer's regions as we mapped them, the socket (closed only when nothing
// of the peer's is held any more, so the peer never takes back memory we can
// read), and the table of views handed out. Releases come from any thread.
class ShmLink final : public LeaseSource {
public:
    explicit ShmLink(std::uint32_t capacity)
        : views_(new View[capacity]) {
        free_views_.reserve(capacity);
        for (std::uint32_t i = capacity; i-- > 0;) free_views_.push_back(i);
        backlog_.reserve(capacity);  // releases that found the ring full: at most one per view
    }

    void ref() noexcept { owners_.fetch_add(1, std::memory_order_relaxed); }
    void unref() noexcept {
        if (owners_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
    }

    /// Publishes `batch` whole (with any backlog first) and wakes the peer
    /// if it sleeps. Returns descriptors pushed (0: no room), or -errno.
    int push(std::span<const ShmDescriptor> batch) noexcept {
        std::lock_guard lock(mu_);
        if (!flush_backlog_locked()) return 0;
        int n = out.try_push(batch, true);
        if (n > 0) wake_if_sleeping_locked();
        return n;
    }

    /// A view of the peer's bytes [data, data + len) handed to the
    /// application; its release sends `cookie` back. `held`: our own memory
    /// the view shows (a payload the peer returned), kept until the release.
    /// false: every view slot is taken (the caller copies instead).
    bool make_view(const std::byte* data, std::size_t len, std::uint64_t cookie, Lease& out_lease,
                   Lease* held = nullptr) {
        std::uint32_t slot;
        {
            std::lock_guard lock(mu_);
            if (free_views_.empty()) return false;
            slot = free_views_.back();
            free_views_.pop_back();
        }
        View& v = views_[slot];
        v.cookie = cookie;
        v.base = data;
        if (held) v.held = std::move(*held);
        v.refs.store(1, std::memory_order_relaxed);
        ref();
        out_lease.reset();
        out_lease.core_ = this;
        out_lease.data_ = const_cast<std::byte*>(data);  // read-only mapping: Lease::read_only
        out_lease.size_ = len;
        out_lease.capacity_ = len;
        out_lease.region_ = slot;
        out_lease.slab_ = 0;
        out_lease.refs_ = &v.refs;
        out_lease.buf_index_ = -1;
        out_lease.read_only_ = true;
        return true;
    }

    /// Where `l` lies when it is a view this link handed out (or a share of
    /// one): the peer's cookie of the payload, how far into it `l` starts,
    /// and our own memory when the payload is ours coming back (else null).
    /// The stream's thread, while `l` lives.
    bool view_of(const Lease& l, std::uint64_t& cookie, std::size_t& offset,
                 const Lease*& held) const noexcept {
        if (l.core_ != this) return false;
        const View& v = views_[l.region_];
        cookie = v.cookie;
        offset = static_cast<std::size_t>(l.data_ - v.base);
        held = v.held ? &v.held : nullptr;
        return true;
    }

    void release(Lease& l) noexcept override {
        if (l.refs_->fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        Lease held = std::move(views_[l.region_].held);  // dropped after the release is out
        {
            std::lock_guard lock(mu_);
            ShmDescriptor d{};
            d.flags = kRelease;
            d.cookie = views_[l.region_].cookie;
            push_release_locked(d);
            free_views_.push_back(l.region_);  // reserved: never allocates
        }
        held.reset();  // may be a view of this link itself: before our last ref goes
        unref();
    }

    /// Releases of payloads recv() copied out (the stream's thread).
    void push_releases(std::span<const ShmDescriptor> batch) noexcept {
        std::lock_guard lock(mu_);
        for (const ShmDescriptor& d : batch) push_release_locked(d);
    }

    /// Pushes releases that found the ring full earlier (one load when
    /// there are none): the stream's poll, so none waits for the next push.
    void flush_backlog() noexcept {
        if (!backlogged_.load(std::memory_order_acquire)) return;
        std::lock_guard lock(mu_);
        flush_backlog_locked();
    }

    bool wake_if_sleeping_locked() noexcept {
        if (!out.consumer_sleeping()) return false;
        wakeups.fetch_add(1, std::memory_order_relaxed);
        if (peer_by_eventfd) {
            std::uint64_t one = 1;
            [[maybe_unused]] auto n = ::write(peer_eventfd.get(), &one, sizeof one);
        } else {
            out.wake();
        }
        return true;
    }

    // Set up once by the handshake (the stream's thread), before any view.
    ShmRegion rings;
    ShmRing out, in;  // out: we produce; in: we consume
    Fd sock;
    Fd my_eventfd;    // we wait on it when we asked to be woken that way
    Fd peer_eventfd;  // written to wake the peer, when it asked for it
    bool peer_by_eventfd = false;
    std::vector<ShmRegion> peer_regions;  // indexed by the peer's region number
    std::atomic<std::uint64_t> wakeups{0};
    // Payloads the peer may still read when our stream was destroyed while
    // lingering (ShmStream::close): kept until the peer's socket ends or the
    // linger deadline passes, whichever first; `linger_ops` are the socket
    // watch and the deadline that decide it (the ring's thread only).
    std::vector<Lease> lingering;
    Ring* ring = nullptr;
    Completion* linger_ops[2] = {nullptr, nullptr};

private:
    struct View {
        std::atomic<std::uint32_t> refs{0};
        std::uint64_t cookie = 0;
        const std::byte* base = nullptr;
        Lease held;
    };
    ~ShmLink() = default;

    void push_release_locked(const ShmDescriptor& d) noexcept {
        if (!rings) return;  // never opened: nothing to give back
        if (flush_backlog_locked() && out.try_push({&d, 1}) == 1) {
            wake_if_sleeping_locked();
            return;
        }
        if (backlog_.size() < backlog_.capacity()) backlog_.push_back(d);
        backlogged_.store(true, std::memory_order_release);
    }

    bool flush_backlog_locked() noexcept {
        if (backlog_.empty()) return true;
        int n = out.try_push(backlog_);
        if (n <= 0) return false;
        backlog_.erase(backlog_.begin(), backlog_.begin() + n);
        wake_if_sleeping_locked();
        backlogged_.store(!backlog_.empty(), std::memory_order_release);
        return backlog_.empty();
    }

    std::mutex mu_;
    std::unique_ptr<View[]> views_;
    std::vector<std::uint32_t> free_views_;
    std::vector<ShmDescriptor> backlog_;
    std::atomic<std::uint32_t> owners_{1};
    std::atomic<bool> backlogged_{false};
};

}  // namespace detail

namespace {

using detail::ShmLink;
using Clock = std::chrono::steady_clock;

class ShmStream;

// An operation in the kernel on the link's memory or socket: it holds the
// link until its final CQE and reports to the stream unless detached.
class LinkOp final : public Completion {
public:
    enum class Kind { wait, socket, timer, handshake, linger };
    LinkOp(ShmStream* s, ShmLink* l, Kind k) : stream(s), link(l), kind(k) { link->ref(); }
    void complete(int32_t res, uint32_t flags) override;
    ShmStream* stream;
    ShmLink* link;
    Kind kind;
    std::uint64_t value = 0;     // eventfd read target
    __kernel_timespec ts{};      // timer
};

class ShmStream final : public Stream, public Poller {
    enum class State { handshake, open, failed, closed };

public:
    ShmStream(Ring& ring, Fd fd, BufferPool& pool, bool connector, const ShmStreamOptions& opt)
        : ring_(ring), pool_(pool), opt_(opt), connector_(connector),
          spin_(opt.spin.value_or(ring.busy_poll_window())) {
        if (!pool.options().shared_memory)
            throw Error(EINVAL, "the shm transport needs a shared_memory buffer pool");
        if (!valid_capacity(opt.ring_capacity))
            throw Error(EINVAL, "shm ring_capacity must be a power of two from 64 to 65536");
        link_ = new ShmLink(opt.ring_capacity);
        link_->sock = std::move(fd);
        int fl = ::fcntl(link_->sock.get(), F_GETFL);
        if (fl >= 0) ::fcntl(link_->sock.get(), F_SETFL, fl | O_NONBLOCK);
        dispatch_op_.stream = this;
        wait_by_eventfd_ = opt.force_eventfd || !ring.features().op_futex_wait;
        link_->my_eventfd = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!link_->my_eventfd) {
            int e = errno;
            link_->unref();
            throw Error(e, errno_message("shm transport: cannot create an eventfd", e));
        }
        if (connector_) send_hello();
        arm_socket();
        if (opt_.handshake_timeout.count() > 0) {
            handshake_op_ = new LinkOp(this, link_, LinkOp::Kind::handshake);
            handshake_op_->ts.tv_sec = opt_.handshake_timeout.count() / 1000;
            handshake_op_->ts.tv_nsec = (opt_.handshake_timeout.count() % 1000) * 1'000'000;
            io_uring_prep_timeout(ring_.sqe(handshake_op_), &handshake_op_->ts, 0, 0);
        }
    }

    ~ShmStream() override {
        close();
        if (lingering_ && linger_op_) hand_lingering_to_link();
        end_linger(-ECANCELED);
        ring_.unpost(&dispatch_op_);
        ring_.remove_poller(this);
        for (LinkOp* op : {wait_op_, sock_op_, timer_op_, handshake_op_, linger_op_}) {
            if (op == nullptr) continue;
            op->stream = nullptr;
            ring_.cancel(op);
        }
        ring_.submit();
        *alive_ = false;
        link_->unref();
    }

    // -- Stream --------------------------------------------------------------

    void recv(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
              RecvHandler handler) override {
        recv_.lease = std::move(lease);
        recv_.offset = offset;
        recv_.min = min;
        recv_.max = max;
        recv_.got = 0;
        recv_.handler = std::move(handler);
        recv_active_ = true;
        if (state_ == State::failed || state_ == State::closed) {
            finish_recv({0, state_ == State::closed ? -ECANCELED : error_code_, false});
            return;
        }
        if (state_ == State::open) wake_up_poller();
    }

    void send(SendBuffers buffers, SendHandler handler) override {
        if (state_ == State::failed || state_ == State::closed || peer_gone_) {
            done_send(std::move(buffers), std::move(handler),
                      {0, state_ == State::closed ? -ECANCELED
                          : state_ == State::failed ? error_code_
                                                    : -EPIPE,
                       false});
            return;
        }
        queued_.push_back({std::move(buffers), std::move(handler)});
        if (state_ == State::open && queued_.size() == 1) {
            flush_sends();
            if (!queued_.empty()) wake_up_poller();  // blocked: retried by poll()
        }
    }

    void close() override {
        if (state_ == State::closed) return;
        if (state_ == State::open && !peer_gone_) {
            ShmDescriptor d{};
            d.flags = kClose;
            link_->push(std::span(&d, 1));  // a full ring drops it: the socket's end says it too
        }
        const bool was_failed = state_ == State::failed;
        const bool was_open = state_ == State::open && !peer_gone_;
        state_ = State::closed;
        if (was_failed) return ring_.remove_poller(this);
        abort_pending(-ECANCELED);
        // Payloads out may still be read by the peer: they stay ours to
        // hold (and their sends open) until it releases them or goes away,
        // for close_linger at most.
        if (was_open && slots_out() > 0 && opt_.close_linger.count() > 0) {
            lingering_ = true;
            // What the peer sent that we will never read goes back now.
            for (std::size_t i = inq_head_; i < inq_.size(); ++i) {
                if (type_of(inq_[i]) != kPayload && type_of(inq_[i]) != kReturn) continue;
                ShmDescriptor r{};
                r.flags = kRelease;
                r.cookie = inq_[i].cookie;
                releases_.push_back(r);
            }
            inq_.clear();
            inq_head_ = 0;
            returned_.clear();
            flush_releases();
            linger_op_ = new LinkOp(this, link_, LinkOp::Kind::linger);
            linger_op_->ts.tv_sec = opt_.close_linger.count() / 1000;
            linger_op_->ts.tv_nsec = (opt_.close_linger.count() % 1000) * 1'000'000;
            io_uring_prep_timeout(ring_.sqe(linger_op_), &linger_op_->ts, 0, 0);
            wake_up_poller();
            return;
        }
        abort_slots(-ECANCELED);
        ring_.remove_poller(this);
    }

    std::string peer() const override { return "shm"; }
    const StreamCounters& counters() const override {
        counters_.wakeups_sent = link_->wakeups.load(std::memory_order_relaxed);
        return counters_;
    }
    std::string error_message() const override { return error_; }

    std::size_t pending_input() const override {
        std::size_t n = 0;
        for (std::size_t i = inq_head_; i < inq_.size(); ++i) {
            const ShmDescriptor& d = inq_[i];
            n += type_of(d) == kInline ? inline_len(d) : type_of(d) == kClose ? 0 : d.length;
        }
        return n - std::min(n, front_used_);
    }

    bool payload_ready(std::size_t length) const override {
        if (state_ != State::open || recv_active_ || inq_head_ == inq_.size() || front_used_ != 0)
            return false;
        const ShmDescriptor& d = inq_[inq_head_];
        return (type_of(d) == kPayload || type_of(d) == kReturn) && d.length == length;
    }

    bool take_payload(std::size_t length, Lease& out) override {
        if (state_ != State::open || recv_active_) return false;
        if (inq_head_ == inq_.size()) pump_in();
        if (state_ != State::open || inq_head_ == inq_.size()) return false;
        const ShmDescriptor d = inq_[inq_head_];
        const std::uint32_t type = type_of(d);
        if ((type != kPayload && type != kReturn) || front_used_ != 0 || d.length != length)
            return false;
        if (type == kReturn) {
            const std::byte* data = returned_.front().data();
            if (!link_->make_view(data, d.length, d.cookie, out, &returned_.front()))
                return false;
        } else {
            const std::byte* data = link_->peer_regions[d.region].data() + d.offset;
            if (!link_->make_view(data, d.length, d.cookie, out)) return false;
        }
        pop_front();
        counters_.by_reference_recvs++;
        counters_.bytes_received += length;
        return true;
    }

    // -- Poller --------------------------------------------------------------

    Poller::State poll() override {
        if (in_poll_) return Poller::State::spin;
        if (lingering_) return poll_lingering();
        if (state_ != State::open) {
            ring_.remove_poller(this);
            return Poller::State::idle;
        }
        in_poll_ = true;
        link_->flush_backlog();
        bool did = pump_in();
        if (state_ == State::open) {
            did |= flush_sends();
            did |= try_complete_recv();
        }
        in_poll_ = false;
        if (did || state_ != State::open) {
            idle_polls_ = 0;
            return Poller::State::progress;
        }
        // The clock is read once when polls start finding nothing, then every
        // 64th: a look at the ring costs a few ns, a clock read in a VM tens
        // (a third of a polling ping-pong's samples went to clock_gettime).
        if (idle_polls_++ % 64 == 0) {
            auto now = Clock::now();
            if (idle_polls_ == 1) last_activity_ = now;
            else if (now - last_activity_ >= spin_) return go_idle();
        }
        if (spin_.count() > 0) return Poller::State::spin;
        return go_idle();
    }

    // -- completions (LinkOp, DispatchOp) ---------------------------------------

    void on_op(LinkOp::Kind kind, int32_t res) {
        switch (kind) {
            case LinkOp::Kind::wait:
                wait_op_ = nullptr;
                link_->in.end_sleep();
                if (state_ == State::open || lingering_) {
                    idle_polls_ = 0;
                    ring_.add_poller(this);
                    poll();
                }
                break;
            case LinkOp::Kind::timer:
                timer_op_ = nullptr;
                if (state_ == State::open) {
                    ring_.add_poller(this);
                    poll();
                }
                break;
            case LinkOp::Kind::socket:
                sock_op_ = nullptr;
                on_socket(res);
                break;
            case LinkOp::Kind::linger:
                linger_op_ = nullptr;
                if (res != -ECANCELED) end_linger(-ECANCELED);  // the peer kept them too long
                break;
            case LinkOp::Kind::handshake:
                handshake_op_ = nullptr;
                if (state_ == State::handshake && res != -ECANCELED)
                    fail(-ETIMEDOUT, "no shm handshake from the peer within " +
                                         std::to_string(opt_.handshake_timeout.count()) +
                                         " ms (is the other end a ringxfer shm peer, and running?)");
                break;
        }
    }

    void dispatch() {
        posted_ = false;
        auto alive = alive_;
        dispatching_sends_.swap(done_sends_);
        for (std::size_t i = 0; i < dispatching_sends_.size(); ++i) {
            {
                // The handler and what it captured go before the check: its
                // destruction may drop the last owner of this stream.
                SendHandler h = std::move(dispatching_sends_[i].handler);
                SendBuffers b = std::move(dispatching_sends_[i].buffers);
                h(std::move(b), dispatching_sends_[i].result);
            }
            if (!*alive) return;
        }
        dispatching_sends_.clear();
        if (recv_done_) {
            recv_done_ = false;
            recv_active_ = false;
            RecvHandler h = std::move(recv_.handler);
            Lease l = std::move(recv_.lease);
            h(std::move(l), recv_result_);
        }
    }

private:

    struct DispatchOp final : Completion {
        ShmStream* stream = nullptr;
        void complete(int32_t, uint32_t) override { stream->dispatch(); }
    };
    struct PendingRecv {
        Lease lease;
        std::size_t offset = 0, min = 0, max = 0, got = 0;
        RecvHandler handler;
    };
    struct QueuedSend {
        SendBuffers buffers;
        SendHandler handler;
    };
    struct DoneSend {
        SendBuffers buffers;
        SendHandler handler;
        IoResult result;
    };
    struct SendSlot {
        SendBuffers buffers;  // by reference: held until released
        SendHandler handler;
        Lease copy;           // copied: the copy, held until released
        std::size_t bytes = 0;    // prefix and payload
        std::size_t payload = 0;
        std::uint32_t gen = 0;
        bool used = false;
        bool by_ref = false;
    };

    // -- handshake -----------------------------------------------------------

    void send_hello() {
        const std::uint32_t cap = opt_.ring_capacity;
        const std::size_t span = ring_span(cap);
        int ret = ShmRegion::create(2 * span, "ringxfer-rings", link_->rings,
                                    ShmRegion::Access::both_write);
        if (ret < 0) throw Error(-ret, errno_message("shm transport: cannot create the rings", -ret));
        ShmRing::create(link_->rings.data(), span, cap, link_->out);
        ShmRing::create(link_->rings.data() + span, span, cap, link_->in);
        CtlMsg m;
        m.type = kHello;
        m.arg = cap;
        m.a = 2 * span;
        m.flags = wait_by_eventfd_ ? kWakeByEventfd : 0;
        const int fds[2] = {link_->rings.fd(), link_->my_eventfd.get()};
        ret = send_with_fds(link_->sock.get(), std::as_bytes(std::span(&m, 1)), fds);
        if (ret < 0) throw Error(-ret, errno_message("shm transport: cannot send the handshake", -ret));
    }

    void on_socket(int32_t res) {
        if (lingering_) {
            // Closed: only the peer's end of file matters (it holds nothing
            // of ours once its socket is gone).
            if (res == -ECANCELED) return;
            if (res >= 0) {
                alignas(8) std::byte buf[64];
                std::vector<Fd> fds;
                int n;
                while ((n = recv_with_fds(link_->sock.get(), buf, fds)) > 0) fds.clear();
                if (n == -EAGAIN) return arm_socket();
            }
            return end_linger(0);
        }
        if (state_ == State::closed || state_ == State::failed) return;
        if (res < 0) {
            if (res == -ECANCELED) return;
            peer_is_gone();
            return;
        }
        // Read every message waiting; the socket is non-blocking.
        for (;;) {
            int r = read_control();
            if (r == -EAGAIN) break;
            if (r <= 0) {
                if (state_ == State::handshake && r == 0)
                    fail(-ECONNRESET, "the peer closed the shm rendezvous socket during the handshake "
                                      "(is it a ringxfer shm server?)");
                else if (r == 0 || r == -ECONNRESET)
                    peer_is_gone();
                return;  // failed: fail() said why
            }
            if (state_ != State::open && state_ != State::handshake) return;
        }
        arm_socket();
    }

    /// One control message: 1 handled, 0 end of file, -EAGAIN none waiting,
    /// other -errno failed (the stream is failed).
    int read_control() {
        alignas(8) std::byte buf[64];
        std::vector<Fd> fds;
        int n = recv_with_fds(link_->sock.get(), buf, fds);
        if (n == -EAGAIN || n == 0 || n == -ECONNRESET) return n;
        if (n < 0) {
            fail(n, errno_message("shm transport: reading the rendezvous socket failed", -n));
            return n;
        }
        CtlMsg m;
        if (static_cast<std::size_t>(n) != sizeof m) {
            fail(-EPROTO, "the peer sent a " + std::to_string(n) +
                              "-byte message on the shm rendezvous socket (expected 32: is it a "
                              "ringxfer shm peer of the same version?)");
            return -EPROTO;
        }
        std::memcpy(&m, buf, sizeof m);
        if (m.magic != kCtlMagic || m.version != kCtlVersion) {
            fail(-EPROTO, "the peer is not a ringxfer shm peer of this version (bad magic or "
                          "version in its message)");
            return -EPROTO;
        }
        if (state_ == State::handshake) {
            if (m.type != (connector_ ? kHelloAck : kHello)) {
                fail(-EPROTO, "the peer broke the shm handshake (message type " +
                                  std::to_string(m.type) + ")");
                return -EPROTO;
            }
            return connector_ ? on_hello_ack(m, fds) : on_hello(m, fds);
        }
        if (m.type != kRegion) {
            fail(-EPROTO, "the peer sent an unexpected shm message (type " + std::to_string(m.type) + ")");
            return -EPROTO;
        }
        return on_region(m, fds);
    }

    int on_hello(const CtlMsg& m, std::vector<Fd>& fds) {
        const std::uint32_t cap = m.arg;
        if (!valid_capacity(cap) || m.a != 2 * ring_span(cap) || fds.size() != 2) {
            fail(-EPROTO, "the peer's shm handshake is malformed (capacity " + std::to_string(cap) +
                              ", " + std::to_string(m.a) + " bytes of rings, " +
                              std::to_string(fds.size()) + " descriptors)");
            return -EPROTO;
        }
        int ret = ShmRegion::map_peer(std::move(fds[0]), m.a, link_->rings,
                                      ShmRegion::Access::both_write);
        if (ret < 0) {
            fail(ret, "cannot map the peer's shm rings (" + std::string(std::strerror(-ret)) +
                          "): they must be a memfd of the announced size, sealed against "
                          "shrinking and growing");
            return ret;
        }
        const std::size_t span = ring_span(cap);
        ShmRing in, out;
        if (ShmRing::attach(link_->rings.data(), span, in) < 0 ||
            ShmRing::attach(link_->rings.data() + span, span, out) < 0 || in.capacity() != cap ||
            out.capacity() != cap) {
            fail(-EPROTO, "the peer's shm rings are not laid out as announced");
            return -EPROTO;
        }
        link_->in = in;
        link_->out = out;
        link_->peer_eventfd = std::move(fds[1]);
        link_->peer_by_eventfd = m.flags & kWakeByEventfd;
        // Our capacity is the connector's from here on.
        opt_.ring_capacity = cap;
        CtlMsg ack;
        ack.type = kHelloAck;
        ack.flags = wait_by_eventfd_ ? kWakeByEventfd : 0;
        const int efd = link_->my_eventfd.get();
        ret = send_with_fds(link_->sock.get(), std::as_bytes(std::span(&ack, 1)), std::span(&efd, 1));
        if (ret < 0) {
            fail(ret, errno_message("shm transport: cannot answer the handshake", -ret));
            return ret;
        }
        open();
        return 1;
    }

    int on_hello_ack(const CtlMsg& m, std::vector<Fd>& fds) {
        if (fds.size() != 1) {
            fail(-EPROTO, "the peer's shm handshake answer is malformed");
            return -EPROTO;
        }
        link_->peer_eventfd = std::move(fds[0]);
        link_->peer_by_eventfd = m.flags & kWakeByEventfd;
        open();
        return 1;
    }

    int on_region(const CtlMsg& m, std::vector<Fd>& fds) {
        const std::uint32_t id = m.arg;
        auto& regions = link_->peer_regions;
        if (id >= kMaxPeerRegions || m.a == 0 || m.a > kMaxRegionBytes || fds.size() != 1 ||
            (id < regions.size() && regions[id])) {
            fail(-EPROTO, "the peer announced shm region " + std::to_string(id) + " of " +
                              std::to_string(m.a) + " bytes with " + std::to_string(fds.size()) +
                              " descriptors (malformed, or announced twice)");
            return -EPROTO;
        }
        ShmRegion r;
        int ret = ShmRegion::map_peer(std::move(fds[0]), m.a, r);
        if (ret < 0) {
            fail(ret == -EPROTO ? -EPROTO : ret,
                 "cannot map the peer's shm region " + std::to_string(id) + " (" +
                     std::strerror(-ret) +
                     "): it must be a memfd of the announced size, sealed against shrinking");
            return ret;
        }
        if (regions.size() <= id) regions.resize(id + 1);
        regions[id] = std::move(r);
        return 1;
    }

    void open() {
        state_ = State::open;
        if (handshake_op_) {
            ring_.cancel(handshake_op_);  // its completion (-ECANCELED) clears it
            ring_.submit();
        }
        const std::uint32_t cap = opt_.ring_capacity;
        slots_.resize(cap);
        free_slots_.reserve(cap);
        for (std::uint32_t i = cap; i-- > 0;) free_slots_.push_back(i);
        inq_.reserve(cap);
        idle_polls_ = 0;
        ring_.add_poller(this);
        flush_sends();
    }

    void arm_socket() {
        if (sock_op_) return;
        sock_op_ = new LinkOp(this, link_, LinkOp::Kind::socket);
        io_uring_prep_poll_add(ring_.sqe(sock_op_), link_->sock.get(), POLLIN | POLLRDHUP);
    }

    // -- receiving -------------------------------------------------------------

    /// Takes descriptors out of the incoming ring: releases are handled at
    /// once, the rest queued for recv()/take_payload(). true: anything came.
    bool pump_in() {
        bool did = false;
        std::array<ShmDescriptor, 64> buf;
        const std::size_t cap = opt_.ring_capacity;
        while (state_ == State::open && queued_in() < cap) {
            const std::size_t room = std::min(buf.size(), cap - queued_in());
            int n = link_->in.pop(std::span(buf.data(), room));
            if (n < 0) {
                fail(-EPROTO, "the peer corrupted the shm ring (impossible indices)");
                return true;
            }
            if (n == 0) break;
            did = true;
            for (int i = 0; i < n; ++i)
                if (!accept(buf[i])) return true;
            if (static_cast<std::size_t>(n) < room) break;
        }
        flush_releases();
        return did;
    }

    bool accept(const ShmDescriptor& d) {
        switch (type_of(d)) {
            case kInline:
                if (inline_len(d) == 0 || inline_len(d) > kInlineBytes)
                    return bad("an inline descriptor of " + std::to_string(inline_len(d)) + " bytes");
                inq_.push_back(d);
                return true;
            case kPayload: {
                auto& regions = link_->peer_regions;
                if (d.region >= regions.size() || !regions[d.region]) {
                    // Announced before the descriptor was published: waiting
                    // on the socket now, unless the peer lies.
                    while (state_ == State::open && read_control() == 1) {
                    }
                    if (state_ != State::open) return false;
                    if (d.region >= regions.size() || !regions[d.region])
                        return bad("a descriptor for region " + std::to_string(d.region) +
                                   ", which the peer never announced");
                }
                const std::size_t size = regions[d.region].size();
                if (d.length == 0 || d.offset > size || d.length > size - d.offset)
                    return bad("a descriptor outside region " + std::to_string(d.region) +
                               " (offset " + std::to_string(d.offset) + ", length " +
                               std::to_string(d.length) + ", region of " + std::to_string(size) +
                               " bytes)");
                inq_.push_back(d);
                return true;
            }
            case kRelease:
                return released(d.cookie);
            case kReturn: {
                Lease mine = returned_payload(d.offset, d.region, d.length);
                if (!mine)
                    return bad("a return of " + std::to_string(d.length) + " bytes at " +
                               std::to_string(d.region) + " of payload " +
                               std::to_string(d.offset) +
                               ", which is not one of ours out, or lies outside it");
                returned_.push_back(std::move(mine));
                inq_.push_back(d);
                return true;
            }
            case kClose:
                peer_closed_ = true;
                inq_.push_back(d);
                return true;
            default:
                return bad("a descriptor of unknown type " + std::to_string(type_of(d)));
        }
    }

    bool bad(const std::string& what) {
        fail(-EPROTO, "the shm peer sent " + what + "; closing the connection");
        return false;
    }

    std::size_t queued_in() const { return inq_.size() - inq_head_; }

    void pop_front() {
        if (type_of(inq_[inq_head_]) == kReturn) returned_.pop_front();
        front_used_ = 0;
        if (++inq_head_ == inq_.size()) {
            inq_.clear();
            inq_head_ = 0;
        } else if (inq_head_ >= 256 && inq_head_ * 2 >= inq_.size()) {
            inq_.erase(inq_.begin(), inq_.begin() + static_cast<std::ptrdiff_t>(inq_head_));
            inq_head_ = 0;
        }
    }

    bool try_complete_recv() {
        if (!recv_active_ || recv_done_) return false;
        std::byte* dst = recv_.lease.data() + recv_.offset;
        bool eof = false;
        while (recv_.got < recv_.max && inq_head_ < inq_.size()) {
            const ShmDescriptor& d = inq_[inq_head_];
            const std::uint32_t type = type_of(d);
            if (type == kClose) {
                eof = true;
                break;
            }
            const std::byte* src;
            std::size_t total;
            if (type == kInline) {
                total = inline_len(d);
                src = inline_data(d);
            } else {
                total = d.length;
                // Once the caller has what it asked for, a payload is left
                // for take_payload(): a view, no copy (FrameReader takes it
                // after the header in front of it).
                if (recv_.got > 0 && recv_.got >= recv_.min && front_used_ == 0) break;
                src = type == kReturn ? returned_.front().data()
                                      : link_->peer_regions[d.region].data() + d.offset;
            }
            const std::size_t n = std::min(total - front_used_, recv_.max - recv_.got);
            std::memcpy(dst + recv_.got, src + front_used_, n);
            recv_.got += n;
            front_used_ += n;
            if (type != kInline) counters_.recv_copied_bytes += n;
            if (front_used_ == total) {
                if (type != kInline) {
                    ShmDescriptor r{};
                    r.flags = kRelease;
                    r.cookie = d.cookie;
                    releases_.push_back(r);
                }
                pop_front();
            }
        }
        if (inq_head_ == inq_.size() && peer_gone_) eof = true;
        flush_releases();
        if (recv_.got >= recv_.min) {
            finish_recv({recv_.got, 0, false});
            return true;
        }
        if (eof) {
            finish_recv({recv_.got, 0, true});
            return true;
        }
        return false;
    }

    void flush_releases() {
        if (releases_.empty()) return;
        link_->push_releases(releases_);
        releases_.clear();
    }

    void finish_recv(IoResult r) {
        recv_result_ = r;
        recv_done_ = true;
        counters_.bytes_received += r.bytes;
        counters_.recv_ops++;
        post_dispatch();
    }

    // -- sending -----------------------------------------------------------------

    /// Sends what is queued, in order, until one must wait. true: any left.
    bool flush_sends() {
        bool did = false;
        while (!queued_.empty() && state_ == State::open && !peer_gone_) {
            int r = try_send(queued_.front());
            if (r == 0) {
                arm_timer();  // retried by poll(); the timer for when no release will wake us
                break;
            }
            queued_.pop_front();
            did = true;
        }
        return did;
    }

    void append_inline(const std::byte* p, std::size_t n) {
        while (n > 0) {
            ShmDescriptor d{};
            const std::size_t k = std::min(n, kInlineBytes);
            d.flags = kInline | static_cast<std::uint32_t>(k << 8);
            std::memcpy(reinterpret_cast<std::byte*>(&d.offset), p, k);
            batch_.push_back(d);
            p += k;
            n -= k;
        }
    }

    /// 1: sent (or failed and completed), 0: must wait.
    int try_send(QueuedSend& q) {
        SendBuffers& b = q.buffers;
        batch_.clear();
        const std::size_t total = b.prefix_len + b.body_len;
        std::uint32_t slot = 0;
        Lease copy;
        bool by_ref = false;
        if (b.body_len <= kShmInlineBodyMax) {
            std::array<std::byte, SendBuffers::kMaxPrefix + kShmInlineBodyMax> tmp;
            std::memcpy(tmp.data(), b.prefix.data(), b.prefix_len);
            if (b.body_len) std::memcpy(tmp.data() + b.prefix_len, b.body.data() + b.body_offset, b.body_len);
            append_inline(tmp.data(), total);
        } else {
            if (free_slots_.empty()) return 0;  // ring_capacity payloads out: wait for releases
            SharedLocation loc;
            by_ref = pool_.locate(b.body, loc);
            std::uint64_t peer_cookie = 0;
            std::size_t into = 0;
            const Lease* held = nullptr;
            if (!by_ref && link_->view_of(b.body, peer_cookie, into, held)) {
                if (held) {
                    // Our own payload that came back: by reference again.
                    by_ref = pool_.locate(*held, loc);
                    loc.offset += static_cast<std::size_t>(b.body.data() - held->data());
                } else if (into + b.body_offset <= UINT32_MAX) {
                    return send_return(q, peer_cookie, into + b.body_offset);
                }
            }
            if (by_ref) {
                loc.offset += b.body_offset;
            } else {
                if (copied_out_ > 0 && copied_out_ + b.body_len > opt_.max_copied_out) return 0;
                int r = pool_.lease(b.body_len, copy);
                if (r == -ENOBUFS) return 0;  // the budget is out: wait for releases
                if (r < 0) {
                    done_send(std::move(b), std::move(q.handler), {0, r, false});
                    return 1;
                }
                std::memcpy(copy.data(), b.body.data() + b.body_offset, b.body_len);
                pool_.locate(copy, loc);
            }
            int r = announce(loc);
            if (r <= 0) return r;
            append_inline(b.prefix.data(), b.prefix_len);
            slot = free_slots_.back();
            ShmDescriptor d{};
            d.region = loc.region;
            d.flags = kPayload;
            d.offset = loc.offset;
            d.length = b.body_len;
            d.cookie = (std::uint64_t{slots_[slot].gen + 1} << 32) | slot;
            batch_.push_back(d);
        }
        if (batch_.empty()) {  // nothing at all (an empty part of a gather)
            done_send(std::move(b), std::move(q.handler), {0, 0, false});
            return 1;
        }
        int n = link_->push(batch_);
        if (n == 0) return 0;  // ring full: the peer is behind
        if (n < 0) {
            fail(-EPROTO, "the peer corrupted the shm ring (impossible indices)");
            return 1;
        }
        counters_.bytes_sent += total;
        counters_.send_ops++;
        if (b.body_len > kShmInlineBodyMax) {
            free_slots_.pop_back();
            SendSlot& s = slots_[slot];
            s.gen++;
            s.used = true;
            s.by_ref = by_ref;
            s.bytes = total;
            s.payload = b.body_len;
            if (by_ref) {
                counters_.by_reference_sends++;
                s.buffers = std::move(b);
                s.handler = std::move(q.handler);
                return 1;
            }
            counters_.send_copied_bytes += b.body_len;
            copied_out_ += b.body_len;
            s.copy = std::move(copy);
        } else if (b.body_len) {
            counters_.inline_sends++;
        }
        done_send(std::move(b), std::move(q.handler), {total, 0, false});
        return 1;
    }

    /// Sends back by reference a payload the peer sent us (`b.body` is our
    /// view of it): it stays held, like a payload of ours, until the peer
    /// releases the return. 1: sent (or failed and completed), 0: must wait.
    int send_return(QueuedSend& q, std::uint64_t peer_cookie, std::size_t into) {
        SendBuffers& b = q.buffers;
        if (free_slots_.empty()) return 0;
        append_inline(b.prefix.data(), b.prefix_len);
        const std::uint32_t slot = free_slots_.back();
        ShmDescriptor d{};
        d.flags = kReturn;
        d.region = static_cast<std::uint32_t>(into);
        d.offset = peer_cookie;
        d.length = b.body_len;
        d.cookie = (std::uint64_t{slots_[slot].gen + 1} << 32) | slot;
        batch_.push_back(d);
        int n = link_->push(batch_);
        if (n == 0) return 0;
        if (n < 0) {
            fail(-EPROTO, "the peer corrupted the shm ring (impossible indices)");
            return 1;
        }
        free_slots_.pop_back();
        SendSlot& s = slots_[slot];
        s.gen++;
        s.used = true;
        s.by_ref = true;
        s.bytes = b.prefix_len + b.body_len;
        s.payload = b.body_len;
        counters_.bytes_sent += s.bytes;
        counters_.send_ops++;
        counters_.by_reference_sends++;
        s.buffers = std::move(b);
        s.handler = std::move(q.handler);
        return 1;
    }

    /// Our own memory behind a payload the peer returns: bytes [into, into +
    /// length) of the payload `cookie` we have out. Empty when no such
    /// payload is out or the range is not inside it.
    Lease returned_payload(std::uint64_t cookie, std::size_t into, std::size_t length) const {
        const std::uint32_t idx = static_cast<std::uint32_t>(cookie);
        const std::uint32_t gen = static_cast<std::uint32_t>(cookie >> 32);
        if (idx >= slots_.size() || !slots_[idx].used || slots_[idx].gen != gen || length == 0)
            return {};
        const SendSlot& s = slots_[idx];
        if (into > s.payload || length > s.payload - into) return {};
        if (!s.by_ref) return s.copy.share(into, length);
        // A payload of the peer's that we returned is not ours to hand out.
        SharedLocation loc;
        std::uint64_t c;
        std::size_t off;
        const Lease* held = nullptr;
        if (!pool_.locate(s.buffers.body, loc) &&
            !(link_->view_of(s.buffers.body, c, off, held) && held))
            return {};
        return s.buffers.body.share(s.buffers.body_offset + into, length);
    }

    /// Sends the region's memfd the first time a payload in it goes out.
    int announce(const SharedLocation& loc) {
        if (loc.region < announced_.size() && announced_[loc.region]) return 1;
        CtlMsg m;
        m.type = kRegion;
        m.arg = loc.region;
        m.a = loc.region_bytes;
        int ret = send_with_fds(link_->sock.get(), std::as_bytes(std::span(&m, 1)),
                                std::span(&loc.fd, 1));
        if (ret == -EAGAIN) return 0;
        if (ret < 0) {
            if (ret == -EPIPE || ret == -ECONNRESET) {
                peer_is_gone();
                return 0;
            }
            fail(ret, errno_message("shm transport: cannot pass a region to the peer", -ret));
            return -1;
        }
        if (announced_.size() <= loc.region) announced_.resize(loc.region + 1);
        announced_[loc.region] = true;
        return 1;
    }

    bool released(std::uint64_t cookie) {
        const std::uint32_t idx = static_cast<std::uint32_t>(cookie);
        const std::uint32_t gen = static_cast<std::uint32_t>(cookie >> 32);
        if (idx >= slots_.size() || !slots_[idx].used || slots_[idx].gen != gen)
            return bad("a release of payload " + std::to_string(cookie) +
                       ", which is not out (forged or released twice)");
        complete_slot(idx, 0);
        return true;
    }

    void complete_slot(std::uint32_t idx, int err) {
        SendSlot& s = slots_[idx];
        s.used = false;
        free_slots_.push_back(idx);
        if (s.by_ref)
            done_send(std::move(s.buffers), std::move(s.handler), {err ? 0 : s.bytes, err, false});
        else {
            copied_out_ -= s.copy.size();
            s.copy.reset();
        }
    }

    void done_send(SendBuffers b, SendHandler h, IoResult r) {
        done_sends_.push_back({std::move(b), std::move(h), r});
        post_dispatch();
    }

    // -- waiting -------------------------------------------------------------------

    void wake_up_poller() {
        idle_polls_ = 0;
        ring_.add_poller(this);
    }

    Poller::State go_idle() {
        ring_.remove_poller(this);
        if (queued_in() >= opt_.ring_capacity) return Poller::State::idle;  // recv() resumes
        if (wait_op_) return Poller::State::idle;
        auto seq = link_->in.prepare_sleep();
        if (!seq) {
            ring_.add_poller(this);
            return Poller::State::spin;  // descriptors arrived meanwhile
        }
        counters_.sleeps++;
        wait_op_ = new LinkOp(this, link_, LinkOp::Kind::wait);
        io_uring_sqe* sqe = ring_.sqe(wait_op_);
        if (wait_by_eventfd_)
            io_uring_prep_read(sqe, link_->my_eventfd.get(), &wait_op_->value, sizeof wait_op_->value, 0);
        else
            compat::prep_futex_wait(sqe, link_->in.wake_word(), *seq, FUTEX2_SIZE_U32);
        return Poller::State::idle;
    }

    void arm_timer() {
        if (timer_op_) return;
        timer_op_ = new LinkOp(this, link_, LinkOp::Kind::timer);
        timer_op_->ts.tv_nsec = 1'000'000;  // 1 ms
        io_uring_prep_timeout(ring_.sqe(timer_op_), &timer_op_->ts, 0, 0);
    }

    void post_dispatch() {
        if (posted_) return;
        posted_ = true;
        ring_.post(&dispatch_op_, 0);
    }

    // -- failure -------------------------------------------------------------------

    void peer_is_gone() {
        if (peer_gone_) return;
        // What the peer published before it went (its releases, its close)
        // is read first: a clean close is then not taken for a reset.
        if (state_ == State::open) pump_in();
        peer_gone_ = true;
        // The peer's process holds nothing of ours any more (its socket
        // stays open while it holds views): every payload out comes back.
        for (std::uint32_t i = 0; i < slots_.size(); ++i)
            if (slots_[i].used) complete_slot(i, peer_closed_ ? 0 : -ECONNRESET);
        while (!queued_.empty()) {
            done_send(std::move(queued_.front().buffers), std::move(queued_.front().handler),
                      {0, -EPIPE, false});
            queued_.pop_front();
        }
        if (state_ == State::handshake) {
            fail(-ECONNRESET, "the shm peer went away during the handshake");
            return;
        }
        if (state_ == State::open) {
            pump_in();
            if (state_ == State::open) try_complete_recv();
        }
    }

    void fail(int code, std::string why) {
        if (state_ == State::failed || state_ == State::closed) return;
        error_ = std::move(why);
        error_code_ = code;
        state_ = State::failed;
        abort_all(code);
        ring_.remove_poller(this);
        // Tell the peer; our mappings of its memory stay while our leases do.
        ::shutdown(link_->sock.get(), SHUT_RDWR);
    }

    void abort_all(int err) {
        abort_pending(err);
        abort_slots(err);
    }
    void abort_pending(int err) {
        if (recv_active_ && !recv_done_) finish_recv({recv_.got, err, false});
        while (!queued_.empty()) {
            done_send(std::move(queued_.front().buffers), std::move(queued_.front().handler),
                      {0, err, false});
            queued_.pop_front();
        }
    }
    void abort_slots(int err) {
        for (std::uint32_t i = 0; i < slots_.size(); ++i)
            if (slots_[i].used) complete_slot(i, err);
    }
    std::size_t slots_out() const { return slots_.size() - free_slots_.size(); }

    // -- closed, payloads still out ----------------------------------------------

    /// Takes the peer's releases; what else it sends is given back unread.
    Poller::State poll_lingering() {
        link_->flush_backlog();
        bool did = false;
        std::array<ShmDescriptor, 64> buf;
        int n;
        while ((n = link_->in.pop(buf)) > 0) {
            did = true;
            for (int i = 0; i < n && lingering_; ++i) {
                const ShmDescriptor& d = buf[i];
                if (type_of(d) == kRelease) {
                    if (!released(d.cookie)) return end_linger(-EPROTO), Poller::State::idle;
                } else if (type_of(d) == kPayload || type_of(d) == kReturn) {
                    ShmDescriptor r{};
                    r.flags = kRelease;
                    r.cookie = d.cookie;
                    releases_.push_back(r);
                }
            }
        }
        flush_releases();
        if (n < 0) return end_linger(-EPROTO), Poller::State::idle;
        if (slots_out() == 0) return end_linger(0), Poller::State::idle;
        if (did) {
            idle_polls_ = 0;
            return Poller::State::progress;
        }
        if (idle_polls_++ == 0) last_activity_ = Clock::now();
        if (spin_.count() > 0 && (idle_polls_ % 64 != 0 || Clock::now() - last_activity_ < spin_))
            return Poller::State::spin;
        return go_idle();
    }

    /// Destroyed while lingering: the payloads still out go to the link with
    /// the socket watch and the deadline, which outlive the stream (their
    /// sends' handlers are dropped, as every pending one is at destruction).
    void hand_lingering_to_link() {
        for (std::uint32_t i = 0; i < slots_.size(); ++i) {
            SendSlot& s = slots_[i];
            if (!s.used) continue;
            s.used = false;
            free_slots_.push_back(i);
            link_->lingering.push_back(s.by_ref ? std::move(s.buffers.body) : std::move(s.copy));
            s.buffers = SendBuffers{};
            s.handler = SendHandler{};
        }
        lingering_ = false;
        if (!sock_op_) arm_socket();
        link_->ring = &ring_;
        link_->linger_ops[0] = sock_op_;
        link_->linger_ops[1] = linger_op_;
        sock_op_->stream = nullptr;
        linger_op_->stream = nullptr;
        sock_op_ = linger_op_ = nullptr;  // not cancelled below
        ring_.remove_poller(this);
    }

    /// Ends the wait after close(): what is still out returns to the pool,
    /// its sends completing with `err` (0: the peer is done with it).
    void end_linger(int err) {
        if (!lingering_) return;
        lingering_ = false;
        abort_slots(err);
        ring_.remove_poller(this);
        if (linger_op_) {
            ring_.cancel(linger_op_);
            ring_.submit();
        }
    }

    Ring& ring_;
    BufferPool& pool_;
    ShmStreamOptions opt_;
    const bool connector_;
    const std::chrono::microseconds spin_;
    ShmLink* link_ = nullptr;
    State state_ = State::handshake;
    bool wait_by_eventfd_ = false;
    std::string error_;
    int error_code_ = 0;
    mutable StreamCounters counters_;

    PendingRecv recv_;
    bool recv_active_ = false;
    bool recv_done_ = false;
    IoResult recv_result_;
    std::vector<ShmDescriptor> inq_;
    std::size_t inq_head_ = 0;
    std::size_t front_used_ = 0;
    std::vector<ShmDescriptor> releases_;
    std::deque<Lease> returned_;  // our memory behind each kReturn in inq_, in order
    bool peer_closed_ = false;
    bool peer_gone_ = false;

    std::vector<SendSlot> slots_;
    std::vector<std::uint32_t> free_slots_;
    std::deque<QueuedSend> queued_;
    std::vector<bool> announced_;
    std::size_t copied_out_ = 0;  // bytes of copies the peer has not released
    std::vector<ShmDescriptor> batch_;
    std::vector<DoneSend> done_sends_, dispatching_sends_;

    DispatchOp dispatch_op_;
    bool posted_ = false;
    bool in_poll_ = false;
    LinkOp* wait_op_ = nullptr;
    LinkOp* sock_op_ = nullptr;
    LinkOp* timer_op_ = nullptr;
    LinkOp* handshake_op_ = nullptr;
    LinkOp* linger_op_ = nullptr;
    bool lingering_ = false;  // closed with payloads out: see close()
    Clock::time_point last_activity_{};  // when polls started finding nothing
    std::uint32_t idle_polls_ = 0;        // polls since the last activity
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

void LinkOp::complete(int32_t res, uint32_t) {
    ShmStream* s = stream;
    ShmLink* l = link;
    Kind k = kind;
    if (!s && (this == l->linger_ops[0] || this == l->linger_ops[1])) {
        // The stream is gone, payloads linger (hand_lingering_to_link).
        const int me = this == l->linger_ops[0] ? 0 : 1;
        l->linger_ops[me] = nullptr;
        bool end = true;
        if (k == Kind::socket && res >= 0) {
            // Readable: the peer's end of file ends it; messages are dropped.
            alignas(8) std::byte buf[64];
            std::vector<Fd> fds;
            int n;
            while ((n = recv_with_fds(l->sock.get(), buf, fds)) > 0) fds.clear();
            if (n == -EAGAIN) {
                end = false;
                auto* again = new LinkOp(nullptr, l, Kind::socket);
                io_uring_prep_poll_add(l->ring->sqe(again), l->sock.get(), POLLIN | POLLRDHUP);
                l->linger_ops[me] = again;
            }
        }
        if (end && res != -ECANCELED) {
            l->lingering.clear();  // the peer is done with them, or kept them too long
            if (Completion* other = l->linger_ops[1 - me]) {
                l->linger_ops[1 - me] = nullptr;
                l->ring->cancel(other);  // completes later with stream null: nothing left
                l->ring->submit();
            }
        }
    }
    delete this;
    if (s) s->on_op(k, res);
    l->unref();
}

}  // namespace

std::unique_ptr<Stream> make_shm_stream(Ring& ring, Fd fd, BufferPool& pool, bool connector,
                                        const ShmStreamOptions& options) {
    return std::make_unique<ShmStream>(ring, std::move(fd), pool, connector, options);
}

}  // namespace ringxfer::engine
