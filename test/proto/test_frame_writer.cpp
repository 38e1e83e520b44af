#define BOOST_TEST_MODULE proto_frame_writer
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/crc32c.hpp"
#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"
#include "ringxfer/proto/header.hpp"
#include "rx_test.hpp"

using namespace ringxfer;
using namespace ringxfer::proto;
using engine::BufferPool;
using rxtest::PeerThread;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace {

constexpr std::size_t MiB = 1 << 20;

struct Spec {
    std::size_t size;
    std::uint8_t flags;
    std::uint64_t seed;
};

Frame make_frame(BufferPool& pool, const Spec& s) {
    Frame f;
    BOOST_REQUIRE(Frame::allocate(pool, s.size, f, s.flags) == 0);
    BOOST_REQUIRE(f.size() == s.size);
    rxtest::fill_pattern(f.mutable_payload(), s.seed);
    return f;
}

struct WireFrame {
    FrameHeader header;
    std::span<const std::byte> payload;
};

/// Splits raw bytes into frames; fails the test on a malformed stream.
std::vector<WireFrame> parse(const std::vector<std::byte>& wire) {
    std::vector<WireFrame> out;
    std::size_t off = 0;
    while (off < wire.size()) {
        BOOST_REQUIRE(wire.size() - off >= kHeaderSize);
        FrameHeader h;
        auto ec = decode_header(std::span<const std::byte, kHeaderSize>(wire.data() + off, kHeaderSize),
                                std::numeric_limits<std::uint64_t>::max(), h);
        BOOST_REQUIRE_MESSAGE(!ec, "bad header at offset " << off << ": " << ec.message());
        off += kHeaderSize;
        BOOST_REQUIRE(wire.size() - off >= h.length);
        out.push_back({h, {wire.data() + off, h.length}});
        off += h.length;
    }
    return out;
}

/// A FrameWriter on one end of a socketpair; a peer thread collects the
/// bytes until EOF.
struct Rig {
    engine::Ring ring;
    BufferPool pool;
    engine::Fd peer;
    std::unique_ptr<engine::SocketStream> stream;
    std::unique_ptr<FrameWriter> writer;
    std::vector<std::byte> received;
    PeerThread collector;

    explicit Rig(WriterOptions wo = {}, bool collect = true) : pool(&ring) {
        auto [a, b] = rxtest::socket_pair();
        peer = std::move(b);
        stream = std::make_unique<engine::SocketStream>(ring, std::move(a));
        writer = std::make_unique<FrameWriter>(*stream, wo);
        if (collect) {
            int pfd = peer.get();
            collector = PeerThread(pfd, stream->fd(), [this, pfd] { received = rxtest::read_to_eof(pfd); });
        }
    }
    ~Rig() {
        collector.abort_and_join();
        stream.reset();
        rxtest::drain(ring);
        writer.reset();
    }
    /// Closes the stream (the peer sees EOF) and waits for the collector.
    const std::vector<std::byte>& finish() {
        stream.reset();
        BOOST_TEST(collector.join(), "collector was still blocked and had to be aborted");
        rxtest::drain(ring);
        return received;
    }
};

}  // namespace

