// engine::make_shm_stream (the shm transport) under proto's FrameReader and
// FrameWriter: frames of every size cross, large payloads arrive as read-only
// views of the sender's memory and go back to its pool when dropped, both
// wake-up paths (futex through io_uring, eventfd) work when both sides sleep,
// an echoed view goes back to its owner by reference, a receiver that
// never releases meets the sender's budget as back-pressure,
// a hostile peer's forged descriptors close the connection with an error
// naming them, and a peer killed while holding payloads gives them back.
#define BOOST_TEST_MODULE engine_shm_stream
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/shm_region.hpp"
#include "ringxfer/engine/shm_ring.hpp"
#include "ringxfer/engine/shm_stream.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"
#include "support/rx_test.hpp"

using namespace ringxfer;
using namespace rxtest;
using engine::Fd;

namespace {

BOOST_GLOBAL_FIXTURE(IgnoreSigpipe);

std::pair<Fd, Fd> seqpacket_pair() {
    int sv[2];
    BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    return {Fd(sv[0]), Fd(sv[1])};
}

engine::PoolOptions shared_pool(std::size_t budget = std::size_t{256} << 20) {
    engine::PoolOptions po;
    po.shared_memory = true;
    po.budget_bytes = budget;
    po.register_buffers = false;  // the shm transport uses no fixed buffers
    return po;
}

// Two ends of one connection on one ring.
struct Pair {
    explicit Pair(const engine::ShmStreamOptions& so = {}, const engine::RingOptions& ro = {})
        : ring(ro), a_pool(&ring, shared_pool()), b_pool(&ring, shared_pool()) {
        auto [x, y] = seqpacket_pair();
        a = engine::make_shm_stream(ring, std::move(x), a_pool, true, so);
        b = engine::make_shm_stream(ring, std::move(y), b_pool, false, so);
    }
    ~Pair() {
        // Destroyed streams cancel their waits: reap those before the ring goes.
        a.reset();
        b.reset();
        BOOST_TEST(drain(ring));
    }
    engine::Ring ring;
    engine::BufferPool a_pool, b_pool;
    std::unique_ptr<engine::Stream> a, b;
};

// Reads one frame; returns it (or fails the test).
proto::Frame read_one(engine::Ring& ring, proto::FrameReader& reader) {
    std::optional<proto::Frame> got;
    std::error_code ec;
    reader.read([&](proto::Frame f, std::error_code e) {
        ec = e;
        got = std::move(f);
    });
    BOOST_REQUIRE(drive(ring, [&] { return got.has_value(); }));
    BOOST_REQUIRE_MESSAGE(!ec, ec.message());
    return std::move(*got);
}

}  // namespace

BOOST_AUTO_TEST_CASE(frames_of_every_size_cross_and_all_above_inline_are_views_of_the_sender) {
    Pair p;
    proto::FrameWriter writer(*p.a);
    proto::FrameReader reader(*p.b, p.b_pool);
    const std::size_t sizes[] = {0, 1, 24, 256, 257, 4096, 20000, 100000, std::size_t{8} << 20};
    for (std::size_t n : sizes) {
        // From the sender's shared pool: sent by reference.
        proto::Frame f;
        BOOST_REQUIRE(proto::Frame::allocate(p.a_pool, n, f) == 0 || n == 0);
        fill_pattern(f.mutable_payload(), n);
        bool sent = false;
        BOOST_REQUIRE(writer.try_write(f, [&](proto::Frame, std::error_code ec) {
            BOOST_TEST(!ec);
            sent = true;
        }));
        proto::Frame got = read_one(p.ring, reader);
        BOOST_TEST_CONTEXT("size " << n) {
            BOOST_TEST(got.size() == n);
            BOOST_TEST(matches_pattern(got.payload(), n));
            if (n > engine::kShmInlineBodyMax) {
                // A view of the sender's slab: the send is not done (its
                // buffer not free) until the receiver drops the frame.
                BOOST_TEST(got.lease().read_only());
                for (int i = 0; i < 20; ++i) p.ring.run_once(0, std::chrono::nanoseconds(0));
                BOOST_TEST(!sent);
                got.reset();
            }
            BOOST_TEST(drive(p.ring, [&] { return sent; }));
        }
    }
    // Every payload above kShmInlineBodyMax went by reference (257 .. 8 MiB)
    // and arrived as a view, however small: nothing was copied out.
    BOOST_TEST(reader.stats().referenced_frames == 5u);
    BOOST_TEST(p.a->counters().by_reference_sends == 5u);
    BOOST_TEST(p.b->counters().recv_copied_bytes == 0u);
    BOOST_TEST(p.a->counters().send_copied_bytes == 0u);
    // Every payload came back to the sender's pool.
    BOOST_TEST(drive(p.ring, [&] { return p.a_pool.stats().leased_buffers == 0; }));
}

