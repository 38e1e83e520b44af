#define BOOST_TEST_MODULE engine_fault_injection
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/fault_injection.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/stream.hpp"
#include "rx_test.hpp"

// Drives every operation type the engine submits (RECV, READ_FIXED, SENDMSG,
// SEND, SEND_ZC, ACCEPT, CONNECT) through FaultInjector: injected errors
// must reach the owner with every buffer returned, retryable errors and
// short counts must be invisible above the stream. Also: CQ overflow and
// the ring's opcode restrictions.

using namespace ringxfer::engine;
using rxtest::PeerThread;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace {

struct Counter final : Completion {
    int calls = 0;
    void complete(int32_t, uint32_t) override { ++calls; }
};

using rxtest::lease_or_fail;

/// Submits OPENAT of /dev/null (not an engine opcode); returns its result.
int32_t open_dev_null(Ring& ring) {
    struct Result final : Completion {
        int32_t res = 1;
        void complete(int32_t r, uint32_t) override { res = r; }
    } open_res;
    io_uring_prep_openat(ring.sqe(&open_res), AT_FDCWD, "/dev/null", O_RDONLY, 0);
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return open_res.res != 1; }));
    if (open_res.res >= 0) ::close(open_res.res);
    return open_res.res;
}

using rxtest::RecvResult;
using rxtest::SendResult;

/// Receives `n` pattern bytes on a stream fed by a peer thread, with `rules`.
void recv_through(std::vector<FaultRule> rules, bool read_fixed, std::size_t n,
                  std::uint64_t expect_shortened_at_least) {
    Ring ring;
    BufferPool pool(&ring);
    FaultInjector inj(std::move(rules));
    ring.set_fault_injector(&inj);
    auto [local, peer] = rxtest::socket_pair();
    SocketStreamOptions so;
    so.read_fixed = read_fixed;
    SocketStream s(ring, std::move(local), so);
    auto data = rxtest::pattern_vector(n, 9);
    int pfd = peer.get();
    PeerThread writer(pfd, s.fd(), [&] { rxtest::write_all(pfd, data); });
    RecvResult got;
    s.recv(lease_or_fail(pool, n), 0, n, n, got.handler());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return got.done; }));
    BOOST_TEST(writer.join());
    BOOST_TEST(got.r.ok());
    BOOST_TEST(got.r.bytes == n);
    BOOST_TEST(rxtest::matches_pattern({got.lease.data(), n}, 9));
    BOOST_TEST(inj.stats().shortened >= expect_shortened_at_least);
    BOOST_TEST_MESSAGE("recv ops " << s.counters().recv_ops << ", retries "
                                   << s.counters().retries << ", shortened "
                                   << inj.stats().shortened);
    got.lease.reset();
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

/// Sends a 16-byte prefix + `n` body bytes with `rules`; the peer checks them.
/// inline_send_max 0 (the default here) keeps small sends on SENDMSG.
void send_through(std::vector<FaultRule> rules, std::size_t zerocopy_threshold, std::size_t n,
                  bool tcp, std::size_t inline_send_max = 0) {
    Ring ring;
    BufferPool pool(&ring);
    FaultInjector inj(std::move(rules));
    auto [local, peer] = tcp ? rxtest::tcp_pair(ring) : rxtest::socket_pair();
    ring.set_fault_injector(&inj);
    SocketStreamOptions so;
    so.zerocopy_threshold = zerocopy_threshold;
    so.inline_send_max = inline_send_max;
    SocketStream s(ring, std::move(local), so);
    SendBuffers b;
    std::memcpy(b.prefix.data(), "0123456789abcdef", 16);
    b.prefix_len = 16;
    b.body = lease_or_fail(pool, n);
    rxtest::fill_pattern(b.body.span(), 4);
    b.body_len = n;
    std::vector<std::byte> seen;
    int pfd = peer.get();
    PeerThread reader(pfd, s.fd(), [&] { seen = rxtest::read_exact(pfd, 16 + n); });
    SendResult sent;
    s.send(std::move(b), sent.handler());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return sent.done; }));
    BOOST_TEST(reader.join());
    BOOST_TEST(sent.r.ok());
    BOOST_TEST(sent.r.bytes == 16 + n);
    BOOST_REQUIRE(seen.size() == 16 + n);
    BOOST_TEST(std::memcmp(seen.data(), "0123456789abcdef", 16) == 0);
    BOOST_TEST(rxtest::matches_pattern({seen.data() + 16, n}, 4));
    BOOST_TEST(inj.stats().shortened + inj.stats().errors > 0u);
    const bool inlined = 16 + n <= inline_send_max && zerocopy_threshold == 0;
    BOOST_TEST(s.counters().inline_sends == (inlined ? 1u : 0u));
    BOOST_TEST(s.counters().send_copied_bytes == (inlined ? n : 0u));
    sent.back = SendBuffers{};
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

}  // namespace

