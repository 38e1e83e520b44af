#include "ringxfer/engine/ring.hpp"

#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "ringxfer/engine/error.hpp"

namespace ringxfer::engine {
namespace {

std::string setup_failure_message(int err) {
    std::string cause;
    switch (err) {
        case ENOSYS:
            cause = "the kernel has no io_uring support (ENOSYS); use a kernel built with "
                    "CONFIG_IO_URING (5.19 or newer recommended)";
            break;
        case EPERM:
            cause = "io_uring is forbidden here (EPERM): a seccomp filter (e.g. Docker's default "
                    "profile) blocks io_uring_setup, or sysctl kernel.io_uring_disabled is set; "
                    "allow io_uring_setup/io_uring_enter/io_uring_register in the seccomp "
                    "profile or set kernel.io_uring_disabled=0";
            break;
        case EOPNOTSUPP:
            cause = "io_uring is not supported for this process (EOPNOTSUPP)";
            break;
        case ENOMEM:
            cause = "not enough locked memory for the rings (ENOMEM); raise RLIMIT_MEMLOCK "
                    "(ulimit -l) or use fewer entries";
            break;
        default:
            return errno_message("cannot set up io_uring", err);
    }
    return "cannot set up io_uring: " + cause;
}

// Debian's liburing 2.3 declares io_uring_register_restrictions() and
// io_uring_enable_rings() but does not export them; the syscall is stable.
int register_raw(io_uring& ring, unsigned op, const void* arg, unsigned n) {
    long ret = ::syscall(__NR_io_uring_register, ring.ring_fd, op, arg, n);
    return ret < 0 ? -errno : static_cast<int>(ret);
}

}  // namespace

std::string RingFeatures::setup_flags_string() const {
    std::string s;
    auto add = [&](unsigned flag, const char* name) {
        if (setup_flags & flag) s += (s.empty() ? "" : "|") + std::string(name);
    };
    add(IORING_SETUP_SQPOLL, "SQPOLL");
    add(IORING_SETUP_SUBMIT_ALL, "SUBMIT_ALL");
    add(IORING_SETUP_COOP_TASKRUN, "COOP_TASKRUN");
    add(IORING_SETUP_TASKRUN_FLAG, "TASKRUN_FLAG");
    add(IORING_SETUP_SINGLE_ISSUER, "SINGLE_ISSUER");
    add(IORING_SETUP_DEFER_TASKRUN, "DEFER_TASKRUN");
    return s.empty() ? "none" : s;
}

Ring::Ring(const RingOptions& options) : busy_poll_(options.busy_poll) {
    setup(options);
    if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
        auto has = [&](int op) { return io_uring_opcode_supported(probe, op) != 0; };
        features_.op_send_zc = has(IORING_OP_SEND_ZC);
        features_.op_sendmsg_zc = has(IORING_OP_SENDMSG_ZC);
        features_.op_read_fixed = has(IORING_OP_READ_FIXED);
        features_.op_recv = has(IORING_OP_RECV);
        features_.op_sendmsg = has(IORING_OP_SENDMSG);
        features_.op_accept = has(IORING_OP_ACCEPT);
        features_.op_connect = has(IORING_OP_CONNECT);
        features_.op_async_cancel = has(IORING_OP_ASYNC_CANCEL);
        features_.op_futex_wait = has(IORING_OP_FUTEX_WAIT) && has(IORING_OP_FUTEX_WAKE);
        io_uring_free_probe(probe);
    }
    if (features_.setup_flags & IORING_SETUP_R_DISABLED) {
        restrict_to_engine_ops();
        int ret = register_raw(ring_, IORING_REGISTER_ENABLE_RINGS, nullptr, 0);
        if (ret < 0) {
            io_uring_queue_exit(&ring_);
            throw Error(-ret, errno_message("cannot enable the io_uring instance", -ret));
        }
        features_.setup_flags &= ~IORING_SETUP_R_DISABLED;
    }
    if (!features_.op_recv || !features_.op_sendmsg) {
        io_uring_queue_exit(&ring_);
        throw Error(EOPNOTSUPP,
                    "cannot use io_uring: the kernel lacks RECV/SENDMSG opcodes (needs 5.6+)");
    }
}