BOOST_AUTO_TEST_CASE(a_payload_from_other_memory_is_copied_once_and_released_after_reading) {
    Pair p;
    engine::PoolOptions plain_options;
    plain_options.register_buffers = false;
    engine::BufferPool plain(&p.ring, plain_options);
    proto::FrameWriter writer(*p.a);
    proto::FrameReader reader(*p.b, p.b_pool);
    proto::Frame f;
    BOOST_REQUIRE(proto::Frame::allocate(plain, 3 << 20, f) == 0);
    fill_pattern(f.mutable_payload(), 7);
    bool sent = false;
    BOOST_REQUIRE(writer.try_write(f, [&](proto::Frame back, std::error_code ec) {
        BOOST_TEST(!ec);
        BOOST_TEST(back.size() == std::size_t{3} << 20);  // the caller's buffer, free at once
        sent = true;
    }));
    BOOST_TEST(drive(p.ring, [&] { return sent; }));
    BOOST_TEST(p.a->counters().send_copied_bytes == std::size_t{3} << 20);
    BOOST_TEST(p.a_pool.stats().leased_buffers == 1u);  // the copy, until the peer releases it
    proto::Frame got = read_one(p.ring, reader);
    BOOST_TEST(matches_pattern(got.payload(), 7));
    BOOST_TEST(got.lease().read_only());
    got.reset();
    BOOST_TEST(drive(p.ring, [&] { return p.a_pool.stats().leased_buffers == 0; }));
}

BOOST_AUTO_TEST_CASE(an_empty_send_completes_and_does_not_block_the_ones_behind_it) {
    Pair p;
    bool first = false, second = false;
    p.a->send(engine::SendBuffers{}, [&](engine::SendBuffers, engine::IoResult r) {
        BOOST_TEST(r.err == 0);
        BOOST_TEST(r.bytes == 0u);
        first = true;
    });
    engine::SendBuffers b;
    b.prefix_len = 3;
    std::memcpy(b.prefix.data(), "abc", 3);
    p.a->send(std::move(b), [&](engine::SendBuffers, engine::IoResult r) {
        BOOST_TEST(r.err == 0);
        second = true;
    });
    BOOST_TEST(drive(p.ring, [&] { return first && second; }));
}