BOOST_AUTO_TEST_CASE(frames_arrive_in_order_with_correct_headers) {
    const std::vector<Spec> specs = {{0, 0, 1},           {1, kFlagControl, 2}, {4096, 0, 3},
                                     {65536, kFlagControl, 4}, {MiB + 3, 0, 5},  {100000, 0, 6}};
    Rig rig;
    std::vector<int> order;
    for (std::size_t i = 0; i < specs.size(); ++i) {
        Frame f = make_frame(rig.pool, specs[i]);
        bool queued = rig.writer->try_write(f, [&, i](Frame back, std::error_code ec) {
            BOOST_TEST(!ec);
            // The frame comes back with its payload and flags intact.
            BOOST_TEST(back.size() == specs[i].size);
            BOOST_TEST(int(back.flags()) == int(specs[i].flags));
            BOOST_TEST(rxtest::matches_pattern(back.payload(), specs[i].seed));
            order.push_back(static_cast<int>(i));
        });
        BOOST_REQUIRE(queued);
        BOOST_TEST(!f.lease());  // moved from on success
    }
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return order.size() == specs.size(); }));
    for (std::size_t i = 0; i < specs.size(); ++i) BOOST_TEST(order[i] == int(i));
    BOOST_TEST(rig.writer->bytes_in_flight() == 0u);
    BOOST_TEST(rig.writer->stats().frames == specs.size());
    std::uint64_t total = 0;
    for (auto& s : specs) total += s.size;
    BOOST_TEST(rig.writer->stats().payload_bytes == total);

    const auto& wire = rig.finish();
    BOOST_TEST(wire.size() == total + specs.size() * kHeaderSize);
    auto frames = parse(wire);
    BOOST_REQUIRE(frames.size() == specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        BOOST_TEST_CONTEXT("frame " << i) {
            BOOST_TEST(frames[i].header.length == specs[i].size);
            BOOST_TEST(int(frames[i].header.flags) == int(specs[i].flags));
            BOOST_TEST(frames[i].header.checksum == 0u);
            BOOST_TEST(rxtest::matches_pattern(frames[i].payload, specs[i].seed));
        }
    }
    BOOST_TEST(rig.pool.stats().leased_buffers == 0u);
}

BOOST_AUTO_TEST_CASE(back_pressure_refuses_then_accepts_after_completions) {
    WriterOptions wo;
    wo.max_bytes_in_flight = 100'000;
    Rig rig(wo);
    int done = 0;
    auto count = [&](Frame, std::error_code ec) {
        BOOST_TEST(!ec);
        ++done;
    };

    Frame a = make_frame(rig.pool, {60'000, 0, 1});
    Frame b = make_frame(rig.pool, {60'000, 0, 2});
    Frame c = make_frame(rig.pool, {10'000, 0, 3});
    Frame big = make_frame(rig.pool, {MiB, 0, 4});

    BOOST_REQUIRE(rig.writer->try_write(a, count));
    BOOST_TEST(rig.writer->bytes_in_flight() == 60'000 + kHeaderSize);
    // 60'016 + 60'016 > 100'000: refused, the frame stays with the caller.
    BOOST_TEST(!rig.writer->try_write(b, count));
    BOOST_TEST(b.size() == 60'000u);
    BOOST_TEST(rxtest::matches_pattern(b.payload(), 2));
    BOOST_TEST(rig.writer->stats().refused == 1u);
    BOOST_TEST(!rig.writer->try_write(big, count));
    BOOST_TEST(big.size() == MiB);
    // Within the bound: accepted even with something queued.
    BOOST_TEST(rig.writer->try_write(c, count));
    BOOST_TEST(rig.writer->bytes_in_flight() == 70'000 + 2 * kHeaderSize);

    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done == 2; }));
    BOOST_TEST(rig.writer->bytes_in_flight() == 0u);
    BOOST_REQUIRE(rig.writer->try_write(b, count));
    BOOST_TEST(!rig.writer->try_write(big, count));  // 60'016 + 1 MiB + 16 over the bound
    BOOST_TEST(rig.writer->stats().refused == 3u);
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done == 3; }));
    // Larger than the bound, but the queue is empty: accepted.
    BOOST_REQUIRE(rig.writer->try_write(big, count));
    BOOST_TEST(rig.writer->bytes_in_flight() == MiB + kHeaderSize);
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done == 4; }));

    auto frames = parse(rig.finish());
    BOOST_REQUIRE(frames.size() == 4u);
    const std::uint64_t seeds[] = {1, 3, 2, 4};  // the order they were accepted in
    for (std::size_t i = 0; i < 4; ++i) BOOST_TEST(rxtest::matches_pattern(frames[i].payload, seeds[i]));
}