void Ring::setup(const RingOptions& options) {
    // Most capable first; the kernel rejects unknown flags with EINVAL, so
    // walk down the list. The first attempt that fails with something other
    // than EINVAL is a real failure (ENOSYS, EPERM, ...) and is reported.
    // A kernel without R_DISABLED (before 5.10) gets the same walk without it.
    const unsigned base = IORING_SETUP_SUBMIT_ALL;
    // TASKRUN_FLAG with DEFER_TASKRUN: the kernel sets IORING_SQ_TASKRUN
    // when deferred completions wait, so a thread that polls (advance(),
    // busy_poll(), shm pollers) enters the kernel only then instead of on
    // every look (a 64 B shm ping-pong made one io_uring_enter per look).
    const unsigned attempts[5] = {
        base | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        base | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        base | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        base,
        0,
    };
    const int first = options.defer_taskrun && !options.sqpoll ? 0 : 2;
    int ret = -EINVAL;
    io_uring_params params{};
    for (unsigned disabled : {options.restrict_ops ? IORING_SETUP_R_DISABLED : 0u, 0u}) {
        for (int i = first; i < 5; ++i) {
            params = {};
            params.flags = attempts[i] | disabled | IORING_SETUP_CQSIZE;
            params.cq_entries = options.entries * 2;
            if (options.sqpoll) {
                params.flags |= IORING_SETUP_SQPOLL;
                params.sq_thread_idle = 1000;
            }
            ret = io_uring_queue_init_params(options.entries, &ring_, &params);
            if (ret == 0 || ret != -EINVAL) break;
        }
        if (ret == 0 || ret != -EINVAL || disabled == 0) break;
    }
    if (ret < 0) throw Error(-ret, setup_failure_message(-ret));

    features_.setup_flags = params.flags & ~IORING_SETUP_CQSIZE;
    features_.kernel_features = params.features;
    features_.nodrop = params.features & IORING_FEAT_NODROP;
    features_.recvsend_bundle = params.features & IORING_FEAT_RECVSEND_BUNDLE;
}

const std::vector<int>& Ring::allowed_opcodes() {
    // NOP: fault injection replaces failed SQEs with NOPs. TIMEOUT: liburing
    // uses one for run_once(timeout) on kernels without EXT_ARG.
    static const std::vector<int> ops = {
        IORING_OP_NOP,     IORING_OP_RECV,   IORING_OP_SEND,         IORING_OP_SENDMSG,
        IORING_OP_SEND_ZC, IORING_OP_READ_FIXED, IORING_OP_ACCEPT,   IORING_OP_CONNECT,
        IORING_OP_ASYNC_CANCEL, IORING_OP_TIMEOUT,
        // The shm transport: its peer's wake-ups (a futex word, or an eventfd
        // read on kernels before 6.7) and the rendezvous socket's poll.
        IORING_OP_FUTEX_WAIT, IORING_OP_READ, IORING_OP_POLL_ADD,
    };
    return ops;
}