BOOST_AUTO_TEST_CASE(fault_injection_is_compiled_into_test_builds) {
    BOOST_REQUIRE_MESSAGE(fault_injection_compiled,
                          "configure with -Dfault_injection=true to run these tests");
}

BOOST_AUTO_TEST_SUITE(receiving)

BOOST_AUTO_TEST_CASE(short_counts_are_resumed) {
    recv_through({FaultRule::shorten(IORING_OP_RECV, 7)}, false, 100000, 100);
}

BOOST_AUTO_TEST_CASE(short_counts_on_read_fixed_are_resumed) {
    recv_through({FaultRule::shorten(IORING_OP_READ_FIXED, 4096), FaultRule::shorten(IORING_OP_RECV, 4096)}, true,
                 300000, 10);
}

BOOST_AUTO_TEST_CASE(retryable_errors_are_retried_transparently) {
    for (int err : {-EAGAIN, -EINTR, -ENOBUFS}) {
        BOOST_TEST_CONTEXT("error " << err) {
            FaultRule r = FaultRule::fail(IORING_OP_RECV, err, 5);
            r.every = 2;
            recv_through({r, FaultRule::shorten(IORING_OP_RECV, 1000)}, false, 20000, 1);
        }
    }
}

BOOST_AUTO_TEST_CASE(hard_errors_reach_the_handler_with_the_buffer) {
    for (int err : {-ECONNRESET, -ECANCELED, -EIO}) {
        BOOST_TEST_CONTEXT("error " << err) {
            Ring ring;
            BufferPool pool(&ring);
            FaultInjector inj({FaultRule::fail(IORING_OP_RECV, err, 1, 2)});
            ring.set_fault_injector(&inj);
            auto [local, peer] = rxtest::socket_pair();
            SocketStream s(ring, std::move(local));
            auto data = rxtest::pattern_vector(3000, 2);
            BOOST_REQUIRE(rxtest::write_all(peer.get(), data, 1000));
            // Two recvs succeed (1000 bytes each), the third fails.
            std::size_t total = 0;
            RecvResult got;
            std::function<void()> next = [&] {
                s.recv(lease_or_fail(pool, 1000), 0, 1, 1000, [&](Lease l, IoResult r) {
                    if (r.ok()) {
                        total += r.bytes;
                        l.reset();
                        return next();
                    }
                    got.lease = std::move(l);
                    got.r = r;
                    got.done = true;
                });
            };
            next();
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return got.done; }));
            BOOST_TEST(got.r.err == err);
            BOOST_TEST(bool(got.lease));
            BOOST_TEST(total == 2000u);
            BOOST_TEST(inj.stats().errors == 1u);
            got.lease.reset();
            BOOST_TEST(pool.stats().leased_buffers == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(a_fault_that_never_clears_is_reported_not_spun_on) {
    Ring ring;
    BufferPool pool(&ring);
    FaultInjector inj({FaultRule::fail(IORING_OP_RECV, -EAGAIN, FaultRule::kForever)});
    ring.set_fault_injector(&inj);
    auto [local, peer] = rxtest::socket_pair();
    SocketStream s(ring, std::move(local));
    RecvResult got;
    s.recv(lease_or_fail(pool, 100), 0, 1, 100, got.handler());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return got.done; }));
    BOOST_TEST(got.r.err == -EAGAIN);
    BOOST_TEST(s.counters().retries >= 1000u);
    got.lease.reset();
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(sending)

BOOST_AUTO_TEST_CASE(short_sendmsg_counts_are_resumed) {
    send_through({FaultRule::shorten(IORING_OP_SENDMSG, 5)}, 0, 50000, false);
}

BOOST_AUTO_TEST_CASE(short_counts_cutting_the_prefix_are_resumed) {
    // 3-byte pieces: the 16-byte prefix itself takes several sends.
    send_through({FaultRule::shorten(IORING_OP_SENDMSG, 3)}, 0, 100, false);
}