// An echo: the receiver sends the view it got straight back. It goes back by
// reference (a return descriptor), arrives as a view of the sender's own
// memory, and each side's send completes only when the other drops the frame.
BOOST_AUTO_TEST_CASE(an_echoed_view_goes_back_by_reference_to_its_owner) {
    for (bool from_shared : {true, false}) {
        BOOST_TEST_CONTEXT((from_shared ? "from the shared pool" : "copied in")) {
            Pair p;
            engine::PoolOptions plain_options;
            plain_options.register_buffers = false;
            engine::BufferPool plain(&p.ring, plain_options);
            {
                proto::FrameWriter wa(*p.a), wb(*p.b);
                proto::FrameReader ra(*p.a, p.a_pool), rb(*p.b, p.b_pool);
                const std::size_t n = std::size_t{1} << 20;
                proto::Frame f;
                BOOST_REQUIRE(proto::Frame::allocate(from_shared ? p.a_pool : plain, n, f) == 0);
                fill_pattern(f.mutable_payload(), 11);
                bool sent = false, echoed = false;
                BOOST_REQUIRE(wa.try_write(f, [&](proto::Frame, std::error_code ec) {
                    BOOST_TEST(!ec);
                    sent = true;
                }));
                proto::Frame got = read_one(p.ring, rb);
                BOOST_REQUIRE(got.lease().read_only());
                BOOST_REQUIRE(wb.try_write(got, [&](proto::Frame, std::error_code ec) {
                    BOOST_TEST(!ec);
                    echoed = true;
                }));
                got.reset();  // the writer holds its own handle
                proto::Frame back = read_one(p.ring, ra);
                BOOST_TEST(back.size() == n);
                BOOST_TEST(back.lease().read_only());
                BOOST_TEST(matches_pattern(back.payload(), 11));
                BOOST_TEST(p.b->counters().by_reference_sends == 1u);
                BOOST_TEST(p.b->counters().send_copied_bytes == 0u);
                BOOST_TEST(p.a->counters().recv_copied_bytes == 0u);
                for (int i = 0; i < 20; ++i) p.ring.run_once(0, std::chrono::nanoseconds(0));
                BOOST_TEST(!echoed);  // b's send holds a's payload until a drops the echo
                BOOST_TEST(sent == !from_shared);  // a copy's send is done at once

                // a's own memory, back in a view, goes out again by reference.
                const auto refs_before = p.a->counters().by_reference_sends;
                bool bounced = false;
                BOOST_REQUIRE(wa.try_write(back, [&](proto::Frame, std::error_code ec) {
                    BOOST_TEST(!ec);
                    bounced = true;
                }));
                back.reset();
                proto::Frame again = read_one(p.ring, rb);
                BOOST_TEST(matches_pattern(again.payload(), 11));
                BOOST_TEST(p.a->counters().by_reference_sends == refs_before + 1);
                BOOST_TEST(p.a->counters().send_copied_bytes == (from_shared ? 0u : n));
                again.reset();
                BOOST_TEST(drive(p.ring, [&] { return bounced && echoed && sent; }));
            }  // the readers' staging buffers go back too
            BOOST_TEST(drive(p.ring, [&] {
                return p.a_pool.stats().leased_buffers == 0 && p.b_pool.stats().leased_buffers == 0;
            }));
        }
    }
}

// Ping-pong with both sides sleeping (no spin): every frame needs a wake-up.
// Returns the sleeps of both sides.
std::uint64_t ping_pong(const engine::ShmStreamOptions& so, const engine::RingOptions& ro = {}) {
    Pair p(so, ro);
    proto::FrameWriter wa(*p.a), wb(*p.b);
    proto::FrameReader ra(*p.a, p.a_pool), rb(*p.b, p.b_pool);
    for (int i = 0; i < 200; ++i) {
        proto::Frame f;
        BOOST_REQUIRE(proto::Frame::allocate(p.a_pool, 64, f) == 0);
        fill_pattern(f.mutable_payload(), i);
        BOOST_REQUIRE(wa.try_write(f, [](proto::Frame, std::error_code) {}));
        proto::Frame got = read_one(p.ring, rb);
        BOOST_REQUIRE(matches_pattern(got.payload(), i));
        BOOST_REQUIRE(wb.try_write(got, [](proto::Frame, std::error_code) {}));
        proto::Frame back = read_one(p.ring, ra);
        BOOST_REQUIRE(matches_pattern(back.payload(), i));
    }
    if (so.spin && so.spin->count() == 0) {
        BOOST_TEST(p.a->counters().sleeps > 0u);
        BOOST_TEST(p.b->counters().sleeps > 0u);
        BOOST_TEST(p.a->counters().wakeups_sent + p.b->counters().wakeups_sent > 0u);
    }
    return p.a->counters().sleeps + p.b->counters().sleeps;
}

BOOST_AUTO_TEST_CASE(the_spin_before_sleeping_is_the_rings_busy_poll_unless_set) {
    engine::RingOptions polling;
    polling.busy_poll = std::chrono::seconds(10);  // longer than the test: never sleeps
    BOOST_TEST(ping_pong({}, polling) == 0u);
    BOOST_TEST(ping_pong({}, engine::RingOptions{}) > 0u);  // busy_poll 0: sleeps at once
    engine::ShmStreamOptions no_spin;
    no_spin.spin = std::chrono::microseconds(0);
    BOOST_TEST(ping_pong(no_spin, polling) > 0u);  // the stream's own setting wins
}

