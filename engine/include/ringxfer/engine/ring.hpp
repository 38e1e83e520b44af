// Ring: one io_uring instance, driven by one thread.
//
// Ownership rule: every SQE's user_data is the address of a Completion that
// owns everything the kernel may touch for that operation (buffers, iovecs,
// msghdr, sockaddr) and stays alive until the operation's *final* CQE (the
// first CQE without IORING_CQE_F_MORE). user_data 0 is reserved for internal
// fire-and-forget requests (cancellations) whose CQEs are dropped.
//
// Threading: a Ring is not thread-safe. One thread submits and reaps; the
// ring is created with SINGLE_ISSUER|DEFER_TASKRUN when the kernel allows it.
//
// Foreign event loops: completion_fd() returns an eventfd that becomes
// readable when CQEs are posted; poll it, then call run_once(0) (never blocks).
// Work done between wake-ups (a send from the loop's own callbacks) goes
// through advance(), which enters the kernel only when it must.
// Such a ring should be set up without DEFER_TASKRUN (RingOptions::defer_taskrun).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ringxfer/engine/compat.hpp"
#include "ringxfer/engine/fault_injection.hpp"

namespace ringxfer::engine {

/// Receives the CQEs of one in-flight operation.
class Completion {
public:
    /// Called once per CQE. `flags & IORING_CQE_F_MORE` says more CQEs for
    /// this operation will follow; without it this is the final one and the
    /// object may free itself.
    virtual void complete(int32_t res, uint32_t flags) = 0;

protected:
    ~Completion() = default;
};

/// Something a Ring checks for work between completions: a transport whose
/// events arrive through shared memory instead of the kernel (the shm
/// transport). Registered while it may have work; run_once() asks every
/// registered poller before it sleeps, and sleeps only when all of them are
/// idle.
class Poller {
public:
    enum class State {
        idle,      ///< nothing to do, a wake-up is armed (an SQE): the ring may sleep
        spin,      ///< nothing yet, but poll again before sleeping
        progress,  ///< did work (ran handlers or posted completions)
    };
    /// Never blocks. May add or remove pollers (itself included).
    virtual State poll() = 0;

protected:
    ~Poller() = default;
};

struct RingOptions {
    unsigned entries = 256;  ///< SQ size; the CQ is twice that.
    /// Try SINGLE_ISSUER|DEFER_TASKRUN first. Not for a ring that sleeps in a
    /// foreign loop on completion_fd(): deferred task work runs only when
    /// this thread enters the ring, and a completion can wait for that
    /// unsignalled (the Python engine turns it off: docs/python.md).
    bool defer_taskrun = true;
    bool sqpoll = false;        ///< kernel SQ polling thread (costs a core)
    /// Create the ring disabled and restrict it to the opcodes, SQE flags and
    /// register calls ringxfer uses (IORING_REGISTER_RESTRICTIONS) before
    /// enabling it; skipped where the kernel cannot.
    bool restrict_ops = true;
    /// run_once() that would block first polls for completions this long
    /// (non-blocking io_uring_enter calls, which also run DEFER_TASKRUN task
    /// work) before sleeping: a waiting CPU that never goes idle answers a
    /// wake-up in a few µs instead of tens (idle exit, in a VM a halt exit).
    /// Costs a CPU while it spins; 0: sleep at once.
    std::chrono::microseconds busy_poll{0};
};

/// What the kernel gave us, probed once at set-up.
struct RingFeatures {
    unsigned setup_flags = 0;  ///< IORING_SETUP_* obtained
    unsigned kernel_features = 0;  ///< io_uring_params.features
    bool nodrop = false;           ///< IORING_FEAT_NODROP
    bool op_send_zc = false;
    bool op_sendmsg_zc = false;
    bool op_read_fixed = false;
    bool op_recv = false;
    bool op_sendmsg = false;
    bool op_accept = false;
    bool op_connect = false;
    bool op_async_cancel = false;
    bool op_futex_wait = false;  ///< IORING_OP_FUTEX_WAIT/WAKE (6.7+)
    bool recvsend_bundle = false;
    /// The ring only accepts the opcodes listed in Ring::allowed_opcodes().
    bool restricted = false;

    /// e.g. "SINGLE_ISSUER|DEFER_TASKRUN" or "none".
    std::string setup_flags_string() const;
};

class Ring {
public:
    /// Sets up the ring. Throws engine::Error with a message naming the cause
    /// (ENOSYS: kernel without io_uring; EPERM: seccomp or
    /// kernel.io_uring_disabled; ...) and the remedy.
    explicit Ring(const RingOptions& options = {});
    ~Ring();
    Ring(const Ring&) = delete;
    Ring& operator=(const Ring&) = delete;

    const RingFeatures& features() const noexcept { return features_; }
    /// RingOptions::busy_poll as set up.
    std::chrono::microseconds busy_poll_window() const noexcept { return busy_poll_; }