BOOST_AUTO_TEST_CASE(short_counts_on_an_inline_send_are_resumed) {
    // 16 + 100 bytes fit the inline buffer: one SEND from the copy, resumed
    // in 3-byte pieces through the copy (the body lease is not read again).
    send_through({FaultRule::shorten(IORING_OP_SEND, 3)}, 0, 100, false, 256);
}

BOOST_AUTO_TEST_CASE(retryable_errors_on_an_inline_send_are_retried) {
    FaultRule r = FaultRule::fail(IORING_OP_SEND, -EAGAIN, 3);
    send_through({r}, 0, 200, true, 256);
}

BOOST_AUTO_TEST_CASE(retryable_send_errors_are_retried) {
    FaultRule r = FaultRule::fail(IORING_OP_SENDMSG, -EAGAIN, 3);
    send_through({r, FaultRule::shorten(IORING_OP_SENDMSG, 1000)}, 0, 10000, false);
}

BOOST_AUTO_TEST_CASE(gathered_sends_survive_short_counts_and_errors) {
    // 200 queued sends gathered into SENDMSGs that move 7 bytes at a time,
    // with an EAGAIN and an EPIPE on the way: every send before the EPIPE
    // and after it arrives whole and in order; the failed one is reported
    // with the bytes that had left before the fault (a stream error does not
    // take back what the kernel already took).
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();
    FaultRule fail = FaultRule::fail(IORING_OP_SENDMSG, -EPIPE, 1, 40);
    FaultInjector inj({FaultRule::fail(IORING_OP_SENDMSG, -EAGAIN, 1, 10), fail,
                       FaultRule::shorten(IORING_OP_SENDMSG, 7)});
    ring.set_fault_injector(&inj);
    auto s = std::make_unique<SocketStream>(ring, std::move(local));
    std::vector<std::byte> got;
    int pfd = peer.get();
    PeerThread reader(pfd, s->fd(), [&] { got = rxtest::read_to_eof(pfd); });
    constexpr int kSends = 200;
    std::vector<IoResult> results;
    std::vector<std::byte> expected_ok;
    std::vector<std::vector<std::byte>> bodies;
    for (int i = 0; i < kSends; ++i) {
        SendBuffers b;
        b.prefix[0] = std::byte(i);
        b.prefix_len = 1;
        b.body = lease_or_fail(pool, 5 + i % 11);
        rxtest::fill_pattern(b.body.span(), i);
        b.body_len = b.body.size();
        std::vector<std::byte> all{std::byte(i)};
        all.insert(all.end(), b.body.span().begin(), b.body.span().end());
        bodies.push_back(std::move(all));
        s->send(std::move(b), [&](SendBuffers, IoResult r) { results.push_back(r); });
    }
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return results.size() == kSends; }));
    std::vector<std::byte> expected;
    int failed = -1;
    for (int i = 0; i < kSends; ++i) {
        if (!results[i].ok()) {
            BOOST_TEST(failed == -1);
            BOOST_TEST(results[i].err == -EPIPE);
            BOOST_TEST(results[i].bytes < bodies[i].size());
            failed = i;
        } else {
            BOOST_TEST(results[i].bytes == bodies[i].size());
        }
        expected.insert(expected.end(), bodies[i].begin(), bodies[i].begin() + results[i].bytes);
    }
    BOOST_TEST(failed >= 0);
    BOOST_TEST(s->counters().gathered_sends > 0u);
    s.reset();  // EOF for the reader
    BOOST_TEST(reader.join());
    BOOST_TEST((got == expected));
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_CASE(short_and_failed_zero_copy_sends_are_resumed) {
    Ring probe;
    if (!probe.features().op_send_zc) {
        BOOST_TEST_MESSAGE("kernel without IORING_OP_SEND_ZC: skipped");
        return;
    }
    // SEND carries the prefix (MSG_MORE), SEND_ZC the body.
    send_through({FaultRule::shorten(IORING_OP_SEND, 5), FaultRule::shorten(IORING_OP_SEND_ZC, 65536),
                  FaultRule::fail(IORING_OP_SEND_ZC, -EAGAIN, 2, 1)},
                 1, 1 << 20, true);
}

