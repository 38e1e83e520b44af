// engine::ShmRing: the descriptor channel of the shared-memory transport.
// In one process: batches, wrap-around, a full and an empty ring, and a peer
// that corrupts the header or the indices. Across two processes (fork, a
// memfd mapped by both): a million descriptors arrive in order with far
// fewer wake-ups than descriptors, and a ping-pong whose consumer sleeps on
// the futex every time never loses a wake-up (a lost one would hang: the
// child's alarm turns that into a failure).
#define BOOST_TEST_MODULE engine_shm_ring
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <vector>

#include "ringxfer/engine/compat.hpp"
#include "ringxfer/engine/shm_ring.hpp"

using ringxfer::engine::ShmDescriptor;
using ringxfer::engine::ShmRing;
using ringxfer::engine::ShmRingHeader;

namespace {

/// A shared anonymous mapping (fork keeps it shared), unmapped at the end.
struct Shared {
    explicit Shared(std::size_t n) : bytes(n) {
        mem = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        BOOST_REQUIRE(mem != MAP_FAILED);
    }
    ~Shared() { ::munmap(mem, bytes); }
    void* mem;
    std::size_t bytes;
};

/// A ring of `capacity` made by one handle and attached by another.
struct Attached {
    explicit Attached(std::uint32_t capacity) : m(ShmRing::bytes_for(capacity)) {
        BOOST_REQUIRE(ShmRing::create(m.mem, m.bytes, capacity, prod) == 0);
        BOOST_REQUIRE(ShmRing::attach(m.mem, m.bytes, cons) == 0);
        h = static_cast<ShmRingHeader*>(m.mem);
    }
    Shared m;
    ShmRing prod, cons;
    ShmRingHeader* h;
};

ShmDescriptor numbered(std::uint64_t i) {
    return ShmDescriptor{static_cast<std::uint32_t>(i % 7), 0, i * 64, i % 1000, i};
}

/// Runs `child` in a forked process with a deadline; true when it exited 0.
template <class F>
bool in_child(F child, unsigned deadline_s = 60) {
    pid_t pid = ::fork();
    if (pid == 0) {
        ::alarm(deadline_s);  // a lost wake-up hangs: SIGALRM ends it as a failure
        _exit(child() ? 0 : 1);
    }
    return pid > 0;
}

bool child_exited_ok() {
    int status = 0;
    if (::wait(&status) < 0) return false;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(batches_wrap_around_and_a_full_ring_takes_what_fits) {
    Shared m(ShmRing::bytes_for(8));
    ShmRing prod, cons;
    BOOST_REQUIRE(ShmRing::create(m.mem, m.bytes, 8, prod) == 0);
    BOOST_REQUIRE(ShmRing::attach(m.mem, m.bytes, cons) == 0);
    BOOST_TEST(cons.capacity() == 8u);

    std::uint64_t next_in = 0, next_out = 0;
    std::vector<ShmDescriptor> batch, out(5);
    for (int round = 0; round < 100; round++) {  // 100 rounds over 8 slots: many wraps
        batch.clear();
        for (int i = 0; i < 5; i++) batch.push_back(numbered(next_in + i));
        int pushed = prod.try_push(batch);
        BOOST_REQUIRE(pushed == 5);
        next_in += pushed;
        int got = cons.pop(out);
        BOOST_REQUIRE(got == 5);
        for (int i = 0; i < got; i++) {
            BOOST_REQUIRE(out[i].cookie == next_out);
            BOOST_REQUIRE(out[i].offset == next_out * 64);
            next_out++;
        }
    }
    // Full: 8 fit, then nothing; an empty ring pops nothing.
    batch.clear();
    for (int i = 0; i < 10; i++) batch.push_back(numbered(i));
    BOOST_TEST(prod.try_push(batch) == 8);
    BOOST_TEST(prod.try_push(batch) == 0);
    std::vector<ShmDescriptor> all(16);
    BOOST_TEST(cons.pop(all) == 8);
    BOOST_TEST(cons.pop(all) == 0);
    BOOST_TEST(cons.empty());
}

BOOST_AUTO_TEST_CASE(create_and_attach_refuse_what_is_not_a_ring) {
    Shared m(ShmRing::bytes_for(64));
    ShmRing r;
    BOOST_TEST(ShmRing::create(m.mem, m.bytes, 3, r) == -EINVAL);   // not a power of two
    BOOST_TEST(ShmRing::create(m.mem, m.bytes, 128, r) == -EINVAL); // does not fit
    BOOST_TEST(ShmRing::attach(m.mem, m.bytes, r) == -EPROTO);      // zeroes: no magic
    BOOST_REQUIRE(ShmRing::create(m.mem, m.bytes, 64, r) == 0);
    auto* h = static_cast<ShmRingHeader*>(m.mem);
    h->capacity = 1u << 20;  // the peer claims more slots than the mapping has
    BOOST_TEST(ShmRing::attach(m.mem, m.bytes, r) == -EINVAL);
    h->capacity = 64;
    h->version = ShmRing::kVersion + 1;
    BOOST_TEST(ShmRing::attach(m.mem, m.bytes, r) == -EPROTO);
}

BOOST_AUTO_TEST_CASE(impossible_indices_from_the_peer_are_errors_not_reads) {
    Attached r(16);
    auto& [m, prod, cons, h] = r;
    std::vector<ShmDescriptor> out(4);
    // A producer claiming a million descriptors in a ring of 16: the
    // consumer polls the slots' stamps, never follows the tail; the sleep
    // handshake, which reads it, finds it impossible and pop() says so.
    h->tail.store(1'000'000);
    BOOST_TEST(cons.pop(out) == 0);
    BOOST_TEST(!cons.prepare_sleep());
    BOOST_TEST(cons.pop(out) == -EPROTO);
    h->tail.store(0);
    // A consumer whose head runs ahead of anything produced.
    std::vector<ShmDescriptor> batch(16, numbered(1));
    BOOST_REQUIRE(prod.try_push(batch) == 16);
    h->head.store(~std::uint64_t{0} - 5);
    BOOST_TEST(prod.try_push(batch) == -EPROTO);
    // The capacity in the mapping changing later is ignored (kept at attach).
    h->capacity = 1u << 24;
    BOOST_TEST(cons.capacity() == 16u);
}

BOOST_AUTO_TEST_CASE(the_consumer_takes_what_the_stamps_show_and_nothing_stale) {
    Attached r(4);
    auto& [m, prod, cons, h] = r;
    auto* slots = reinterpret_cast<ShmDescriptor*>(h + 1);
    std::vector<ShmDescriptor> out(8);
    // Lap after lap: each slot's stamp of the lap before never reads as new.
    for (std::uint64_t lap = 0; lap < 600; ++lap) {
        std::vector<ShmDescriptor> batch = {numbered(lap * 4), numbered(lap * 4 + 1),
                                            numbered(lap * 4 + 2)};
        batch[1].flags = 0xabcdefu;  // the transport's 24 bits come through untouched
        BOOST_REQUIRE(prod.try_push(batch) == 3);
        BOOST_REQUIRE(cons.pop(out) == 3);
        BOOST_REQUIRE(out[0].cookie == lap * 4);
        BOOST_REQUIRE(out[1].flags == 0xabcdefu);
        BOOST_REQUIRE(out[2].cookie == lap * 4 + 2);
        BOOST_REQUIRE(cons.pop(out) == 0);
        BOOST_REQUIRE(cons.empty());
        BOOST_REQUIRE(prod.try_push(std::span(batch.data(), 1)) == 1);
        BOOST_REQUIRE(cons.pop(out) == 1);
    }
    // A hostile producer's slot with a garbage stamp is simply not there yet.
    slots[h->tail.load() % 4].flags = 0x7f000000u;
    BOOST_TEST(cons.pop(out) == 0);
}

BOOST_AUTO_TEST_CASE(prepare_sleep_refuses_when_descriptors_are_waiting) {
    Shared m(ShmRing::bytes_for(4));
    ShmRing prod, cons;
    BOOST_REQUIRE(ShmRing::create(m.mem, m.bytes, 4, cons) == 0);
    BOOST_REQUIRE(ShmRing::attach(m.mem, m.bytes, prod) == 0);
    auto seq = cons.prepare_sleep();
    BOOST_REQUIRE(seq.has_value());
    BOOST_TEST(prod.try_push(std::vector<ShmDescriptor>{numbered(1)}) == 1);
    BOOST_TEST(prod.consumer_sleeping());  // so it wakes
    prod.wake();
    BOOST_TEST(cons.wait(*seq, 1'000'000'000) == -EAGAIN);  // the wake came first
    cons.end_sleep();
    BOOST_TEST(!cons.prepare_sleep().has_value());  // one is waiting: do not sleep
    BOOST_TEST(!prod.consumer_sleeping());
    std::vector<ShmDescriptor> out(4);
    BOOST_TEST(cons.pop(out) == 1);
    auto again = cons.prepare_sleep();
    BOOST_REQUIRE(again.has_value());
    BOOST_TEST(cons.wait(*again, 10'000'000) == -ETIMEDOUT);  // nobody wakes it
    cons.end_sleep();
}

// A consumer that spins a little, then sleeps: every descriptor arrives, in
// order, and the producer entered the kernel far less often than it pushed.
BOOST_AUTO_TEST_CASE(a_million_descriptors_across_processes_in_order) {
    constexpr std::uint64_t kCount = 1'000'000;
    Shared m(ShmRing::bytes_for(1024) + 64);
    auto* wakes = reinterpret_cast<std::atomic<std::uint64_t>*>(
        static_cast<char*>(m.mem) + ShmRing::bytes_for(1024));
    ShmRing cons;
    BOOST_REQUIRE(ShmRing::create(m.mem, m.bytes, 1024, cons) == 0);
    BOOST_REQUIRE(in_child([&] {
        ShmRing prod;
        if (ShmRing::attach(m.mem, m.bytes, prod) != 0) return false;
        std::vector<ShmDescriptor> batch;
        std::uint64_t next = 0;
        while (next < kCount) {
            batch.clear();
            std::uint64_t n = 1 + next % 61;  // batches of 1..61
            for (std::uint64_t i = 0; i < n && next + i < kCount; i++)
                batch.push_back(numbered(next + i));
            std::size_t done = 0;
            while (done < batch.size()) {
                int r = prod.try_push(std::span(batch).subspan(done));
                if (r < 0) return false;
                done += static_cast<std::size_t>(r);
                if (r > 0 && prod.consumer_sleeping()) {
                    wakes->fetch_add(1);
                    prod.wake();
                }
            }
            next += batch.size();
        }
        return true;
    }));
    std::vector<ShmDescriptor> out(256);
    std::uint64_t expect = 0;
    bool in_order = true;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (expect < kCount && in_order) {
        BOOST_REQUIRE(std::chrono::steady_clock::now() < deadline);  // the producer died
        int got = cons.pop(out);
        BOOST_REQUIRE(got >= 0);
        if (got == 0) {
            bool arrived = false;
            for (int spin = 0; spin < 2000 && !arrived; spin++) arrived = !cons.empty();
            if (!arrived) {
                if (auto seq = cons.prepare_sleep()) cons.wait(*seq, 1'000'000'000);
                cons.end_sleep();
            }
            continue;
        }
        for (int i = 0; i < got; i++) in_order = in_order && out[i].cookie == expect++;
    }
    BOOST_TEST(in_order);
    BOOST_TEST(expect == kCount);
    BOOST_TEST(child_exited_ok());
    BOOST_TEST(wakes->load() < kCount / 10);
    BOOST_TEST_MESSAGE("futex wakes for " << kCount << " descriptors: " << wakes->load());
}

// Ping-pong, both sides sleeping at every step: the race between "I am going
// to sleep" and "I just pushed" happens 100,000 times each way.
BOOST_AUTO_TEST_CASE(ping_pong_with_sleeping_consumers_never_loses_a_wakeup) {
    constexpr std::uint64_t kRounds = 100'000;
    const std::size_t one = ShmRing::bytes_for(4);
    Shared m(2 * one);
    void* ping_mem = m.mem;
    void* pong_mem = static_cast<char*>(m.mem) + one;
    ShmRing ping_prod, pong_cons;
    BOOST_REQUIRE(ShmRing::create(ping_mem, one, 4, ping_prod) == 0);
    BOOST_REQUIRE(ShmRing::create(pong_mem, one, 4, pong_cons) == 0);

    // The peer answers within microseconds: a sleep that lasts its whole
    // second is a lost wake-up (or a dead peer), and fails the test.
    auto receive = [](ShmRing& r, std::uint64_t want) {
        ShmDescriptor d[1];
        for (;;) {
            int got = r.pop(d);
            if (got < 0) return false;
            if (got == 1) return d[0].cookie == want;
            int waited = 0;
            if (auto seq = r.prepare_sleep()) waited = r.wait(*seq, 1'000'000'000);
            r.end_sleep();
            if (waited == -ETIMEDOUT && r.empty()) return false;
        }
    };
    auto send = [](ShmRing& r, std::uint64_t i) {
        ShmDescriptor d[1] = {numbered(i)};
        if (r.try_push(d) != 1) return false;
        if (r.consumer_sleeping()) r.wake();
        return true;
    };
    BOOST_REQUIRE(in_child([&] {
        ShmRing ping_cons, pong_prod;
        if (ShmRing::attach(ping_mem, one, ping_cons) != 0) return false;
        if (ShmRing::attach(pong_mem, one, pong_prod) != 0) return false;
        for (std::uint64_t i = 0; i < kRounds; i++)
            if (!receive(ping_cons, i) || !send(pong_prod, i)) return false;
        return true;
    }));
    bool ok = true;
    for (std::uint64_t i = 0; i < kRounds && ok; i++)
        ok = send(ping_prod, i) && receive(pong_cons, i);
    BOOST_TEST(ok);
    BOOST_TEST(child_exited_ok());
}

// The consumer's wait can be an io_uring FUTEX_WAIT (kernel 6.7+, probed; a
// kernel without it skips): a producer in another process pushing and
// calling wake() (futex(2)) completes it, and an io_uring FUTEX_WAKE does too.
BOOST_AUTO_TEST_CASE(a_wake_completes_an_io_uring_futex_wait) {
    io_uring ring;
    BOOST_REQUIRE(io_uring_queue_init(8, &ring, 0) == 0);
    struct Exit {
        io_uring* r;
        ~Exit() { io_uring_queue_exit(r); }
    } exit_ring{&ring};
    io_uring_probe* probe = io_uring_get_probe_ring(&ring);
    bool supported = probe && io_uring_opcode_supported(probe, IORING_OP_FUTEX_WAIT) &&
                     io_uring_opcode_supported(probe, IORING_OP_FUTEX_WAKE);
    if (probe) io_uring_free_probe(probe);
    if (!supported) {
        BOOST_TEST_MESSAGE("skipped: this kernel has no IORING_OP_FUTEX_WAIT (6.7+)");
        return;
    }
    Shared m(ShmRing::bytes_for(16));
    ShmRing cons;
    BOOST_REQUIRE(ShmRing::create(m.mem, m.bytes, 16, cons) == 0);

    for (int round = 0; round < 2; round++) {
        auto seq = cons.prepare_sleep();
        BOOST_REQUIRE(seq.has_value());
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        ringxfer::engine::compat::prep_futex_wait(sqe, cons.wake_word(), *seq, FUTEX2_SIZE_U32);
        sqe->user_data = 7;
        BOOST_REQUIRE(io_uring_submit(&ring) == 1);
        io_uring_cqe* cqe = nullptr;
        BOOST_TEST(io_uring_peek_cqe(&ring, &cqe) == -EAGAIN);  // it waits
        BOOST_REQUIRE(in_child([&] {
            ShmRing prod;
            if (ShmRing::attach(m.mem, m.bytes, prod) != 0) return false;
            ShmDescriptor d[1] = {numbered(41 + round)};
            if (prod.try_push(d) != 1 || !prod.consumer_sleeping()) return false;
            if (round == 0) {
                prod.wake();  // futex(2)
                return true;
            }
            io_uring r2;  // the producer's own ring
            if (io_uring_queue_init(4, &r2, 0) != 0) return false;
            prod.bump_wake_seq();
            io_uring_sqe* w = io_uring_get_sqe(&r2);
            ringxfer::engine::compat::prep_futex_wake(w, prod.wake_word(), 1, FUTEX2_SIZE_U32);
            io_uring_cqe* c = nullptr;
            bool ok = io_uring_submit_and_wait(&r2, 1) == 1 && io_uring_peek_cqe(&r2, &c) == 0 &&
                      c->res >= 0;
            io_uring_queue_exit(&r2);
            return ok;
        }));
        __kernel_timespec ts{10, 0};
        BOOST_REQUIRE(io_uring_wait_cqe_timeout(&ring, &cqe, &ts) == 0);
        BOOST_TEST(cqe->user_data == 7u);
        BOOST_TEST(cqe->res == 0);  // woken (-EAGAIN if the word had moved first is also a wake)
        io_uring_cqe_seen(&ring, cqe);
        cons.end_sleep();
        BOOST_TEST(child_exited_ok());
        ShmDescriptor out[2];
        BOOST_TEST(cons.pop(out) == 1);
        BOOST_TEST(out[0].cookie == 41u + round);
    }
}
