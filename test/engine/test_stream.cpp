#define BOOST_TEST_MODULE engine_stream
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "rx_test.hpp"

using namespace ringxfer::engine;
using rxtest::PeerThread;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace {

enum class Transport { unix_pair, tcp };

std::ostream& operator<<(std::ostream& os, Transport t) {
    return os << (t == Transport::tcp ? "tcp loopback" : "unix socketpair");
}

/// {stream side, peer side}
std::pair<Fd, Fd> connect(Ring& ring, Transport t) {
    if (t == Transport::unix_pair) return rxtest::socket_pair();
    auto p = rxtest::tcp_pair(ring);
    tune_socket(p.first.get(), SocketTuning{});
    tune_socket(p.second.get(), SocketTuning{});
    return p;
}

constexpr Transport kTransports[] = {Transport::unix_pair, Transport::tcp};

using rxtest::RecvResult;

using rxtest::lease_or_fail;

SendBuffers make_send(BufferPool& pool, std::string_view prefix, std::size_t body_len,
                      std::uint64_t seed, std::size_t body_offset = 0) {
    SendBuffers b;
    BOOST_REQUIRE(prefix.size() <= SendBuffers::kMaxPrefix);
    std::memcpy(b.prefix.data(), prefix.data(), prefix.size());
    b.prefix_len = prefix.size();
    if (body_len > 0) {
        b.body = lease_or_fail(pool, body_offset + body_len);
        rxtest::fill_pattern({b.body.data() + body_offset, body_len}, seed);
        b.body_offset = body_offset;
        b.body_len = body_len;
    }
    return b;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(receiving)

BOOST_AUTO_TEST_CASE(min_equals_max_waits_for_every_piece) {
    for (Transport t : kTransports) {
        BOOST_TEST_CONTEXT(t) {
            Ring ring;
            BufferPool pool(&ring);
            auto [local, peer] = connect(ring, t);
            SocketStream s(ring, std::move(local));

            RecvResult res;
            Lease l = lease_or_fail(pool, 1000);
            std::byte* base = l.data();
            s.recv(std::move(l), 10, 100, 100, res.handler());
            auto data = rxtest::pattern_vector(100, 1);
            for (std::size_t i = 0; i < 10; ++i) {
                ring.run_once(0, std::chrono::nanoseconds(0));
                // Fewer than `min` bytes have been written: never done early.
                BOOST_TEST_REQUIRE(!res.done);
                BOOST_REQUIRE(rxtest::write_all(peer.get(), {data.data() + 10 * i, 10}));
            }
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return res.done; }));
            BOOST_TEST(res.r.ok());
            BOOST_TEST(res.r.bytes == 100u);
            BOOST_TEST(res.lease.data() == base);  // the same buffer comes back
            BOOST_TEST(rxtest::matches_pattern({res.lease.data() + 10, 100}, 1));
            BOOST_TEST(s.counters().bytes_received == 100u);
            BOOST_TEST(ring.in_flight() == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(min_below_max_returns_what_arrived) {
    for (Transport t : kTransports) {
        BOOST_TEST_CONTEXT(t) {
            Ring ring;
            BufferPool pool(&ring);
            auto [local, peer] = connect(ring, t);
            SocketStream s(ring, std::move(local));
            BOOST_REQUIRE(::write(peer.get(), "hello", 5) == 5);
            RecvResult res;
            s.recv(lease_or_fail(pool, 4096), 0, 1, 4096, res.handler());
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return res.done; }));
            BOOST_TEST(res.r.ok());
            BOOST_TEST(res.r.bytes == 5u);
            BOOST_TEST(std::memcmp(res.lease.data(), "hello", 5) == 0);
        }
    }
}

int rcvlowat(int fd) {
    int v = -1;
    socklen_t len = sizeof v;
    BOOST_REQUIRE(::getsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &v, &len) == 0);
    return v;
}

