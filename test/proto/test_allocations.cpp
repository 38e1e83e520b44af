// Heap allocations on the per-frame path, counted (count_allocations.hpp
// replaces operator new, so every C++ allocation the test's thread makes
// while counting is seen): a warmed-up ping-pong through FrameWriter ->
// Stream -> FrameReader (the path every frame takes, handlers capturing a
// shared_ptr like real connections) allocates nothing per frame, on both
// backends.
#define BOOST_TEST_MODULE proto_allocations
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>
#include <boost/test/data/test_case.hpp>

#include <functional>
#include <memory>
#include <string>

#include "count_allocations.hpp"
#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"
#include "rx_test.hpp"

using namespace ringxfer;
using rxtest::allocations_in;
using proto::Frame;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace pingpong {  // named: the data test case's template uses these types

/// One end of a ping-pong: reads frames with a FrameReader; the echo side
/// writes each back, the client side sends the next one. Handlers capture
/// shared_from_this(), as the CLI's connections do.
struct Side : std::enable_shared_from_this<Side> {
    std::unique_ptr<engine::Stream> stream;
    proto::FrameReader reader;
    proto::FrameWriter writer;
    bool echo = false;
    Frame pattern;  // client: each send is a shared view of it
    std::uint64_t frames = 0;
    std::uint64_t target = 0;
    std::error_code error;

    Side(std::unique_ptr<engine::Stream> s, engine::BufferPool& pool)
        : stream(std::move(s)), reader(*stream, pool), writer(*stream) {}

    void read_next() {
        reader.read([self = shared_from_this()](Frame f, std::error_code ec) {
            self->on_frame(std::move(f), ec);
        });
    }
    void send(Frame f) {
        bool ok = writer.try_write(f, [self = shared_from_this()](Frame, std::error_code ec) {
            if (ec) self->error = ec;
        });
        if (!ok) error = std::make_error_code(std::errc::no_buffer_space);
    }
    void send_next() { send(Frame(pattern.lease().share())); }
    void on_frame(Frame f, std::error_code ec) {
        if (ec) {
            error = ec;
            return;
        }
        ++frames;
        if (echo)
            send(std::move(f));
        else if (frames < target)
            send_next();
        read_next();
    }
};

struct PingPong {
    std::unique_ptr<engine::Driver> driver;
    std::unique_ptr<engine::BufferPool> pool;
    std::shared_ptr<Side> client, server;

    PingPong(const std::string& backend, bool tcp, std::size_t frame_bytes) {
        driver = backend == "epoll" ? engine::make_epoll_driver() : engine::make_uring_driver();
        pool = std::make_unique<engine::BufferPool>(driver->ring());
        std::pair<engine::Fd, engine::Fd> fds;
        if (tcp) {
            engine::Ring setup;
            fds = rxtest::tcp_pair(setup);
        } else {
            fds = rxtest::socket_pair();
        }
        client = std::make_shared<Side>(driver->make_stream(std::move(fds.first), {}), *pool);
        server = std::make_shared<Side>(driver->make_stream(std::move(fds.second), {}), *pool);
        server->echo = true;
        BOOST_REQUIRE(Frame::allocate(*pool, frame_bytes, client->pattern) == 0);
        rxtest::fill_pattern(client->pattern.mutable_payload(), 3);
        client->read_next();
        server->read_next();
    }

    ~PingPong() {
        // The pending reads' handlers hold their sides: closing completes
        // them (with an error) and so breaks the cycle.
        client->stream->close();
        server->stream->close();
        rxtest::drain(*driver);
    }

    /// `n` more round trips; false if they did not complete.
    bool round_trips(std::uint64_t n) {
        client->target = client->frames + n;
        client->send_next();
        return rxtest::drive(*driver, [&] {
            return client->frames >= client->target || client->error || server->error;
        }) && !client->error && !server->error;
    }
};

const char* const kBackends[] = {"uring", "epoll"};
const std::size_t kSizes[] = {64, 4096, 256 * 1024};

}  // namespace pingpong
using pingpong::kBackends;
using pingpong::kSizes;
using pingpong::PingPong;

BOOST_AUTO_TEST_SUITE(frame_path)

BOOST_DATA_TEST_CASE(warmed_up_ping_pong_allocates_nothing_per_frame,
                     boost::unit_test::data::make(kBackends) * boost::unit_test::data::make(kSizes) *
                         boost::unit_test::data::make({false, true}),
                     backend, size, tcp) {
    PingPong pp(backend, tcp, size);
    BOOST_REQUIRE(pp.round_trips(100));  // warm-up: pool regions, spare operations
    std::size_t n = 0;
    bool ok = false;
    n = allocations_in([&] { ok = pp.round_trips(2000); });
    BOOST_REQUIRE(ok);
    BOOST_TEST(pp.client->frames == 2100u);
    BOOST_TEST(pp.server->frames == 2100u);
    BOOST_TEST(n == 0u, backend << (tcp ? " tcp " : " unix ") << size << " B frames: " << n
                                << " allocations in 2000 round trips");
}

BOOST_AUTO_TEST_SUITE_END()
