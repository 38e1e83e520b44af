#define BOOST_TEST_MODULE proto_frame_writer
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <string>
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

    explicit Rig(WriterOptions wo = {}, bool collect = true, bool tcp = false,
                 engine::SocketStreamOptions so = {})
        : pool(&ring) {
        auto [a, b] = tcp ? rxtest::tcp_pair(ring) : rxtest::socket_pair();
        peer = std::move(b);
        stream = std::make_unique<engine::SocketStream>(ring, std::move(a), so);
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

// ---------------------------------------------------------------------------
// try_write_gather: one frame from several leases, never joined. Parts are
// pooled slabs, foreign memory (Lease::wrap, whose releases are counted) and
// zero-length parts; what arrives must be the concatenation, and the handler
// must run once, after the writer let go of every part.

namespace {

/// Counts the on_release runs of one wrapped part.
struct ReleaseProbe {
    std::atomic<int> calls{0};
    engine::Callback<void()> callback() {
        return [this] { calls.fetch_add(1); };
    }
};

enum class Kind { pooled, foreign, empty_lease };

struct PartSpec {
    Kind kind;
    std::size_t size;
    std::uint64_t seed;
};

/// The parts of one gathered frame and what its payload must be. Declared so
/// that the leases go before the memory and probes they point at.
struct Parts {
    std::vector<std::unique_ptr<std::vector<std::byte>>> foreign;
    std::vector<std::unique_ptr<ReleaseProbe>> probes;
    std::vector<engine::Lease> leases;
    std::vector<std::byte> expected;

    int wrapped() const { return static_cast<int>(probes.size()); }
    /// on_release runs so far, summed over the wrapped parts.
    int released() const {
        int n = 0;
        for (const auto& p : probes) n += p->calls.load();
        return n;
    }
    /// True when every wrapped part was released exactly once.
    bool each_released_once() const {
        for (const auto& p : probes)
            if (p->calls.load() != 1) return false;
        return true;
    }
};

Parts make_parts(BufferPool& pool, const std::vector<PartSpec>& specs) {
    Parts out;
    for (const PartSpec& s : specs) {
        engine::Lease l;
        switch (s.kind) {
            case Kind::pooled:
                l = rxtest::lease_or_fail(pool, s.size);
                rxtest::fill_pattern(l.span(), s.seed);
                break;
            case Kind::foreign: {
                auto mem = std::make_unique<std::vector<std::byte>>(
                    rxtest::pattern_vector(s.size, s.seed));
                auto probe = std::make_unique<ReleaseProbe>();
                l = engine::Lease::wrap(*mem, probe->callback());
                BOOST_REQUIRE(static_cast<bool>(l));  // even at zero length
                out.foreign.push_back(std::move(mem));
                out.probes.push_back(std::move(probe));
                break;
            }
            case Kind::empty_lease:
                BOOST_REQUIRE(s.size == 0u);
                break;
        }
        BOOST_REQUIRE(l.size() == s.size);
        out.expected.insert(out.expected.end(), l.span().begin(), l.span().end());
        out.leases.push_back(std::move(l));
    }
    return out;
}

/// Index of the first byte where `got` and `want` differ, or npos (also
/// when one is a prefix of the other: then the shorter length).
std::size_t first_difference(std::span<const std::byte> got, std::span<const std::byte> want) {
    std::size_t n = std::min(got.size(), want.size());
    for (std::size_t i = 0; i < n; ++i)
        if (got[i] != want[i]) return i;
    return got.size() == want.size() ? static_cast<std::size_t>(-1) : n;
}

/// What a gather handler saw when it ran.
struct GatherOutcome {
    int calls = 0;
    std::error_code ec;
    int released_at_handler = -1;           // wrapped parts released by then
    std::size_t pooled_at_handler = 99;     // part slabs still leased by then
    std::size_t in_flight_at_handler = 99;  // the writer's bytes_in_flight()
};

FrameWriter::GatherHandler record(GatherOutcome& o, const Parts& parts, const BufferPool& pool,
                                  const FrameWriter& writer) {
    return [&o, &parts, &pool, &writer](std::error_code ec) {
        ++o.calls;
        o.ec = ec;
        o.released_at_handler = parts.released();
        o.pooled_at_handler = pool.stats().leased_buffers;
        o.in_flight_at_handler = writer.bytes_in_flight();
    };
}

}  // namespace

BOOST_AUTO_TEST_CASE(gathered_frame_reads_back_as_the_concatenation_of_its_parts) {
    engine::Ring ring;
    BufferPool pool(&ring);        // the reader's
    BufferPool parts_pool(&ring);  // the writer's pooled parts (registered)
    auto [a, b] = rxtest::socket_pair();
    auto out = std::make_unique<engine::SocketStream>(ring, std::move(a));
    auto in = std::make_unique<engine::SocketStream>(ring, std::move(b));
    WriterOptions wo;
    wo.checksum = true;  // the reader verifies it over the whole payload
    FrameWriter writer(*out, wo);
    FrameReader reader(*in, pool);

    struct Layout {
        const char* name;
        std::uint8_t flags;
        std::vector<PartSpec> parts;
    };
    const std::vector<Layout> layouts = {
        {"pooled, zero-length foreign, foreign",
         0,
         {{Kind::pooled, 70000, 1}, {Kind::foreign, 0, 0}, {Kind::foreign, 3000, 2}}},
        {"zero-length foreign first, a part over the 1 MiB gather cap",
         kFlagControl,
         {{Kind::foreign, 0, 0}, {Kind::foreign, 2 * MiB + 1, 3}, {Kind::pooled, 5, 4}}},
        {"empty lease last",
         0,
         {{Kind::pooled, 100, 5}, {Kind::foreign, 200, 6}, {Kind::empty_lease, 0, 0}}},
        {"one byte each",
         kFlagControl,
         {{Kind::foreign, 1, 7}, {Kind::pooled, 1, 8}, {Kind::foreign, 1, 9}}},
    };
    std::uint64_t payload_total = 0;
    for (std::size_t k = 0; k < layouts.size(); ++k) {
        const Layout& lay = layouts[k];
        BOOST_TEST_CONTEXT(lay.name) {
            Parts parts = make_parts(parts_pool, lay.parts);
            GatherOutcome o;
            BOOST_REQUIRE(writer.try_write_gather(parts.leases, lay.flags,
                                                  record(o, parts, parts_pool, writer)));
            for (const engine::Lease& l : parts.leases) BOOST_TEST(!l);  // moved from
            BOOST_TEST(writer.bytes_in_flight() == kHeaderSize + parts.expected.size());

            Frame got;
            std::error_code rec;
            bool read = false;
            reader.read([&](Frame f, std::error_code ec) {
                got = std::move(f);
                rec = ec;
                read = true;
            });
            BOOST_REQUIRE(rxtest::drive(ring, [&] { return read && o.calls > 0; }));

            BOOST_TEST(!rec, rec.message());
            BOOST_TEST(got.size() == parts.expected.size());
            BOOST_TEST(first_difference(got.payload(), parts.expected) ==
                       static_cast<std::size_t>(-1));
            BOOST_TEST(got.is_control() == ((lay.flags & kFlagControl) != 0));
            BOOST_TEST((got.flags() & kFlagChecksum) != 0);  // verified on the way in

            BOOST_TEST(o.calls == 1);
            BOOST_TEST(!o.ec, o.ec.message());
            BOOST_TEST(o.released_at_handler == parts.wrapped());
            BOOST_TEST(o.pooled_at_handler == 0u);
            BOOST_TEST(o.in_flight_at_handler == 0u);
            BOOST_TEST(parts.each_released_once());
            payload_total += parts.expected.size();
            BOOST_TEST(writer.stats().frames == k + 1);  // one frame per gather, not per part
            BOOST_TEST(writer.stats().payload_bytes == payload_total);
            BOOST_TEST(reader.stats().frames == k + 1);
        }
    }
    BOOST_TEST(writer.stats().refused == 0u);
    out.reset();
    in.reset();
    BOOST_REQUIRE(rxtest::drain(ring));
}

BOOST_AUTO_TEST_CASE(gathered_frame_header_and_checksum_cover_every_part) {
    const std::vector<PartSpec> specs = {
        {Kind::foreign, 1000, 3}, {Kind::foreign, 0, 0}, {Kind::pooled, 5000, 4}};
    for (bool checksum : {true, false}) {
        BOOST_TEST_CONTEXT("checksum option " << checksum) {
            WriterOptions wo;
            wo.checksum = checksum;
            Rig rig(wo);
            Parts parts = make_parts(rig.pool, specs);
            GatherOutcome o;
            // A stray checksum flag from the caller is the writer's to set or clear.
            BOOST_REQUIRE(rig.writer->try_write_gather(parts.leases, kFlagControl | kFlagChecksum,
                                                       record(o, parts, rig.pool, *rig.writer)));
            BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return o.calls > 0; }));
            BOOST_TEST(!o.ec, o.ec.message());

            const auto& wire = rig.finish();
            BOOST_TEST(wire.size() == kHeaderSize + 6000);
            auto frames = parse(wire);
            BOOST_REQUIRE(frames.size() == 1u);
            const FrameHeader& h = frames[0].header;
            BOOST_TEST(h.length == 6000u);
            BOOST_TEST(first_difference(frames[0].payload, parts.expected) ==
                       static_cast<std::size_t>(-1));
            if (checksum) {
                BOOST_TEST(int(h.flags) == int(kFlagControl | kFlagChecksum));
                // One CRC over the concatenation, computed here in one pass.
                BOOST_TEST(h.checksum == crc32c(parts.expected));
                BOOST_TEST(h.checksum != crc32c(std::span(parts.expected).first(1000)));
            } else {
                BOOST_TEST(int(h.flags) == int(kFlagControl));
                BOOST_TEST(h.checksum == 0u);
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(gather_of_zero_parts_is_an_empty_frame_between_its_neighbours) {
    WriterOptions wo;
    wo.checksum = true;
    Rig rig(wo);
    int done = 0;
    Frame before = make_frame(rig.pool, {300, 0, 1});
    Frame after = make_frame(rig.pool, {400, 0, 2});
    BOOST_REQUIRE(rig.writer->try_write(before, [&](Frame, std::error_code ec) {
        BOOST_TEST(!ec);
        ++done;
    }));
    GatherOutcome o;
    Parts none;
    BOOST_REQUIRE(rig.writer->try_write_gather(std::span<engine::Lease>{}, kFlagControl,
                                               record(o, none, rig.pool, *rig.writer)));
    BOOST_TEST(rig.writer->stats().frames == 2u);
    BOOST_REQUIRE(rig.writer->try_write(after, [&](Frame, std::error_code ec) {
        BOOST_TEST(!ec);
        ++done;
    }));
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return done == 2 && o.calls > 0; }));
    BOOST_TEST(o.calls == 1);
    BOOST_TEST(!o.ec, o.ec.message());
    BOOST_TEST(rig.writer->bytes_in_flight() == 0u);
    BOOST_TEST(rig.writer->stats().frames == 3u);
    BOOST_TEST(rig.writer->stats().payload_bytes == 700u);

    const auto& wire = rig.finish();
    BOOST_TEST(wire.size() == 3 * kHeaderSize + 700);
    auto frames = parse(wire);
    BOOST_REQUIRE(frames.size() == 3u);
    BOOST_TEST(rxtest::matches_pattern(frames[0].payload, 1));
    BOOST_TEST(frames[1].header.length == 0u);
    BOOST_TEST(int(frames[1].header.flags) == int(kFlagControl | kFlagChecksum));
    BOOST_TEST(frames[1].header.checksum == crc32c({}));
    BOOST_TEST(frames[2].payload.size() == 400u);
    BOOST_TEST(rxtest::matches_pattern(frames[2].payload, 2));
    BOOST_TEST(o.calls == 1);  // not again on close
}