// A large TCP recv raises SO_RCVLOWAT to what it still needs (one wake-up
// when it is all there, not one per segment); a small one puts it back to 1;
// AF_UNIX sockets (whose poll ignores it) and rcvlowat_max = 0 never touch it.
BOOST_AUTO_TEST_CASE(large_tcp_recvs_raise_the_low_water_mark_small_ones_reset_it) {
    constexpr std::size_t kBig = 256 << 10;
    for (Transport t : kTransports) {
        for (std::size_t lowat_max : {std::size_t{1} << 20, std::size_t{0}}) {
            BOOST_TEST_CONTEXT(t << ", rcvlowat_max " << lowat_max) {
                Ring ring;
                BufferPool pool(&ring);
                auto [local, peer] = connect(ring, t);
                int fd = local.get();
                SocketStreamOptions o;
                o.rcvlowat_max = lowat_max;
                SocketStream s(ring, std::move(local), o);
                const bool raised = t == Transport::tcp && lowat_max != 0;

                RecvResult big;
                s.recv(lease_or_fail(pool, kBig), 0, kBig, kBig, big.handler());
                ring.submit();
                BOOST_TEST(rcvlowat(fd) == (raised ? static_cast<int>(kBig) : 1));
                auto data = rxtest::pattern_vector(kBig, 7);
                std::thread writer([&] { rxtest::write_all(peer.get(), data, 16 << 10); });
                BOOST_REQUIRE(rxtest::drive(ring, [&] { return big.done; }));
                writer.join();
                BOOST_TEST(big.r.ok());
                BOOST_TEST(big.r.bytes == kBig);
                BOOST_TEST(rxtest::matches_pattern({big.lease.data(), kBig}, 7));

                RecvResult small;
                s.recv(lease_or_fail(pool, 4096), 0, 16, 4096, small.handler());
                ring.submit();
                BOOST_TEST(rcvlowat(fd) == 1);
                BOOST_REQUIRE(rxtest::write_all(peer.get(), {data.data(), 16}));
                BOOST_REQUIRE(rxtest::drive(ring, [&] { return small.done; }));
                BOOST_TEST(small.r.bytes == 16u);
            }
        }
    }
}

// A recv that needs more than rcvlowat_max raises the mark only to the cap:
// the receiver starts copying while the sender still has data in flight.
BOOST_AUTO_TEST_CASE(the_low_water_mark_stops_at_its_cap) {
    constexpr std::size_t kNeed = 1 << 20;
    const std::size_t cap = SocketStreamOptions{}.rcvlowat_max;
    BOOST_REQUIRE(cap > SocketStreamOptions{}.rcvlowat_min);
    BOOST_REQUIRE(cap < kNeed);
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = connect(ring, Transport::tcp);
    int fd = local.get();
    SocketStream s(ring, std::move(local));
    RecvResult big;
    s.recv(lease_or_fail(pool, kNeed), 0, kNeed, kNeed, big.handler());
    ring.submit();
    BOOST_TEST(rcvlowat(fd) == static_cast<int>(cap));
    auto data = rxtest::pattern_vector(kNeed, 3);
    std::thread writer([&] { rxtest::write_all(peer.get(), data, 64 << 10); });
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return big.done; }));
    writer.join();
    BOOST_TEST(big.r.bytes == kNeed);
    BOOST_TEST(rxtest::matches_pattern({big.lease.data(), kNeed}, 3));
}

// Regression: with a raised low water mark the kernel must not loop on its
// own (MSG_WAITALL) for a rest that shrinks below the mark: a 40 MB recv
// (above the kernel's cap on the mark) completes, every byte in place.
BOOST_AUTO_TEST_CASE(a_recv_larger_than_the_low_water_mark_cap_completes) {
    constexpr std::size_t kSize = 40'000'000;
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = connect(ring, Transport::tcp);
    SocketStream s(ring, std::move(local));
    RecvResult res;
    s.recv(lease_or_fail(pool, kSize), 0, kSize, kSize, res.handler());
    std::thread writer([&, fd = peer.get()] {
        std::vector<std::byte> chunk(1 << 20);
        for (std::size_t pos = 0; pos < kSize; pos += chunk.size()) {
            std::size_t n = std::min(chunk.size(), kSize - pos);
            rxtest::fill_pattern({chunk.data(), n}, 9, pos);
            if (!rxtest::write_all(fd, {chunk.data(), n})) return;
        }
    });
    bool done = rxtest::drive(ring, [&] { return res.done; });
    if (!done) ::shutdown(peer.get(), SHUT_RDWR);
    writer.join();
    BOOST_REQUIRE(done);
    BOOST_TEST(res.r.ok());
    BOOST_TEST(res.r.bytes == kSize);
    BOOST_TEST(rxtest::matches_pattern({res.lease.data(), kSize}, 9));
}