BOOST_AUTO_TEST_CASE(checksum_option_sets_the_flag_and_crc) {
    WriterOptions wo;
    wo.checksum = true;
    Rig rig(wo);
    const std::vector<Spec> specs = {{0, 0, 1}, {1000, kFlagControl, 2}, {MiB, 0, 3}};
    int done = 0;
    for (const Spec& s : specs) {
        Frame f = make_frame(rig.pool, s);
        BOOST_REQUIRE(rig.writer->try_write(f, [&, s](Frame back, std::error_code ec) {
            BOOST_TEST(!ec);
            BOOST_TEST(int(back.flags()) == int(s.flags));  // the caller's flags come back
            ++done;
        }));
    }
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done == 3; }));
    auto frames = parse(rig.finish());
    BOOST_REQUIRE(frames.size() == specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        BOOST_TEST_CONTEXT("frame " << i) {
            BOOST_TEST(int(frames[i].header.flags) == int(specs[i].flags | kFlagChecksum));
            BOOST_TEST(frames[i].header.checksum == crc32c(frames[i].payload));
            BOOST_TEST(frames[i].header.checksum ==
                       crc32c(rxtest::pattern_vector(specs[i].size, specs[i].seed)));
        }
    }
}

BOOST_AUTO_TEST_CASE(without_checksum_option_a_stray_checksum_flag_is_cleared) {
    Rig rig;
    Frame f = make_frame(rig.pool, {50, kFlagChecksum | kFlagControl, 1});
    bool done = false;
    BOOST_REQUIRE(rig.writer->try_write(f, [&](Frame, std::error_code) { done = true; }));
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done; }));
    auto frames = parse(rig.finish());
    BOOST_REQUIRE(frames.size() == 1u);
    BOOST_TEST(int(frames[0].header.flags) == int(kFlagControl));
    BOOST_TEST(frames[0].header.checksum == 0u);
}

BOOST_AUTO_TEST_CASE(writer_to_reader_on_one_ring) {
    engine::Ring ring;
    BufferPool pool(&ring);
    auto [a, b] = rxtest::socket_pair();
    auto out = std::make_unique<engine::SocketStream>(ring, std::move(a));
    auto in = std::make_unique<engine::SocketStream>(ring, std::move(b));
    WriterOptions wo;
    wo.checksum = true;
    FrameWriter writer(*out, wo);
    FrameReader reader(*in, pool);

    const std::vector<Spec> specs = {{0, 0, 1}, {7, kFlagControl, 2}, {65536, 0, 3},
                                     {2 * MiB + 1, 0, 4}, {300, kFlagControl, 5}};
    int written = 0;
    for (const Spec& s : specs) {
        Frame f = make_frame(pool, s);
        BOOST_REQUIRE(writer.try_write(f, [&](Frame, std::error_code ec) {
            BOOST_TEST(!ec);
            ++written;
        }));
    }
    std::vector<Frame> got;
    std::error_code last;
    bool stop = false;
    std::function<void(Frame, std::error_code)> on = [&](Frame f, std::error_code ec) {
        if (ec) {
            last = ec;
            stop = true;
            return;
        }
        got.push_back(std::move(f));
        if (got.size() < specs.size()) reader.read(on);
        else stop = true;
    };
    reader.read(on);
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return stop && written == int(specs.size()); }));
    BOOST_TEST(!last);
    BOOST_REQUIRE(got.size() == specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        BOOST_TEST_CONTEXT("frame " << i) {
            BOOST_TEST(got[i].size() == specs[i].size);
            BOOST_TEST(got[i].is_control() == ((specs[i].flags & kFlagControl) != 0));
            BOOST_TEST((got[i].flags() & kFlagChecksum) != 0);  // verified on the way in
            BOOST_TEST(rxtest::matches_pattern(got[i].payload(), specs[i].seed));
        }
    }
    got.clear();
    out.reset();
    in.reset();
    BOOST_REQUIRE(rxtest::drain(ring));
}

BOOST_AUTO_TEST_CASE(send_failure_returns_the_frame_with_the_error) {
    Rig rig(WriterOptions{}, /*collect=*/false);
    rig.peer.reset();  // nobody will ever read
    Frame f = make_frame(rig.pool, {5000, kFlagControl, 8});
    bool done = false;
    std::error_code err;
    Frame back;
    BOOST_REQUIRE(rig.writer->try_write(f, [&](Frame fr, std::error_code ec) {
        back = std::move(fr);
        err = ec;
        done = true;
    }));
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done; }));
    BOOST_TEST((err == std::errc::broken_pipe));
    BOOST_TEST(back.size() == 5000u);
    BOOST_TEST(back.is_control());
    BOOST_TEST(rxtest::matches_pattern(back.payload(), 8));
    BOOST_TEST(rig.writer->bytes_in_flight() == 0u);
}