    /// An SQE whose user_data is `owner`; never null. Full-SQ policy (the one
    /// place it is written down): when the SQ is full, submit what is queued
    /// and take the freed slot; if the kernel cannot take more (busy with CQ
    /// back-pressure), reap and dispatch completions, then try again.
    io_uring_sqe* sqe(Completion* owner);

    /// Submits queued SQEs without waiting. Returns count or -errno.
    int submit();

    /// Submits, waits until at least `min_complete` CQEs are ready or
    /// `timeout` passes (a zero timeout never blocks), then reaps and
    /// dispatches every ready CQE in batches. Returns the number dispatched or
    /// -errno (-ETIME is not an error: it returns 0). Clears completion_fd()
    /// first; the non-blocking form otherwise costs what advance() costs.
    int run_once(unsigned min_complete = 1,
                 std::chrono::nanoseconds timeout = std::chrono::nanoseconds::max());

    /// For a caller that is already running rather than woken through
    /// completion_fd(): submits queued SQEs and dispatches ready CQEs without
    /// blocking. It enters the kernel only when an SQE is queued, the CQ
    /// overflowed, or task work may be pending (always on a ring without
    /// TASKRUN_FLAG, which cannot tell; on one with it, when the kernel set
    /// IORING_SQ_TASKRUN), so a caller with nothing to submit costs no
    /// syscall. Having dispatched something, it clears completion_fd() and
    /// reaps once more: the descriptor then signals only CQEs posted after
    /// that, and a foreign loop is not woken for completions handled here.
    /// Returns the number dispatched or -errno.
    int advance();

    /// Operations submitted whose final CQE has not been reaped yet.
    std::size_t in_flight() const noexcept { return in_flight_; }

    /// Completes `owner` (complete(res, 0)) from user space at the next
    /// run_once()/advance(), never inside this call: a handler that must not
    /// run re-entrantly (a recv satisfied by bytes already in shared memory)
    /// goes through here. Counted in in_flight() until dispatched; `owner`
    /// must stay alive until then or be withdrawn with unpost().
    void post(Completion* owner, std::int32_t res);
    /// Withdraws every undispatched post() of `owner`.
    void unpost(Completion* owner) noexcept;
    /// What a caller about to sleep on completion_fd() must first run
    /// advance() for: a post() signals no descriptor, and a Poller arms its
    /// wake-up only when polled (the Python engine, driven by a foreign loop,
    /// asks after every call that may have touched a stream).
    bool has_posted() const noexcept { return !posted_.empty(); }
    bool has_pollers() const noexcept { return !pollers_.empty(); }
    /// Registers / unregisters a Poller (idempotent).
    void add_poller(Poller* p);
    void remove_poller(Poller* p) noexcept;

    /// Asks the kernel to cancel the operation owned by `owner` (its final CQE
    /// still arrives, typically with -ECANCELED).
    void cancel(Completion* owner);

    /// eventfd signalled on CQE posting, created and registered on first call.
    /// Returns -errno on failure.
    int completion_fd();

    io_uring* raw() noexcept { return &ring_; }

    /// SQE opcodes a restricted ring accepts (everything the engine submits).
    static const std::vector<int>& allowed_opcodes();

    /// Test builds: faults applied to every SQE this ring submits from now
    /// on (nullptr: none). Not owned; must outlive the ring's operations.
    void set_fault_injector(FaultInjector* injector) noexcept;

    /// Counters (flow control is counted, not thrown).
    struct Stats {
        std::uint64_t cqes = 0;
        std::uint64_t sq_full = 0;  ///< times sqe() found the SQ full
        std::uint64_t submits = 0;
        std::uint64_t busy_polls = 0;  ///< non-blocking enters while busy-polling
    };
    const Stats& stats() const noexcept { return stats_; }

private:
    int reap();
    void clear_completion_fd() noexcept;
    int advance(bool clear_after);
    int busy_poll(unsigned min_complete, std::chrono::nanoseconds timeout);
    /// Something to submit, deferred task work (or a ring that cannot say),
    /// or a CQ overflow: only then does a look at the ring need a syscall.
    bool needs_enter() noexcept;
    int dispatch_posted();
    Poller::State run_pollers();
    int spin_pollers(std::chrono::nanoseconds timeout);
    void setup(const RingOptions& options);
    void restrict_to_engine_ops();
    void inject_faults();

    io_uring ring_{};
    RingFeatures features_;
    Stats stats_;
    std::size_t in_flight_ = 0;
    int event_fd_ = -1;
    FaultInjector* injector_ = nullptr;
    struct Posted {
        Completion* owner;
        std::int32_t res;
    };
    std::vector<Posted> posted_, dispatching_;
    std::vector<Poller*> pollers_;
    bool polling_ = false;  // run_pollers() is iterating pollers_
    bool dispatching_posted_ = false;
    std::chrono::microseconds busy_poll_{0};
};

}  // namespace ringxfer::engine