BOOST_AUTO_TEST_CASE(peer_close_reports_eof) {
    for (Transport t : kTransports) {
        BOOST_TEST_CONTEXT(t) {
            Ring ring;
            BufferPool pool(&ring);
            auto [local, peer] = connect(ring, t);
            SocketStream s(ring, std::move(local));

            RecvResult res;
            s.recv(lease_or_fail(pool, 64), 0, 10, 10, res.handler());
            ring.run_once(0, std::chrono::nanoseconds(0));
            BOOST_REQUIRE(::write(peer.get(), "abc", 3) == 3);
            ::shutdown(peer.get(), SHUT_WR);
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return res.done; }));
            BOOST_TEST(res.r.eof);
            BOOST_TEST(res.r.err == 0);
            BOOST_TEST(res.r.bytes == 3u);
            BOOST_TEST(!res.r.ok());
            BOOST_TEST(std::memcmp(res.lease.data(), "abc", 3) == 0);
            BOOST_TEST(static_cast<bool>(res.lease));  // handed back on EOF too

            RecvResult again;
            s.recv(std::move(res.lease), 0, 1, 64, again.handler());
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return again.done; }));
            BOOST_TEST(again.r.eof);
            BOOST_TEST(again.r.bytes == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(read_fixed_receives_into_registered_buffers) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();
    SocketStreamOptions so;
    so.read_fixed = true;
    SocketStream s(ring, std::move(local), so);
    Lease l = lease_or_fail(pool, 300000);
    if (l.buf_index() < 0) BOOST_TEST_MESSAGE("buffers not registered: plain RECV path");

    auto data = rxtest::pattern_vector(300000, 5);
    int pfd = peer.get();
    PeerThread writer(pfd, s.fd(), [&] { rxtest::write_all(pfd, data, 7000); });
    RecvResult res;
    s.recv(std::move(l), 0, 300000, 300000, res.handler());
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return res.done; }));
    BOOST_TEST(writer.join(), "peer thread was still blocked and had to be aborted");
    BOOST_TEST(res.r.ok());
    BOOST_TEST(res.r.bytes == 300000u);
    BOOST_TEST(rxtest::matches_pattern({res.lease.data(), 300000}, 5));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(sending)

BOOST_AUTO_TEST_CASE(prefix_and_body_arrive_intact_and_in_order) {
    for (Transport t : kTransports) {
        BOOST_TEST_CONTEXT(t) {
            Ring ring;
            BufferPool pool(&ring);
            auto [local, peer] = connect(ring, t);
            SocketStream s(ring, std::move(local));

            const std::string prefix = "RXHDR-0123456789";
            constexpr std::size_t kBody = 700000;
            SendBuffers b = make_send(pool, prefix, kBody, 3, 100);
            b.user = 77;
            std::byte* body_ptr = b.body.data();

            std::vector<std::byte> got;
            int pfd = peer.get();
            PeerThread reader(pfd, s.fd(), [&] { got = rxtest::read_exact(pfd, 16 + kBody); });

            bool done = false;
            SendBuffers back;
            IoResult r;
            s.send(std::move(b), [&](SendBuffers sb, IoResult res) {
                back = std::move(sb);
                r = res;
                done = true;
            });
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return done; }));
            BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");

            BOOST_TEST(r.ok());
            BOOST_TEST(r.bytes == 16 + kBody);
            BOOST_REQUIRE(got.size() == 16 + kBody);
            BOOST_TEST(std::memcmp(got.data(), prefix.data(), 16) == 0);
            BOOST_TEST(rxtest::pattern_mismatch({got.data() + 16, kBody}, 3) ==
                       static_cast<std::size_t>(-1));
            // The handler gets its buffers back, untouched.
            BOOST_TEST(back.body.data() == body_ptr);
            BOOST_TEST(back.user == 77u);
            BOOST_TEST(back.body_offset == 100u);
            BOOST_TEST(back.body_len == kBody);
            BOOST_TEST(back.prefix_len == 16u);
            BOOST_TEST(rxtest::matches_pattern({back.body.data() + 100, kBody}, 3));
            BOOST_TEST(s.counters().bytes_sent == 16 + kBody);
        }
    }
}