BOOST_AUTO_TEST_CASE(both_sides_sleeping_wake_each_other_through_the_futex_word) {
    engine::Ring probe;
    if (!probe.features().op_futex_wait) {
        BOOST_TEST_MESSAGE("kernel without IORING_OP_FUTEX_WAIT: the eventfd case covers it");
        return;
    }
    engine::ShmStreamOptions so;
    so.spin = std::chrono::microseconds(0);
    ping_pong(so);
}

BOOST_AUTO_TEST_CASE(both_sides_sleeping_wake_each_other_through_eventfds) {
    engine::ShmStreamOptions so;
    so.spin = std::chrono::microseconds(0);
    so.force_eventfd = true;
    ping_pong(so);
}

// -- a hostile peer, played by hand -------------------------------------------

namespace {
// The rendezvous as a connector speaks it (shm_stream.cpp's CtlMsg).
struct Ctl {
    std::uint32_t magic = 0x48535852, version = 1, type = 0, arg = 0, flags = 0, reserved = 0;
    std::uint64_t a = 0;
};

struct HostilePeer {
    HostilePeer() : pool(&ring, shared_pool()) {
        auto [x, y] = seqpacket_pair();
        me = std::move(x);
        victim = engine::make_shm_stream(ring, std::move(y), pool, false);
        const std::uint32_t cap = 64;
        const std::size_t span = (engine::ShmRing::bytes_for(cap) + 4095) / 4096 * 4096;
        BOOST_REQUIRE(engine::ShmRegion::create(2 * span, "hostile", rings,
                                                engine::ShmRegion::Access::both_write) == 0);
        BOOST_REQUIRE(engine::ShmRing::create(rings.data(), span, cap, out) == 0);
        BOOST_REQUIRE(engine::ShmRing::create(rings.data() + span, span, cap, in) == 0);
        Fd efd(::eventfd(0, EFD_CLOEXEC));
        Ctl hello;
        hello.type = 1;
        hello.arg = cap;
        hello.a = 2 * span;
        hello.flags = 1;
        const int fds[2] = {rings.fd(), efd.get()};
        BOOST_REQUIRE(engine::send_with_fds(me.get(), std::as_bytes(std::span(&hello, 1)), fds) > 0);
        eventfd = std::move(efd);
    }
    ~HostilePeer() {
        victim.reset();
        BOOST_TEST(drain(ring));
    }
    void announce(std::uint32_t id, const engine::ShmRegion& r) {
        Ctl m;
        m.type = 3;
        m.arg = id;
        m.a = r.size();
        const int fd = r.fd();
        BOOST_REQUIRE(engine::send_with_fds(me.get(), std::as_bytes(std::span(&m, 1)),
                                            std::span(&fd, 1)) > 0);
    }
    void push(engine::ShmDescriptor d) {
        BOOST_REQUIRE(out.try_push(std::span(&d, 1)) == 1);
        out.wake();  // the victim sleeps on its futex word (or polls)
    }
    // Reads one frame on the victim; returns the error it failed with.
    std::error_code victim_reads() {
        proto::FrameReader reader(*victim, pool);
        std::optional<std::error_code> ec;
        reader.read([&](proto::Frame, std::error_code e) { ec = e; });
        BOOST_REQUIRE(drive(ring, [&] { return ec.has_value(); }));
        return *ec;
    }
    engine::Ring ring;
    engine::BufferPool pool;
    Fd me, eventfd;
    std::unique_ptr<engine::Stream> victim;
    engine::ShmRegion rings;
    engine::ShmRing out, in;
};

engine::ShmDescriptor header_of(std::uint64_t length) {
    // A proto header travels inline: 16 bytes in one descriptor.
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::FrameHeader fh{};
    fh.length = length;
    proto::encode_header(fh, h);
    engine::ShmDescriptor d{};
    d.flags = 1 | (proto::kHeaderSize << 8);
    std::memcpy(&d.offset, h.data(), h.size());
    return d;
}
}  // namespace

BOOST_AUTO_TEST_CASE(a_descriptor_for_a_region_never_announced_closes_the_connection) {
    HostilePeer h;
    h.push(header_of(1 << 20));
    engine::ShmDescriptor d{};
    d.region = 7;
    d.flags = 2;
    d.length = 1 << 20;
    h.push(d);
    std::error_code ec = h.victim_reads();
    BOOST_TEST((ec == std::errc::protocol_error), ec.message());
    BOOST_TEST(h.victim->error_message().find("region 7, which the peer never announced") !=
               std::string::npos, h.victim->error_message());
}

