#define BOOST_TEST_MODULE engine_ring
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <thread>
#include <vector>

#include "ringxfer/engine/ring.hpp"
#include "rx_test.hpp"

using namespace ringxfer::engine;

namespace {

struct Counter final : Completion {
    int calls = 0;
    int32_t res = 12345;
    uint32_t flags = 0;
    std::vector<uint32_t> all_flags;
    void complete(int32_t r, uint32_t f) override {
        ++calls;
        res = r;
        flags = f;
        all_flags.push_back(f);
    }
};

/// poll() for readability; the timeout only bounds a failure.
bool readable(int fd, int timeout_ms) {
    pollfd p{fd, POLLIN, 0};
    return ::poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN);
}

}  // namespace

BOOST_AUTO_TEST_CASE(sets_up_and_probes_features) {
    Ring ring;
    const RingFeatures& f = ring.features();
    BOOST_TEST(f.op_recv);
    BOOST_TEST(f.op_sendmsg);
    BOOST_TEST(f.op_accept);
    BOOST_TEST(f.op_connect);
    BOOST_TEST(f.op_async_cancel);
    BOOST_TEST(f.nodrop);
    std::string flags = f.setup_flags_string();
    BOOST_TEST(!flags.empty());
    BOOST_TEST_MESSAGE("setup flags: " << flags << ", send_zc " << f.op_send_zc);
    BOOST_TEST(ring.in_flight() == 0u);
}

BOOST_AUTO_TEST_CASE(setup_flags_string_names_exactly_the_flags_set) {
    RingFeatures none;
    BOOST_TEST(none.setup_flags_string() == "none");
    RingFeatures two;
    two.setup_flags = IORING_SETUP_SQPOLL | IORING_SETUP_SINGLE_ISSUER;
    BOOST_TEST(two.setup_flags_string() == "SQPOLL|SINGLE_ISSUER");

    Ring ring;
    std::string s = ring.features().setup_flags_string();
    unsigned got = ring.features().setup_flags;
    BOOST_TEST(((got & IORING_SETUP_DEFER_TASKRUN) != 0) ==
               (s.find("DEFER_TASKRUN") != std::string::npos));
    BOOST_TEST(((got & IORING_SETUP_SINGLE_ISSUER) != 0) ==
               (s.find("SINGLE_ISSUER") != std::string::npos));
    BOOST_TEST(s.find("||") == std::string::npos);
}

BOOST_AUTO_TEST_CASE(defer_taskrun_can_be_turned_off) {
    RingOptions o;
    o.defer_taskrun = false;
    Ring ring(o);
    BOOST_TEST((ring.features().setup_flags & IORING_SETUP_DEFER_TASKRUN) == 0u);
    Counter c;
    io_uring_prep_nop(ring.sqe(&c));
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return c.calls == 1; }));
    BOOST_TEST(c.res == 0);
}

BOOST_AUTO_TEST_CASE(nop_round_trip_dispatches_to_its_completion) {
    Ring ring;
    Counter c;
    io_uring_sqe* sqe = ring.sqe(&c);
    BOOST_REQUIRE(sqe != nullptr);
    BOOST_TEST(sqe->user_data == reinterpret_cast<std::uintptr_t>(static_cast<Completion*>(&c)));
    io_uring_prep_nop(sqe);  // prep helpers keep the user_data sqe() set
    BOOST_TEST(ring.in_flight() == 1u);
    BOOST_TEST(c.calls == 0);  // nothing before run_once

    int n = ring.run_once();
    BOOST_TEST(n == 1);
    BOOST_TEST(c.calls == 1);
    BOOST_TEST(c.res == 0);
    BOOST_TEST((c.flags & IORING_CQE_F_MORE) == 0u);
    BOOST_TEST(ring.in_flight() == 0u);
    BOOST_TEST(ring.stats().cqes >= 1u);
}

BOOST_AUTO_TEST_CASE(run_once_with_nothing_to_do_returns_zero) {
    Ring ring;
    BOOST_TEST(ring.run_once(0, std::chrono::nanoseconds(0)) == 0);
    // -ETIME is not an error.
    BOOST_TEST(ring.run_once(1, std::chrono::milliseconds(1)) == 0);
}