BOOST_AUTO_TEST_CASE(many_queued_sends_arrive_in_order) {
    for (Transport t : kTransports) {
        BOOST_TEST_CONTEXT(t) {
            Ring ring;
            BufferPool pool(&ring);
            auto [local, peer] = connect(ring, t);
            auto s = std::make_unique<SocketStream>(ring, std::move(local));

            std::vector<std::byte> expected;
            std::vector<std::byte> got;
            int pfd = peer.get();
            PeerThread reader(pfd, s->fd(), [&] { got = rxtest::read_to_eof(pfd); });

            constexpr int kSends = 300;
            std::vector<int> order;
            std::vector<std::size_t> sizes;
            std::uint64_t x = 99;
            const std::string letters = "abcdefghijklmnopqrstuvwxyz0123456789";
            for (int i = 0; i < kSends; ++i) {
                x = rxtest::mix64(x);
                std::size_t plen = static_cast<std::size_t>(i) % 33;
                std::size_t blen = x % 20000;
                if (plen == 0 && blen == 0) blen = 1;
                std::string prefix = letters.substr(0, plen);
                SendBuffers b = make_send(pool, prefix, blen, 1000 + i, static_cast<std::size_t>(i) % 7);
                auto pb = rxtest::as_bytes(prefix);
                expected.insert(expected.end(), pb.begin(), pb.end());
                auto body = rxtest::pattern_vector(blen, 1000 + i);
                expected.insert(expected.end(), body.begin(), body.end());
                sizes.push_back(plen + blen);
                s->send(std::move(b), [&, i](SendBuffers, IoResult r) {
                    if (r.ok() && r.bytes == sizes[static_cast<std::size_t>(i)]) order.push_back(i);
                    else order.push_back(-1 - i);
                });
            }
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return order.size() == kSends; }));
            for (int i = 0; i < kSends; ++i) BOOST_TEST_REQUIRE(order[i] == i);
            BOOST_TEST(s->counters().bytes_sent == expected.size());
            // Sends queued behind the one in the kernel leave together.
            BOOST_TEST(s->counters().gathered_sends > 0u);
            BOOST_TEST(s->counters().send_ops < static_cast<std::uint64_t>(kSends));
            s.reset();  // closes: the peer sees EOF
            BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");
            BOOST_REQUIRE(got.size() == expected.size());
            BOOST_TEST((got == expected));
            BOOST_REQUIRE(rxtest::drain(ring));
            BOOST_TEST(pool.stats().leased_buffers == 0u);
        }
    }
}

// An empty send ("nothing to send: complete in order, without the kernel",
// stream.cpp) can serve as a flush marker: its handler must not run before
// the handler of a send queued before it.
BOOST_AUTO_TEST_CASE(empty_send_completes_in_order) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();
    auto s = std::make_unique<SocketStream>(ring, std::move(local));
    int pfd = peer.get();
    std::vector<std::byte> got;
    PeerThread reader(pfd, s->fd(), [&] { got = rxtest::read_to_eof(pfd); });

    std::vector<int> order;
    s->send(make_send(pool, "first", 200000, 1), [&](SendBuffers, IoResult) { order.push_back(1); });
    s->send(SendBuffers{}, [&](SendBuffers, IoResult r) {
        BOOST_TEST(r.ok());
        order.push_back(2);
    });
    s->send(make_send(pool, "third", 10, 3), [&](SendBuffers, IoResult) { order.push_back(3); });
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return order.size() == 3; }));
    BOOST_TEST(order == (std::vector<int>{1, 2, 3}), boost::test_tools::per_element());
    s.reset();
    BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");
    BOOST_TEST(got.size() == 5 + 200000 + 5 + 10u);
}