BOOST_AUTO_TEST_CASE(a_descriptor_outside_its_region_closes_the_connection) {
    HostilePeer h;
    engine::ShmRegion r;
    BOOST_REQUIRE(engine::ShmRegion::create(1 << 20, "small", r) == 0);
    h.announce(0, r);
    h.push(header_of(1 << 20));
    engine::ShmDescriptor d{};
    d.flags = 2;
    d.offset = 4096;  // 4 KiB past the end once the length is added
    d.length = 1 << 20;
    h.push(d);
    std::error_code ec = h.victim_reads();
    BOOST_TEST((ec == std::errc::protocol_error), ec.message());
    BOOST_TEST(h.victim->error_message().find("outside region 0") != std::string::npos,
               h.victim->error_message());
}

BOOST_AUTO_TEST_CASE(a_forged_release_closes_the_connection) {
    HostilePeer h;
    engine::ShmDescriptor d{};
    d.flags = 3;
    d.cookie = (std::uint64_t{1} << 32) | 5;
    h.push(d);
    std::error_code ec = h.victim_reads();
    BOOST_TEST((ec == std::errc::protocol_error), ec.message());
    BOOST_TEST(h.victim->error_message().find("not out (forged or released twice)") !=
               std::string::npos, h.victim->error_message());
}

BOOST_AUTO_TEST_CASE(a_forged_return_closes_the_connection) {
    HostilePeer h;
    h.push(header_of(4096));
    engine::ShmDescriptor d{};
    d.flags = 5;  // "here is your payload back": the victim sent none
    d.offset = (std::uint64_t{1} << 32) | 0;
    d.length = 4096;
    d.cookie = 1;
    h.push(d);
    std::error_code ec = h.victim_reads();
    BOOST_TEST((ec == std::errc::protocol_error), ec.message());
    BOOST_TEST(h.victim->error_message().find("not one of ours out") != std::string::npos,
               h.victim->error_message());
}

BOOST_AUTO_TEST_CASE(a_peer_that_never_completes_the_handshake_times_out) {
    for (bool connector : {true, false}) {
        BOOST_TEST_CONTEXT((connector ? "connector" : "acceptor")) {
            engine::Ring ring;
            engine::BufferPool pool(&ring, shared_pool());
            auto [mine, silent] = seqpacket_pair();  // `silent` never says a word
            engine::ShmStreamOptions so;
            so.handshake_timeout = std::chrono::milliseconds(100);
            auto stream = engine::make_shm_stream(ring, std::move(mine), pool, connector, so);
            proto::FrameReader reader(*stream, pool);
            std::optional<std::error_code> ec;
            const auto t0 = std::chrono::steady_clock::now();
            reader.read([&](proto::Frame, std::error_code e) { ec = e; });
            BOOST_REQUIRE(drive(ring, [&] { return ec.has_value(); }));
            const auto took = std::chrono::steady_clock::now() - t0;
            BOOST_TEST((*ec == std::errc::timed_out), ec->message());
            BOOST_TEST(took >= std::chrono::milliseconds(90));
            BOOST_TEST(stream->error_message().find("no shm handshake") != std::string::npos,
                       stream->error_message());
            stream.reset();
            BOOST_TEST(drain(ring));
        }
    }
}