// The handler is the caller's signal that the memory is its own again: by
// then every wrapped part was released and every pooled part returned, on
// the copying path (socketpair) and with zero-copy sends (TCP), where parts
// finish in the order their notifications arrive.
BOOST_AUTO_TEST_CASE(gather_handler_runs_once_after_every_part_is_released) {
    struct Path {
        const char* name;
        bool tcp;
        std::size_t zerocopy_threshold;
    };
    const Path paths[] = {{"unix socketpair", false, 0},
                          {"tcp loopback, SEND_ZC", true, 64 * 1024}};
    const std::vector<PartSpec> specs = {{Kind::foreign, MiB, 11},
                                         {Kind::pooled, 300 * 1024, 12},
                                         {Kind::foreign, 0, 0},
                                         {Kind::foreign, 10, 13},
                                         {Kind::pooled, 3 * MiB, 14}};
    for (const Path& path : paths) {
        BOOST_TEST_CONTEXT(path.name) {
            engine::SocketStreamOptions so;
            so.zerocopy_threshold = path.zerocopy_threshold;
            so.zerocopy_fallback_after = 0;  // stay on SEND_ZC
            Rig rig(WriterOptions{}, true, path.tcp, so);
            if (path.zerocopy_threshold && !rig.ring.features().op_send_zc) {
                BOOST_TEST_MESSAGE("kernel without IORING_OP_SEND_ZC: " << path.name << " skipped");
                continue;
            }
            Parts parts = make_parts(rig.pool, specs);
            const std::size_t payload = parts.expected.size();
            GatherOutcome o;
            BOOST_REQUIRE(rig.writer->try_write_gather(parts.leases, 0,
                                                       record(o, parts, rig.pool, *rig.writer)));
            BOOST_TEST(rig.writer->bytes_in_flight() == kHeaderSize + payload);
            BOOST_TEST(parts.released() == 0);  // the writer owns them now
            BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return o.calls > 0; }));

            BOOST_TEST(o.calls == 1);
            BOOST_TEST(!o.ec, o.ec.message());
            BOOST_TEST(o.released_at_handler == parts.wrapped());
            BOOST_TEST(o.pooled_at_handler == 0u);
            BOOST_TEST(o.in_flight_at_handler == 0u);
            BOOST_TEST(rig.writer->bytes_in_flight() == 0u);
            BOOST_TEST(rig.writer->stats().frames == 1u);
            BOOST_TEST(rig.writer->stats().payload_bytes == payload);
            if (path.zerocopy_threshold) BOOST_TEST(rig.stream->counters().zc_sends > 0u);

            const auto& wire = rig.finish();
            BOOST_TEST(o.calls == 1);  // not again when the stream goes
            BOOST_TEST(parts.each_released_once());
            auto frames = parse(wire);
            BOOST_REQUIRE(frames.size() == 1u);
            BOOST_TEST(frames[0].header.length == payload);
            BOOST_TEST(first_difference(frames[0].payload, parts.expected) ==
                       static_cast<std::size_t>(-1));
        }
    }
}