// A handler may queue the next send from inside itself. When that handler
// belongs to an empty send, the new send must still be submitted once.
BOOST_AUTO_TEST_CASE(send_from_the_handler_of_an_empty_send_is_submitted_once) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();
    auto s = std::make_unique<SocketStream>(ring, std::move(local));

    bool inner_done = false;
    IoResult inner;
    s->send(SendBuffers{}, [&](SendBuffers, IoResult) {
        s->send(make_send(pool, "abc", 0, 0), [&](SendBuffers, IoResult r) {
            inner = r;
            inner_done = true;
        });
    });
    // One send, one SQE. (Two would put "abc" on the wire twice and
    // dispatch a second CQE to a freed operation.)
    BOOST_REQUIRE_EQUAL(ring.in_flight(), 1u);
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return inner_done; }));
    BOOST_TEST(inner.ok());
    BOOST_TEST(inner.bytes == 3u);
    BOOST_REQUIRE(rxtest::drain(ring));
    s.reset();
    auto got = rxtest::read_to_eof(peer.get());
    BOOST_TEST(std::string(reinterpret_cast<const char*>(got.data()), got.size()) == "abc");
}

BOOST_AUTO_TEST_CASE(send_to_a_closed_peer_fails_and_returns_the_buffers) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();
    SocketStream s(ring, std::move(local));
    peer.reset();
    SendBuffers b = make_send(pool, "hdr", 5000, 11);
    std::byte* body = b.body.data();
    bool done = false;
    IoResult r;
    SendBuffers back;
    s.send(std::move(b), [&](SendBuffers sb, IoResult res) {
        back = std::move(sb);
        r = res;
        done = true;
    });
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return done; }));
    BOOST_TEST(r.err == -EPIPE);
    BOOST_TEST(!r.ok());
    BOOST_TEST(back.body.data() == body);
    BOOST_TEST(rxtest::matches_pattern({back.body.data(), 5000}, 11));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(lifetime)