// A receiver that holds every frame and releases none: the sender's pool
// budget stops it (back-pressure: sends wait, nothing fails or hangs), and
// once the frames are dropped the rest go through.
BOOST_AUTO_TEST_CASE(a_receiver_that_never_releases_meets_back_pressure) {
    engine::Ring ring;
    engine::BufferPool a_pool(&ring, shared_pool(std::size_t{8} << 20)), b_pool(&ring, shared_pool());
    engine::PoolOptions plain_options;
    plain_options.register_buffers = false;
    engine::BufferPool plain(&ring, plain_options);
    auto [x, y] = seqpacket_pair();
    auto a = engine::make_shm_stream(ring, std::move(x), a_pool, true);
    auto b = engine::make_shm_stream(ring, std::move(y), b_pool, false);
    {
        proto::FrameWriter writer(*a);
        proto::FrameReader reader(*b, b_pool);
        const std::size_t n = std::size_t{1} << 20;
        const std::size_t total = 20;
        std::vector<proto::Frame> frames(total);
        for (std::size_t i = 0; i < total; ++i) {
            BOOST_REQUIRE(proto::Frame::allocate(plain, n, frames[i]) == 0);
            fill_pattern(frames[i].mutable_payload(), static_cast<int>(i));
        }
        std::size_t next = 0, sent = 0, received = 0;
        std::error_code failure;
        std::vector<proto::Frame> held;
        std::function<void()> pump = [&] {
            while (next < total &&
                   writer.try_write(frames[next], [&](proto::Frame, std::error_code ec) {
                       if (ec) failure = ec;
                       ++sent;
                       pump();
                   }))
                ++next;
        };
        std::function<void()> read_more = [&] {
            reader.read([&](proto::Frame f, std::error_code ec) {
                if (ec) return void(failure = ec);
                BOOST_CHECK(matches_pattern(f.payload(), static_cast<int>(received)));
                ++received;
                held.push_back(std::move(f));
                read_more();
            });
        };
        pump();
        read_more();
        BOOST_REQUIRE(drive(ring, [&] { return received >= 4; }));
        // Give the sender time to run into its budget and stay there.
        const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
        BOOST_REQUIRE(drive(ring, [&] { return std::chrono::steady_clock::now() >= until; }));
        BOOST_TEST(!failure, failure.message());
        BOOST_TEST(received <= 8u);  // 8 MiB of budget: at most 8 copies of 1 MiB out
        BOOST_TEST(received < total);
        BOOST_TEST(a_pool.stats().failures > 0u);  // leases refused: the wait is the budget
        BOOST_TEST(a->error_message().empty());
        held.clear();  // released: the rest flows
        BOOST_TEST(drive(ring, [&] {
            held.clear();
            return received == total && sent == total;
        }));
        BOOST_TEST(!failure, failure.message());
    }
    a.reset();
    b.reset();
    BOOST_TEST(drain(ring));
}