BOOST_AUTO_TEST_CASE(hard_send_errors_reach_the_handler_with_the_buffers) {
    for (int opcode : {IORING_OP_SENDMSG, IORING_OP_SEND_ZC}) {
        BOOST_TEST_CONTEXT("opcode " << opcode) {
            Ring ring;
            if (opcode == IORING_OP_SEND_ZC && !ring.features().op_send_zc) continue;
            BufferPool pool(&ring);
            auto [local, peer] = rxtest::tcp_pair(ring);
            FaultInjector inj({FaultRule::fail(opcode, -EPIPE)});
            ring.set_fault_injector(&inj);
            SocketStreamOptions so;
            so.zerocopy_threshold = opcode == IORING_OP_SEND_ZC ? 1 : 0;
            SocketStream s(ring, std::move(local), so);
            SendBuffers b;
            b.body = lease_or_fail(pool, 4096);
            b.body_len = 4096;
            SendResult first, second;
            s.send(std::move(b), first.handler());
            SendBuffers b2;
            b2.body = lease_or_fail(pool, 100);
            b2.body_len = 100;
            s.send(std::move(b2), second.handler());
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return first.done && second.done; }));
            BOOST_TEST(first.r.err == -EPIPE);
            BOOST_TEST(bool(first.back.body));
            // The fault was one-shot: the next queued send still goes out.
            BOOST_TEST(second.r.ok());
            auto rest = rxtest::read_exact(peer.get(), 100);
            BOOST_TEST(rest.size() == 100u);
            first.back = SendBuffers{};
            second.back = SendBuffers{};
            BOOST_REQUIRE(rxtest::drain(ring));
            BOOST_TEST(pool.stats().leased_buffers == 0u);
        }
    }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(connections)

BOOST_AUTO_TEST_CASE(accept_and_connect_errors_reach_their_handlers) {
    Ring ring;
    FaultInjector inj({FaultRule::fail(IORING_OP_ACCEPT, -EMFILE), FaultRule::fail(IORING_OP_CONNECT,
                                                                          -ECONNREFUSED)});
    ring.set_fault_injector(&inj);
    Fd listener = listen_on(Endpoint::parse("127.0.0.1:0"), 4);
    Endpoint ep = local_endpoint(listener.get(), Endpoint::Kind::tcp);
    int aerr = 1, cerr = 1;
    async_accept(ring, listener.get(), [&](Fd, int e) { aerr = e; });
    async_connect(ring, ep, [&](Fd, int e) { cerr = e; });
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return aerr != 1 && cerr != 1; }));
    BOOST_TEST(aerr == -EMFILE);
    BOOST_TEST(cerr == -ECONNREFUSED);
    // One-shot faults: the next pair connects.
    auto [a, b] = rxtest::tcp_pair(ring);
    BOOST_TEST(a.get() >= 0);
    BOOST_TEST(b.get() >= 0);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(ring_level)

BOOST_AUTO_TEST_CASE(cq_overflow_backlog_is_flushed_without_loss) {
    RingOptions o;
    o.entries = 4;  // CQ of 8: 200 NOPs overflow it many times over
    Ring ring(o);
    BOOST_REQUIRE(ring.features().nodrop);
    std::vector<Counter> c(200);
    for (auto& x : c) {
        io_uring_prep_nop(ring.sqe(&x));
        ring.submit();
    }
    // The kernel holds what did not fit (IORING_FEAT_NODROP) and says so.
    BOOST_TEST(io_uring_cq_has_overflow(ring.raw()));
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return ring.in_flight() == 0; }));
    for (auto& x : c) BOOST_TEST(x.calls == 1);
    BOOST_TEST(!io_uring_cq_has_overflow(ring.raw()));
}

BOOST_AUTO_TEST_CASE(ring_is_restricted_to_the_engines_opcodes) {
    Ring ring;
    BOOST_REQUIRE_MESSAGE(ring.features().restricted,
                          "IORING_REGISTER_RESTRICTIONS refused on this kernel");
    BOOST_TEST(open_dev_null(ring) == -EACCES);
    // Register calls outside the list are refused too.
    int fds[1] = {0};
    BOOST_TEST(io_uring_register_files(ring.raw(), fds, 1) == -EACCES);
    // And what the engine needs still works.
    BufferPool pool(&ring);
    Lease l = lease_or_fail(pool, 4096);
    BOOST_TEST(!pool.stats().registration_failed);
    BOOST_TEST(ring.completion_fd() >= 0);
}

BOOST_AUTO_TEST_CASE(restrictions_can_be_turned_off) {
    RingOptions o;
    o.restrict_ops = false;
    Ring ring(o);
    BOOST_TEST(!ring.features().restricted);
    BOOST_TEST(open_dev_null(ring) >= 0);
}

BOOST_AUTO_TEST_SUITE_END()