BOOST_AUTO_TEST_CASE(destroying_with_a_recv_in_flight_skips_the_handler_and_frees_later) {
    for (Transport t : kTransports) {
        BOOST_TEST_CONTEXT(t) {
            Ring ring;
            BufferPool pool(&ring);
            auto [local, peer] = connect(ring, t);
            bool called = false;
            {
                SocketStream s(ring, std::move(local));
                s.recv(lease_or_fail(pool, 4096), 0, 10, 10,
                       [&](Lease, IoResult) { called = true; });
                ring.run_once(0, std::chrono::nanoseconds(0));
                BOOST_TEST(ring.in_flight() == 1u);
            }
            // The kernel may still write into the buffer until its final CQE
            // is reaped: the lease must not be back yet.
            BOOST_TEST(pool.stats().leased_buffers == 1u);
            BOOST_REQUIRE(rxtest::drain(ring));
            BOOST_TEST(!called);
            BOOST_TEST(pool.stats().leased_buffers == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(destroying_with_sends_queued_skips_handlers_and_frees_buffers) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();  // nobody reads: the first send blocks
    int called = 0;
    {
        SocketStream s(ring, std::move(local));
        for (int i = 0; i < 3; ++i)
            s.send(make_send(pool, "hdr", 4 << 20, i), [&](SendBuffers, IoResult) { ++called; });
        ring.run_once(0, std::chrono::nanoseconds(0));
        BOOST_TEST(ring.in_flight() == 1u);  // one send in the kernel at a time
        BOOST_TEST(pool.stats().leased_buffers == 3u);
    }
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(called == 0);
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_CASE(destroying_with_a_gathered_send_in_flight_keeps_its_riders_alive) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();  // nobody reads: the gather blocks
    int called = 0;
    {
        SocketStream s(ring, std::move(local));
        // The first send goes alone; when it completes, the next one gathers
        // the next ones (up to 1 MiB, more than the socket takes) and blocks.
        s.send(make_send(pool, "first", 100, 1), [&](SendBuffers, IoResult) { ++called; });
        for (int i = 0; i < 9; ++i)
            s.send(make_send(pool, "hdr", 64 << 10, i), [&](SendBuffers, IoResult) { ++called; });
        BOOST_REQUIRE(rxtest::drive(ring, [&] { return called == 1; }));
        ring.run_once(0, std::chrono::nanoseconds(0));
        BOOST_TEST(s.counters().gathered_sends > 0u);  // riders in the blocked SQE
        BOOST_TEST(called == 1);
        BOOST_TEST(pool.stats().leased_buffers == 9u);
    }
    // The kernel may still read the riders' buffers until the final CQE;
    // under ASan a rider freed early shows as a use-after-free here.
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(called == 1);
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_CASE(close_completes_pending_ops_and_refuses_new_ones) {
    Ring ring;
    BufferPool pool(&ring);
    auto [local, peer] = rxtest::socket_pair();
    SocketStream s(ring, std::move(local));
    RecvResult res;
    s.recv(lease_or_fail(pool, 128), 0, 10, 10, res.handler());
    ring.run_once(0, std::chrono::nanoseconds(0));
    s.close();
    s.close();  // idempotent
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return res.done; }));
    BOOST_TEST(!res.r.ok());
    BOOST_TEST(static_cast<bool>(res.lease));

    RecvResult late;
    s.recv(std::move(res.lease), 0, 1, 128, late.handler());
    BOOST_TEST(late.done);  // at once, without the kernel
    BOOST_TEST(late.r.err == -ECANCELED);
    BOOST_TEST(static_cast<bool>(late.lease));

    bool sent = false;
    SendBuffers back;
    s.send(make_send(pool, "x", 100, 1), [&](SendBuffers b, IoResult r) {
        BOOST_TEST(r.err == -ECANCELED);
        back = std::move(b);
        sent = true;
    });
    BOOST_TEST(sent);
    BOOST_TEST(back.body_len == 100u);
    BOOST_REQUIRE(rxtest::drain(ring));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(zerocopy)

BOOST_AUTO_TEST_CASE(send_zc_over_tcp_returns_the_body_after_notification) {
    Ring ring;
    if (!ring.features().op_send_zc) {
        BOOST_TEST_MESSAGE("kernel without IORING_OP_SEND_ZC: skipped");
        return;
    }
    for (bool registered : {true, false}) {
        BOOST_TEST_CONTEXT("registered buffers " << registered) {
            PoolOptions po;
            po.register_buffers = registered;
            BufferPool pool(&ring, po);
            auto [client, server] = rxtest::tcp_pair(ring);
            SocketStreamOptions so;
            so.zerocopy_threshold = 1;
            auto s = std::make_unique<SocketStream>(ring, std::move(client), so);

            constexpr std::size_t kBody = 1 << 20;
            SendBuffers b = make_send(pool, "0123456789abcdef", kBody, 21);
            if (registered && !pool.stats().registration_failed)
                BOOST_TEST(b.body.buf_index() >= 0);
            std::vector<std::byte> got;
            int sfd = server.get();
            PeerThread reader(sfd, s->fd(), [&] { got = rxtest::read_exact(sfd, 16 + kBody); });

            bool done = false;
            std::size_t in_flight_at_handler = 99;
            IoResult r;
            SendBuffers back;
            s->send(std::move(b), [&](SendBuffers sb, IoResult res) {
                // Called from the notification (the op's final CQE), not
                // from the result CQE that still has IORING_CQE_F_MORE.
                in_flight_at_handler = ring.in_flight();
                back = std::move(sb);
                r = res;
                done = true;
            });
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return done; }));
            BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");
            BOOST_TEST(r.ok());
            BOOST_TEST(r.bytes == 16 + kBody);
            BOOST_TEST(in_flight_at_handler == 0u);
            BOOST_TEST(s->counters().zc_sends > 0u);
            BOOST_TEST_MESSAGE("zc_sends " << s->counters().zc_sends << ", zc_copied "
                                           << s->counters().zc_copied);
            BOOST_REQUIRE(got.size() == 16 + kBody);
            BOOST_TEST(std::memcmp(got.data(), "0123456789abcdef", 16) == 0);
            BOOST_TEST(rxtest::matches_pattern({got.data() + 16, kBody}, 21));
            BOOST_TEST(rxtest::matches_pattern({back.body.data(), kBody}, 21));
            s.reset();
            BOOST_REQUIRE(rxtest::drain(ring));
            back = SendBuffers{};
            BOOST_TEST(pool.stats().leased_buffers == 0u);
        }
    }
}