// A sender that closes while the peer still reads its payload keeps the
// payload (and its send open) until the peer releases it, for close_linger
// at most: closing never hands memory the peer can see back to the pool.
BOOST_AUTO_TEST_CASE(a_sender_that_closes_keeps_what_the_peer_still_reads) {
    for (bool release : {true, false}) {
        BOOST_TEST_CONTEXT((release ? "the peer releases" : "the peer keeps it past the linger")) {
            engine::ShmStreamOptions so;
            so.close_linger = std::chrono::milliseconds(release ? 10'000 : 200);
            Pair p(so);
            {
                proto::FrameWriter writer(*p.a);
                proto::FrameReader reader(*p.b, p.b_pool);
                proto::Frame f;
                BOOST_REQUIRE(proto::Frame::allocate(p.a_pool, 1 << 20, f) == 0);
                fill_pattern(f.mutable_payload(), 5);
                std::optional<std::error_code> sent;
                BOOST_REQUIRE(writer.try_write(f, [&](proto::Frame, std::error_code ec) { sent = ec; }));
                proto::Frame got = read_one(p.ring, reader);
                p.a->close();
                const auto t0 = std::chrono::steady_clock::now();
                for (int i = 0; i < 50; ++i) p.ring.run_once(0, std::chrono::nanoseconds(0));
                BOOST_TEST(!sent.has_value());  // still out: the peer reads it
                BOOST_TEST(p.a_pool.stats().leased_buffers == 1u);
                BOOST_TEST(matches_pattern(got.payload(), 5));
                if (release) {
                    got.reset();
                    BOOST_REQUIRE(drive(p.ring, [&] { return sent.has_value(); }));
                    BOOST_TEST(!*sent, sent->message());
                } else {
                    BOOST_REQUIRE(drive(p.ring, [&] { return sent.has_value(); }));
                    BOOST_TEST((std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(150)));
                    BOOST_TEST((*sent == std::errc::operation_canceled), sent->message());
                }
                BOOST_TEST(drive(p.ring, [&] { return p.a_pool.stats().leased_buffers == 0; }));
            }
        }
    }
}

// The same when the sender's stream is destroyed right after close() (what
// a connection object does once its sends are done): the payload waits in
// the link until the peer is gone, not in the pool.
BOOST_AUTO_TEST_CASE(a_sender_destroyed_after_close_keeps_what_the_peer_still_reads) {
    Pair p;
    engine::PoolOptions plain_options;
    plain_options.register_buffers = false;
    engine::BufferPool plain(&p.ring, plain_options);
    proto::FrameReader reader(*p.b, p.b_pool);
    proto::Frame got;
    {
        proto::FrameWriter writer(*p.a);
        proto::Frame f;
        BOOST_REQUIRE(proto::Frame::allocate(plain, 1 << 20, f) == 0);  // copied in
        fill_pattern(f.mutable_payload(), 9);
        bool sent = false;
        BOOST_REQUIRE(writer.try_write(f, [&](proto::Frame, std::error_code) { sent = true; }));
        got = read_one(p.ring, reader);
        BOOST_TEST(sent);  // a copy's send is done at once: nothing tells its owner to wait
        p.a->close();
    }
    p.a.reset();
    for (int i = 0; i < 50; ++i) p.ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(p.a_pool.stats().leased_buffers == 1u);  // the copy, still the peer's to read
    engine::Lease probe;  // the pool cannot hand that slab to anyone else meanwhile
    BOOST_REQUIRE(p.a_pool.lease(1 << 20, probe) == 0);
    fill_pattern(probe.span(), 77);
    BOOST_TEST(matches_pattern(got.payload(), 9));
    probe.reset();
    got.reset();
    p.b.reset();  // the peer goes: its socket closes, the copy comes back
    BOOST_TEST(drive(p.ring, [&] { return p.a_pool.stats().leased_buffers == 0; }));
}

BOOST_AUTO_TEST_CASE(a_peer_killed_while_holding_payloads_gives_them_back) {
    auto [x, y] = seqpacket_pair();
    int ready[2];
    BOOST_REQUIRE(::pipe(ready) == 0);
    pid_t child = ::fork();
    BOOST_REQUIRE(child >= 0);
    if (child == 0) {
        // Receives three large frames, keeps them, says so, waits to be killed.
        x.reset();
        engine::Ring ring;
        engine::BufferPool pool(&ring, shared_pool());
        auto s = engine::make_shm_stream(ring, std::move(y), pool, false);
        proto::FrameReader reader(*s, pool);
        std::vector<proto::Frame> kept;
        while (kept.size() < 3) {
            bool done = false;
            reader.read([&](proto::Frame f, std::error_code ec) {
                if (ec) ::_exit(2);
                kept.push_back(std::move(f));
                done = true;
            });
            if (!drive(ring, [&] { return done; })) ::_exit(3);
        }
        char c = 'k';
        if (::write(ready[1], &c, 1) != 1) ::_exit(4);
        for (;;) ::pause();
    }
    y.reset();
    ::close(ready[1]);
    engine::Ring ring;
    engine::BufferPool pool(&ring, shared_pool());
    auto s = engine::make_shm_stream(ring, std::move(x), pool, true);
    proto::FrameWriter writer(*s);
    int done = 0, reset = 0;
    for (int i = 0; i < 3; ++i) {
        proto::Frame f;
        BOOST_REQUIRE(proto::Frame::allocate(pool, 4 << 20, f) == 0);
        BOOST_REQUIRE(writer.try_write(f, [&](proto::Frame, std::error_code ec) {
            ++done;
            if (ec == std::errc::connection_reset) ++reset;
        }));
    }
    // The child holds all three: nothing comes back while it lives.
    char c;
    BOOST_REQUIRE(drive(ring, [&] {
        pollfd pfd{ready[0], POLLIN, 0};
        return ::poll(&pfd, 1, 0) == 1;
    }));
    BOOST_REQUIRE(::read(ready[0], &c, 1) == 1);
    for (int i = 0; i < 20; ++i) ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(done == 0);
    BOOST_TEST(pool.stats().leased_buffers == 3u);
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    BOOST_TEST(drive(ring, [&] { return done == 3; }));
    BOOST_TEST(reset == 3);
    BOOST_TEST(pool.stats().leased_buffers == 0u);
    ::close(ready[0]);
    s.reset();
    BOOST_TEST(drain(ring));
}