// The parts of a small gathered frame are queued together (SendBuffers::
// more) and leave in one SENDMSG: the header and first part do not go out
// alone ahead of the rest.
BOOST_AUTO_TEST_CASE(small_gathered_frame_leaves_in_one_sendmsg) {
    Rig rig;
    const std::vector<PartSpec> specs = {{Kind::foreign, 100, 21},
                                         {Kind::pooled, 2000, 22},
                                         {Kind::foreign, 0, 0},
                                         {Kind::foreign, 7, 23}};
    Parts parts = make_parts(rig.pool, specs);
    GatherOutcome o;
    BOOST_REQUIRE(rig.writer->try_write_gather(parts.leases, 0,
                                               record(o, parts, rig.pool, *rig.writer)));
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return o.calls > 0; }));
    BOOST_TEST(!o.ec, o.ec.message());
    const engine::StreamCounters& c = rig.stream->counters();
    BOOST_TEST(c.send_ops == 1u);
    BOOST_TEST(c.gathered_sends == specs.size() - 1);
    auto frames = parse(rig.finish());
    BOOST_REQUIRE(frames.size() == 1u);
    BOOST_TEST(first_difference(frames[0].payload, parts.expected) ==
               static_cast<std::size_t>(-1));
}

BOOST_AUTO_TEST_CASE(gather_send_errors_reach_the_handler_once) {
    const std::vector<PartSpec> specs = {
        {Kind::foreign, 5000, 21}, {Kind::foreign, 0, 0}, {Kind::pooled, 3000, 22}};
    enum class Failure { peer_closed, stream_closed_while_queued, stream_closed_before };
    for (Failure f : {Failure::peer_closed, Failure::stream_closed_while_queued,
                      Failure::stream_closed_before}) {
        BOOST_TEST_CONTEXT("failure " << static_cast<int>(f)) {
            Rig rig(WriterOptions{}, /*collect=*/false);
            if (f == Failure::peer_closed) rig.peer.reset();  // nobody will ever read
            if (f == Failure::stream_closed_before) rig.stream->close();
            Parts parts = make_parts(rig.pool, specs);
            GatherOutcome o;
            BOOST_REQUIRE(rig.writer->try_write_gather(parts.leases, 0,
                                                       record(o, parts, rig.pool, *rig.writer)));
            if (f == Failure::stream_closed_while_queued) rig.stream->close();
            BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return o.calls > 0; }));
            BOOST_REQUIRE(rxtest::drain(rig.ring));

            BOOST_TEST(o.calls == 1);
            BOOST_TEST(static_cast<bool>(o.ec));
            BOOST_TEST_MESSAGE("error: " << o.ec.message());
            switch (f) {
                case Failure::peer_closed:
                    BOOST_TEST((o.ec == std::errc::broken_pipe));
                    break;
                case Failure::stream_closed_while_queued:
                    // The first part was already in the ring when close() came.
                    BOOST_TEST(
                        (o.ec == std::errc::broken_pipe || o.ec == std::errc::operation_canceled));
                    break;
                case Failure::stream_closed_before:
                    BOOST_TEST((o.ec == std::errc::operation_canceled));
                    break;
            }
            BOOST_TEST(o.released_at_handler == parts.wrapped());
            BOOST_TEST(o.pooled_at_handler == 0u);
            BOOST_TEST(o.in_flight_at_handler == 0u);
            BOOST_TEST(rig.writer->bytes_in_flight() == 0u);
            BOOST_TEST(rig.writer->stats().frames == 1u);
            rig.stream.reset();
            BOOST_REQUIRE(rxtest::drain(rig.ring));
            BOOST_TEST(o.calls == 1);
            BOOST_TEST(parts.each_released_once());
        }
    }
}