// Loopback always copies: after zerocopy_fallback_after notifications that
// say so, the stream sends with copies; with 0 it keeps zero-copy. Every
// byte arrives either way.
BOOST_AUTO_TEST_CASE(zc_sends_fall_back_to_copies_when_the_kernel_copies) {
    Ring ring;
    if (!ring.features().op_send_zc) {
        BOOST_TEST_MESSAGE("kernel without IORING_OP_SEND_ZC: skipped");
        return;
    }
    for (unsigned after : {2u, 0u}) {
        BOOST_TEST_CONTEXT("zerocopy_fallback_after " << after) {
            BufferPool pool(&ring);
            auto [client, server] = rxtest::tcp_pair(ring);
            SocketStreamOptions so;
            so.zerocopy_threshold = 1;
            so.zerocopy_fallback_after = after;
            auto s = std::make_unique<SocketStream>(ring, std::move(client), so);
            constexpr int kSends = 6;
            constexpr std::size_t kBody = 256 << 10;
            std::vector<std::byte> got;
            int sfd = server.get();
            PeerThread reader(sfd, s->fd(), [&] { got = rxtest::read_exact(sfd, kSends * (4 + kBody)); });
            for (int i = 0; i < kSends; ++i) {  // one at a time: each waits for its notification
                bool done = false;
                IoResult r;
                s->send(make_send(pool, "abcd", kBody, 40 + i), [&](SendBuffers, IoResult res) {
                    r = res;
                    done = true;
                });
                BOOST_REQUIRE(rxtest::drive(ring, [&] { return done; }));
                BOOST_TEST(r.ok());
            }
            BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");
            const StreamCounters& c = s->counters();
            BOOST_TEST_MESSAGE("zc_sends " << c.zc_sends << ", zc_copied " << c.zc_copied);
            if (c.zc_copied == 0) {
                BOOST_TEST_MESSAGE("this kernel did not copy on loopback: nothing to fall back from");
            } else if (after == 2) {
                BOOST_TEST(c.zc_sends == 2u);
                BOOST_TEST(c.zc_fallbacks == 1u);
            } else {
                BOOST_TEST(c.zc_sends == static_cast<std::uint64_t>(kSends));
                BOOST_TEST(c.zc_fallbacks == 0u);
            }
            BOOST_REQUIRE(got.size() == kSends * (4 + kBody));
            for (int i = 0; i < kSends; ++i)
                BOOST_TEST(rxtest::matches_pattern({got.data() + i * (4 + kBody) + 4, kBody}, 40 + i));
            s.reset();
            BOOST_REQUIRE(rxtest::drain(ring));
            BOOST_TEST(pool.stats().leased_buffers == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(many_zc_sends_over_tcp_arrive_in_order) {
    Ring ring;
    if (!ring.features().op_send_zc) {
        BOOST_TEST_MESSAGE("kernel without IORING_OP_SEND_ZC: skipped");
        return;
    }
    BufferPool pool(&ring);
    auto [client, server] = rxtest::tcp_pair(ring);
    SocketStreamOptions so;
    so.zerocopy_threshold = 4096;  // small bodies go the copying path, big ones zero-copy
    auto s = std::make_unique<SocketStream>(ring, std::move(client), so);

    std::vector<std::byte> got;
    int sfd = server.get();
    PeerThread reader(sfd, s->fd(), [&] { got = rxtest::read_to_eof(sfd); });

    std::vector<std::byte> expected;
    std::vector<int> done;
    constexpr int kSends = 40;
    for (int i = 0; i < kSends; ++i) {
        std::size_t blen = (i % 4 == 3) ? 100 : (static_cast<std::size_t>(i) + 1) * 20000;
        std::string prefix = "#" + std::to_string(i) + "#";
        s->send(make_send(pool, prefix, blen, 500 + i), [&, i, blen](SendBuffers b, IoResult r) {
            bool intact = rxtest::matches_pattern({b.body.data(), blen}, 500 + i);
            done.push_back(r.ok() && intact ? i : -1 - i);
        });
        auto pb = rxtest::as_bytes(prefix);
        expected.insert(expected.end(), pb.begin(), pb.end());
        auto body = rxtest::pattern_vector(blen, 500 + i);
        expected.insert(expected.end(), body.begin(), body.end());
    }
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return done.size() == kSends; }));
    for (int v : done) BOOST_TEST(v >= 0);
    BOOST_TEST(s->counters().zc_sends > 0u);
    s.reset();
    BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");
    BOOST_REQUIRE(got.size() == expected.size());
    BOOST_TEST((got == expected));
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_SUITE_END()