// busy_poll: a waiting run_once polls (and, under DEFER_TASKRUN, runs the
// task work that posts the CQE) before it sleeps; a completion that arrives
// while it polls is dispatched by that same run_once. Without it the ring
// never polls. A timeout still ends a wait that nothing completes.
BOOST_AUTO_TEST_CASE(busy_poll_picks_up_completions_before_sleeping) {
    for (auto poll : {std::chrono::microseconds(0), std::chrono::microseconds(5'000'000)}) {
        BOOST_TEST_CONTEXT("busy_poll " << poll.count() << " us") {
            RingOptions o;
            o.busy_poll = poll;
            Ring ring(o);
            auto [a, b] = rxtest::socket_pair();
            char buf[8];
            Counter r;
            io_uring_prep_recv(ring.sqe(&r), a.get(), buf, sizeof buf, 0);
            std::thread writer([fd = b.get()] {
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
                [[maybe_unused]] auto n = ::write(fd, "hi", 2);
            });
            int n = ring.run_once(1, std::chrono::seconds(20));
            writer.join();
            BOOST_TEST(n == 1);
            BOOST_TEST(r.calls == 1);
            BOOST_TEST(r.res == 2);
            if (poll.count() == 0)
                BOOST_TEST(ring.stats().busy_polls == 0u);
            else
                BOOST_TEST(ring.stats().busy_polls > 1u);  // it polled while the writer slept
        }
    }
    RingOptions o;
    o.busy_poll = std::chrono::microseconds(1000);
    Ring ring(o);
    auto [a, b] = rxtest::socket_pair();
    char buf[8];
    Counter r;
    io_uring_prep_recv(ring.sqe(&r), a.get(), buf, sizeof buf, 0);
    BOOST_TEST(ring.run_once(1, std::chrono::milliseconds(5)) == 0);  // timed out
    BOOST_TEST(r.calls == 0);
    ring.cancel(&r);
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return r.calls == 1; }));
}