void Ring::restrict_to_engine_ops() {
    // Once restricted, every io_uring_register() call not listed here fails
    // with EACCES, and so does every SQE with an opcode or flag not listed.
    static const int register_ops[] = {
        IORING_REGISTER_PROBE,         IORING_REGISTER_BUFFERS2,
        IORING_REGISTER_BUFFERS_UPDATE, IORING_UNREGISTER_BUFFERS,
        IORING_REGISTER_EVENTFD,       IORING_UNREGISTER_EVENTFD,
        IORING_REGISTER_PBUF_RING,     IORING_UNREGISTER_PBUF_RING,
    };
    std::vector<io_uring_restriction> r;
    for (int op : allowed_opcodes()) {
        // A kernel that does not know an opcode refuses the whole list.
        if (op == IORING_OP_FUTEX_WAIT && !features_.op_futex_wait) continue;
        io_uring_restriction x{};
        x.opcode = IORING_RESTRICTION_SQE_OP;
        x.sqe_op = static_cast<__u8>(op);
        r.push_back(x);
    }
    for (int op : register_ops) {
        io_uring_restriction x{};
        x.opcode = IORING_RESTRICTION_REGISTER_OP;
        x.register_op = static_cast<__u8>(op);
        r.push_back(x);
    }
    io_uring_restriction flags{};
    flags.opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
    flags.sqe_flags = IOSQE_BUFFER_SELECT | IOSQE_ASYNC | IOSQE_FIXED_FILE;
    r.push_back(flags);
    // A kernel that refuses leaves the ring unrestricted but usable.
    features_.restricted =
        register_raw(ring_, IORING_REGISTER_RESTRICTIONS, r.data(), static_cast<unsigned>(r.size())) == 0;
}

Ring::~Ring() {
    io_uring_queue_exit(&ring_);
    if (event_fd_ >= 0) ::close(event_fd_);
}

io_uring_sqe* Ring::sqe(Completion* owner) {
    io_uring_sqe* s = io_uring_get_sqe(&ring_);
    while (s == nullptr) {
        ++stats_.sq_full;
        if (submit() <= 0) run_once(0, std::chrono::nanoseconds(0));
        s = io_uring_get_sqe(&ring_);
    }
    io_uring_sqe_set_data(s, owner);
    if (owner != nullptr) ++in_flight_;
    return s;
}

void Ring::set_fault_injector([[maybe_unused]] FaultInjector* injector) noexcept {
#ifdef RINGXFER_FAULT_INJECTION
    injector_ = injector;
#endif
}

void Ring::inject_faults() {
#ifdef RINGXFER_FAULT_INJECTION
    if (injector_ == nullptr) return;
    // The SQEs filled since the last submission, not yet visible to the kernel.
    io_uring_sq& sq = ring_.sq;
    for (unsigned i = sq.sqe_head; i != sq.sqe_tail; ++i)
        injector_->on_submit(&sq.sqes[i & sq.ring_mask]);
#endif
}

int Ring::submit() {
    inject_faults();
    ++stats_.submits;
    int ret = io_uring_submit(&ring_);
    // EBUSY/EAGAIN: the kernel wants us to reap first (CQ back-pressure).
    return ret;
}

void Ring::cancel(Completion* owner) {
    io_uring_sqe* s = sqe(nullptr);
    io_uring_prep_cancel(s, owner, 0);
}

int Ring::completion_fd() {
    if (event_fd_ >= 0) return event_fd_;
    int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) return -errno;
    int ret = io_uring_register_eventfd(&ring_, fd);
    if (ret < 0) {
        ::close(fd);
        return ret;
    }
    event_fd_ = fd;
    return fd;
}

void Ring::clear_completion_fd() noexcept {
    if (event_fd_ >= 0) {
        std::uint64_t drained;
        [[maybe_unused]] auto n = ::read(event_fd_, &drained, sizeof drained);
    }
}

int Ring::advance() { return advance(true); }

void Ring::post(Completion* owner, std::int32_t res) {
    posted_.push_back({owner, res});
    ++in_flight_;
}

void Ring::unpost(Completion* owner) noexcept {
    for (auto* list : {&posted_, &dispatching_}) {
        for (auto& p : *list) {
            if (p.owner == owner) {
                p.owner = nullptr;
                --in_flight_;
            }
        }
    }
}

void Ring::add_poller(Poller* p) {
    if (std::find(pollers_.begin(), pollers_.end(), p) == pollers_.end()) pollers_.push_back(p);
}

void Ring::remove_poller(Poller* p) noexcept {
    auto it = std::find(pollers_.begin(), pollers_.end(), p);
    if (it == pollers_.end()) return;
    if (polling_)
        *it = nullptr;  // compacted once run_pollers() is done iterating
    else
        pollers_.erase(it);
}