BOOST_AUTO_TEST_CASE(gather_back_pressure_refuses_and_leaves_the_parts_with_the_caller) {
    WriterOptions wo;
    wo.max_bytes_in_flight = 10'000;
    Rig rig(wo);
    Parts first = make_parts(rig.pool, {{Kind::foreign, 6000, 31}, {Kind::pooled, 1000, 32}});
    Parts second = make_parts(rig.pool, {{Kind::foreign, 3000, 33}, {Kind::foreign, 0, 0}});
    GatherOutcome o1, o2;
    BOOST_REQUIRE(
        rig.writer->try_write_gather(first.leases, 0, record(o1, first, rig.pool, *rig.writer)));
    // 7'016 + 3'016 > 10'000: refused, nothing moved, nothing released.
    BOOST_TEST(
        !rig.writer->try_write_gather(second.leases, 0, record(o2, second, rig.pool, *rig.writer)));
    BOOST_TEST(rig.writer->stats().refused == 1u);
    BOOST_TEST(rig.writer->stats().frames == 1u);
    BOOST_TEST(rig.writer->bytes_in_flight() == 7000u + kHeaderSize);
    BOOST_TEST(second.released() == 0);
    BOOST_REQUIRE(second.leases.size() == 2u);
    BOOST_TEST(second.leases[0].data() == second.foreign[0]->data());
    BOOST_TEST(second.leases[0].size() == 3000u);
    BOOST_TEST(static_cast<bool>(second.leases[1]));  // the zero-length part too

    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return o1.calls > 0; }));
    BOOST_TEST(o2.calls == 0);  // a refused frame's handler never runs
    BOOST_REQUIRE(
        rig.writer->try_write_gather(second.leases, 0, record(o2, second, rig.pool, *rig.writer)));
    BOOST_REQUIRE(rxtest::drive(rig.ring, [&] { return o2.calls > 0; }));
    BOOST_TEST(o1.calls == 1);
    BOOST_TEST(o2.calls == 1);
    BOOST_TEST(rig.writer->bytes_in_flight() == 0u);

    auto frames = parse(rig.finish());
    BOOST_REQUIRE(frames.size() == 2u);
    BOOST_TEST(first_difference(frames[0].payload, first.expected) == static_cast<std::size_t>(-1));
    BOOST_TEST(first_difference(frames[1].payload, second.expected) ==
               static_cast<std::size_t>(-1));
}

// A stream destroyed with the frame still queued drops the handler unrun
// (as it drops its own handlers) but still gives every part back once.
BOOST_AUTO_TEST_CASE(gather_parts_are_released_when_the_stream_goes_first) {
    Rig rig(WriterOptions{}, /*collect=*/false);  // the peer never reads: the send cannot finish
    Parts parts = make_parts(
        rig.pool, {{Kind::foreign, 4 * MiB, 41}, {Kind::foreign, 0, 0}, {Kind::pooled, MiB, 42}});
    GatherOutcome o;
    BOOST_REQUIRE(
        rig.writer->try_write_gather(parts.leases, 0, record(o, parts, rig.pool, *rig.writer)));
    rig.ring.run_once(0, std::chrono::milliseconds(0));  // the first part reaches the kernel
    rig.stream.reset();
    BOOST_REQUIRE(rxtest::drain(rig.ring));
    BOOST_TEST(o.calls == 0);
    BOOST_TEST(parts.each_released_once());
    BOOST_TEST(rig.pool.stats().leased_buffers == 0u);
}