BOOST_AUTO_TEST_CASE(more_sqes_than_entries_use_the_full_sq_policy) {
    for (bool defer : {true, false}) {
        BOOST_TEST_CONTEXT("defer_taskrun " << defer) {
            RingOptions o;
            o.entries = 8;
            o.defer_taskrun = defer;
            Ring ring(o);
            std::vector<Counter> cs(100);
            for (auto& c : cs) {
                io_uring_prep_nop(ring.sqe(&c));
            }
            BOOST_TEST(ring.stats().sq_full > 0u);
            BOOST_REQUIRE(rxtest::drain(ring));
            int total = 0;
            for (auto& c : cs) {
                BOOST_TEST_REQUIRE(c.calls == 1);  // each exactly once, none lost
                BOOST_TEST(c.res == 0);
                total += c.calls;
            }
            BOOST_TEST(total == 100);
            BOOST_TEST(ring.in_flight() == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(completion_fd_becomes_readable_after_a_completion) {
    Ring ring;
    int fd = ring.completion_fd();
    BOOST_REQUIRE(fd >= 0);
    BOOST_TEST(ring.completion_fd() == fd);  // created once
    BOOST_TEST(!readable(fd, 0));

    Counter c;
    io_uring_prep_nop(ring.sqe(&c));
    BOOST_TEST(ring.submit() == 1);
    BOOST_REQUIRE(readable(fd, 10'000));
    BOOST_TEST(c.calls == 0);  // not dispatched until run_once
    BOOST_TEST(ring.run_once(0, std::chrono::nanoseconds(0)) == 1);
    BOOST_TEST(c.calls == 1);
    BOOST_TEST(!readable(fd, 0));  // run_once consumed the signal

    // A completion arriving later (a recv woken by the peer) signals too: the
    // foreign-event-loop use.
    auto [a, b] = rxtest::socket_pair();
    char buf[8];
    Counter r;
    io_uring_prep_recv(ring.sqe(&r), a.get(), buf, sizeof buf, 0);
    BOOST_TEST(ring.submit() == 1);
    ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(r.calls == 0);
    BOOST_REQUIRE(::write(b.get(), "hi", 2) == 2);
    BOOST_REQUIRE(readable(fd, 10'000));
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return r.calls == 1; }));
    BOOST_TEST(r.res == 2);
}

// advance(): the call a foreign loop's own callbacks make between wake-ups.
// It must not enter the kernel for nothing, must submit what is queued, and
// must leave the descriptor quiet for completions it dispatched itself, or
// the loop wakes for work already done.
BOOST_AUTO_TEST_CASE(advance_enters_only_for_work_and_clears_what_it_dispatched) {
    RingOptions o;
    o.defer_taskrun = false;  // COOP_TASKRUN|TASKRUN_FLAG, as the Python engine's
    Ring ring(o);
    BOOST_REQUIRE(ring.features().setup_flags & IORING_SETUP_TASKRUN_FLAG);
    int fd = ring.completion_fd();
    BOOST_REQUIRE(fd >= 0);

    auto before = ring.stats().submits;
    for (int i = 0; i < 10; ++i) BOOST_TEST(ring.advance() == 0);
    BOOST_TEST(ring.stats().submits == before);  // nothing queued: no io_uring_enter

    // A NOP completes inside the submission: dispatched by the same call,
    // and its eventfd signal is consumed, not left for the loop.
    Counter c;
    io_uring_prep_nop(ring.sqe(&c));
    BOOST_TEST(ring.advance() == 1);
    BOOST_TEST(c.calls == 1);
    BOOST_TEST(ring.stats().submits == before + 1);
    BOOST_TEST(!readable(fd, 0));

    // A completion that comes later still signals, and advance() finds it:
    // no wake-up is lost by clearing.
    auto [a, b] = rxtest::socket_pair();
    char buf[8];
    Counter r;
    io_uring_prep_recv(ring.sqe(&r), a.get(), buf, sizeof buf, 0);
    BOOST_TEST(ring.advance() == 0);
    BOOST_TEST(r.calls == 0);
    BOOST_REQUIRE(::write(b.get(), "hi", 2) == 2);
    BOOST_REQUIRE(readable(fd, 10'000));
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return r.calls == 1; }));
    BOOST_TEST(r.res == 2);
    BOOST_TEST(ring.in_flight() == 0u);
}

BOOST_AUTO_TEST_CASE(cancel_delivers_the_final_completion) {
    Ring ring;
    auto [a, b] = rxtest::socket_pair();
    char buf[8];
    Counter r;
    io_uring_prep_recv(ring.sqe(&r), a.get(), buf, sizeof buf, 0);
    ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(r.calls == 0);
    BOOST_TEST(ring.in_flight() == 1u);
    ring.cancel(&r);
    BOOST_TEST(ring.in_flight() == 1u);  // the cancel request itself is not counted
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(r.calls == 1);
    BOOST_TEST(r.res == -ECANCELED);
}

BOOST_AUTO_TEST_CASE(multishot_stays_in_flight_until_its_final_cqe) {
    RingOptions o;
    o.restrict_ops = false;  // POLL_ADD is not one of the engine's opcodes
    Ring ring(o);
    int p[2];
    BOOST_REQUIRE(::pipe(p) == 0);
    Fd rd(p[0]), wr(p[1]);
    Counter c;
    io_uring_prep_poll_multishot(ring.sqe(&c), rd.get(), POLLIN);
    ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_REQUIRE(::write(wr.get(), "x", 1) == 1);
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return c.calls >= 1; }));
    BOOST_TEST((c.flags & IORING_CQE_F_MORE) != 0u);
    BOOST_TEST(ring.in_flight() == 1u);  // not final yet

    ring.cancel(&c);
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST((c.flags & IORING_CQE_F_MORE) == 0u);
    BOOST_TEST(ring.in_flight() == 0u);
}

// Ring::post(): a completion destroyed from inside its own handler withdraws
// itself (as a stream being destroyed does); that must not count it twice,
// or in_flight() wraps around and a drain loop waits forever (it hung
// `ringxfer serve` at SIGTERM with an shm connection open).
BOOST_AUTO_TEST_CASE(a_post_withdrawn_from_inside_its_own_handler_is_counted_once) {
    Ring ring;
    struct SelfWithdrawing final : Completion {
        Ring* ring = nullptr;
        int calls = 0;
        void complete(int32_t, uint32_t) override {
            ++calls;
            ring->unpost(this);
        }
    };
    SelfWithdrawing a, b;
    a.ring = b.ring = &ring;
    ring.post(&a, 0);
    ring.post(&b, 0);
    BOOST_TEST(ring.in_flight() == 2u);
    ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(a.calls == 1);
    BOOST_TEST(b.calls == 1);
    BOOST_TEST(ring.in_flight() == 0u);
    // Withdrawn before dispatch: never runs, counted out once.
    ring.post(&a, 0);
    ring.unpost(&a);
    BOOST_TEST(ring.in_flight() == 0u);
    ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(a.calls == 1);
}