int Ring::dispatch_posted() {
    if (dispatching_posted_) return 0;  // re-entered from a handler (sqe() on a full SQ)
    dispatching_posted_ = true;
    int n = 0;
    while (!posted_.empty()) {
        // Handlers may post again: those run in the next round of this loop.
        dispatching_.swap(posted_);
        for (std::size_t i = 0; i < dispatching_.size(); ++i) {
            Posted p = dispatching_[i];
            if (p.owner == nullptr) continue;  // withdrawn
            // Taken: an unpost() from inside the handler (its owner being
            // destroyed) must not find it and count it a second time.
            dispatching_[i].owner = nullptr;
            --in_flight_;
            ++n;
            p.owner->complete(p.res, 0);
        }
        dispatching_.clear();
    }
    dispatching_posted_ = false;
    return n;
}

Poller::State Ring::run_pollers() {
    if (pollers_.empty() || polling_) return Poller::State::idle;
    Poller::State best = Poller::State::idle;
    polling_ = true;
    for (std::size_t i = 0; i < pollers_.size(); ++i) {
        if (pollers_[i] == nullptr) continue;
        Poller::State s = pollers_[i]->poll();
        if (s > best) best = s;
    }
    polling_ = false;
    std::erase(pollers_, nullptr);
    return best;
}

int Ring::spin_pollers(std::chrono::nanoseconds timeout) {
    // Pollers that want to spin: alternate them with non-blocking looks at
    // the CQ until one of them (or a CQE) brings work, they all go idle, or
    // the timeout passes. Returns what was dispatched (0: go on to block).
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (unsigned spins = 1;; ++spins) {
        int n = advance(false);
        if (n != 0) return n;
        Poller::State s = run_pollers();
        n = dispatch_posted();
        if (n > 0 || s == Poller::State::progress) return n > 0 ? n : 1;
        if (s == Poller::State::idle) return 0;
        // The clock every 64th turn: in a VM a read costs more than a turn.
        if (timeout != std::chrono::nanoseconds::max() && spins % 64 == 0 &&
            std::chrono::steady_clock::now() >= deadline)
            return 0;
    }
}

int Ring::advance(bool clear_after) {
    int posted = dispatch_posted();
    if (!pollers_.empty()) {
        run_pollers();
        posted += dispatch_posted();
    }
    // Clearing the eventfd can lose no wake-up: every CQE posted before the
    // clear is reaped after it, and every CQE posted after it signals again.
    // Not clearing can only cost a spurious wake-up (run_once(0) clears).
    if (needs_enter()) {
        inject_faults();
        ++stats_.submits;
        int ret = io_uring_submit_and_get_events(&ring_);
        if (ret < 0 && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN) return ret;
    }
    int n = reap();
    if (clear_after && n > 0 && event_fd_ >= 0) {
        clear_completion_fd();
        n += reap();
    }
    return n + posted;
}

bool Ring::needs_enter() noexcept {
    const bool may_have_task_work =
        !(features_.setup_flags & IORING_SETUP_TASKRUN_FLAG) ||
        (IO_URING_READ_ONCE(*ring_.sq.kflags) & IORING_SQ_TASKRUN);
    return io_uring_sq_ready(&ring_) > 0 || may_have_task_work || io_uring_cq_has_overflow(&ring_);
}

int Ring::run_once(unsigned min_complete, std::chrono::nanoseconds timeout) {
    clear_completion_fd();
    // Non-blocking: as advance(), the descriptor cleared first (the caller
    // was woken through it) and not again.
    if (min_complete == 0 || timeout.count() == 0) return advance(false);
    if (!posted_.empty() || !pollers_.empty()) {
        // Work that needs no kernel: do it (and never sleep after it).
        int n = dispatch_posted();
        Poller::State s = run_pollers();
        n += dispatch_posted();
        if (n > 0 || s == Poller::State::progress) return n + advance(false);
        if (s == Poller::State::spin && (n = spin_pollers(timeout)) != 0) return n;
    }
    int ret;
    inject_faults();
    ++stats_.submits;
    if (busy_poll_.count() > 0 && io_uring_cq_ready(&ring_) < min_complete &&
               (ret = busy_poll(min_complete, timeout)) != 0) {
        // Done while polling (or failed): reaped below.
    } else if (timeout == std::chrono::nanoseconds::max()) {
        ret = io_uring_submit_and_wait(&ring_, min_complete);
    } else {
        __kernel_timespec ts{};
        ts.tv_sec = timeout.count() / 1'000'000'000;
        ts.tv_nsec = timeout.count() % 1'000'000'000;
        io_uring_cqe* cqe = nullptr;
        ret = io_uring_submit_and_wait_timeout(&ring_, &cqe, min_complete, &ts, nullptr);
    }
    if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN) return ret;
    return reap();
}

int Ring::busy_poll(unsigned min_complete, std::chrono::nanoseconds timeout) {
    // Returns 1 when min_complete CQEs are ready, -errno on failure, 0 when
    // the poll time ran out (the caller then blocks as usual; a timeout
    // shorter than the poll time ends the poll early, and the caller's
    // blocking wait uses the whole timeout again: at most 2x it).
    auto limit = std::min<std::chrono::nanoseconds>(busy_poll_, timeout);
    auto deadline = std::chrono::steady_clock::now() + limit;
    do {
        if (needs_enter()) {
            ++stats_.busy_polls;
            int ret = io_uring_submit_and_get_events(&ring_);
            if (ret < 0 && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN) return ret;
        }
        if (io_uring_cq_ready(&ring_) >= min_complete) return 1;
    } while (std::chrono::steady_clock::now() < deadline);
    return 0;
}

int Ring::reap() {
    // Copy a batch out and advance the CQ before dispatching: a completion
    // handler may submit (and, with a full SQ, reap) again without seeing the
    // same CQE twice.
    struct Entry {
        Completion* owner;
        std::int32_t res;
        std::uint32_t flags;
    };
    int total = 0;
    for (;;) {
        std::array<io_uring_cqe*, 64> cqes;
        // liburing's inline CQ walk (io_uring_peek_batch_cqe is a call into
        // the shared library that also re-checks for overflow, handled below).
        unsigned n = 0;
        unsigned head;
        io_uring_cqe* c;
        io_uring_for_each_cqe(&ring_, head, c) {
            cqes[n++] = c;
            if (n == cqes.size()) break;
        }
        if (n == 0) {
            // CQ overflow: with IORING_FEAT_NODROP the kernel keeps the CQEs
            // that did not fit and sets this flag; flushing them into the now
            // drained CQ and reaping again loses nothing. (liburing's peek
            // flushes too when it finds the CQ empty; this does not rely on it.)
            if (!io_uring_cq_has_overflow(&ring_)) break;
            io_uring_get_events(&ring_);
            if (io_uring_cq_ready(&ring_) == 0) break;
            continue;
        }
        std::array<Entry, 64> batch;
        for (unsigned i = 0; i < n; ++i) {
            batch[i] = {static_cast<Completion*>(io_uring_cqe_get_data(cqes[i])), cqes[i]->res,
                        cqes[i]->flags};
#ifdef RINGXFER_FAULT_INJECTION
            if (injector_)
                batch[i].res = injector_->on_complete(cqes[i]->user_data, batch[i].res,
                                                      batch[i].flags);
#endif
        }
        io_uring_cq_advance(&ring_, n);
        stats_.cqes += n;
        for (unsigned i = 0; i < n; ++i) {
            if (batch[i].owner == nullptr) continue;
            if (!(batch[i].flags & IORING_CQE_F_MORE)) --in_flight_;
            batch[i].owner->complete(batch[i].res, batch[i].flags);
        }
        total += static_cast<int>(n);
    }
    return total;
}

}  // namespace ringxfer::engine
