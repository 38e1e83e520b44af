// Heap allocations on the per-frame path, counted: this module replaces the
// global operator new, so every C++ allocation made by the test's thread
// while counting is on is seen.
//
// - engine::Callback keeps handlers that capture a shared_ptr inline, runs
//   and destroys its target exactly once, and falls back to the heap only
//   for targets larger than its inline size.
// - A warmed-up ping-pong through FrameWriter -> Stream -> FrameReader (the
//   path every frame takes, handlers capturing a shared_ptr like real
//   connections) allocates nothing per frame, on both backends.
#define BOOST_TEST_MODULE proto_allocations
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>
#include <boost/test/data/test_case.hpp>

#include <cstdlib>
#include <functional>
#include <memory>
#include <new>
#include <string>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/callback.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"
#include "rx_test.hpp"

namespace {
thread_local bool t_counting = false;
thread_local std::size_t t_allocations = 0;

void* counted_alloc(std::size_t n) {
    if (t_counting) ++t_allocations;
    if (void* p = std::malloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    if (t_counting) ++t_allocations;
    return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
    if (t_counting) ++t_allocations;
    return std::malloc(n ? n : 1);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace ringxfer;
using engine::Callback;
using proto::Frame;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace {

/// Counts the operator new calls `f` makes on this thread.
template <class F>
std::size_t allocations_in(F&& f) {
    t_allocations = 0;
    t_counting = true;
    f();
    t_counting = false;
    return t_allocations;
}

/// Counts its live copies, to check a Callback destroys its target once.
struct Tracked {
    int* live;
    explicit Tracked(int* l) : live(l) { ++*live; }
    Tracked(Tracked&& o) noexcept : live(o.live) { ++*live; }
    Tracked(const Tracked& o) : live(o.live) { ++*live; }
    ~Tracked() { --*live; }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(callback)

BOOST_AUTO_TEST_CASE(shared_ptr_capture_is_stored_inline) {
    auto owner = std::make_shared<int>(41);
    Callback<int(int)> cb;
    std::size_t n = allocations_in([&] {
        cb = [owner](int x) { return *owner + x; };
        Callback<int(int)> moved = std::move(cb);
        cb = std::move(moved);
    });
    BOOST_TEST(n == 0u);
    BOOST_TEST(static_cast<bool>(cb));
    BOOST_TEST(cb(1) == 42);
    BOOST_TEST(owner.use_count() == 2);  // one capture, not leaked by the moves
    cb = nullptr;
    BOOST_TEST(owner.use_count() == 1);
    // std::function allocates for the same capture (why Callback exists).
    BOOST_TEST(allocations_in([&] { std::function<int(int)> f = [owner](int x) { return x; }; }) ==
               1u);
}

BOOST_AUTO_TEST_CASE(large_target_goes_to_the_heap_once) {
    struct Big {
        char pad[200];
        int v;
    };
    Big big{};
    big.v = 7;
    Callback<int()> cb;
    std::size_t n = allocations_in([&] {
        cb = [big] { return big.v; };
        Callback<int()> moved = std::move(cb);  // moves the pointer, no new allocation
        cb = std::move(moved);
    });
    BOOST_TEST(n == 1u);
    BOOST_TEST(cb() == 7);
}

BOOST_AUTO_TEST_CASE(target_is_destroyed_exactly_once) {
    int live = 0;
    {
        Callback<void()> a = [t = Tracked(&live)] {};
        BOOST_TEST(live == 1);
        Callback<void()> b = std::move(a);
        BOOST_TEST(live == 1);
        BOOST_TEST(!a);
        a = std::move(b);
        BOOST_TEST(live == 1);
        a.reset();
        BOOST_TEST(live == 0);
        Callback<void()> c = [t = Tracked(&live)] {};
        c = [t = Tracked(&live)] {};  // assignment destroys the old target
        BOOST_TEST(live == 1);
    }
    BOOST_TEST(live == 0);
}

BOOST_AUTO_TEST_CASE(move_only_captures_and_arguments) {
    auto p = std::make_unique<int>(5);
    Callback<int(std::unique_ptr<int>)> cb = [p = std::move(p)](std::unique_ptr<int> q) mutable {
        return *p + *q;
    };
    BOOST_TEST(cb(std::make_unique<int>(6)) == 11);
}

BOOST_AUTO_TEST_CASE(empty_sources_make_empty_callbacks) {
    std::function<void()> none;
    Callback<void()> a = none;
    BOOST_TEST(!a);
    BOOST_TEST((a == nullptr));
    void (*fp)() = nullptr;
    Callback<void()> b = fp;
    BOOST_TEST(!b);
    Callback<void()> c = nullptr;
    BOOST_TEST(!c);
    int calls = 0;
    std::function<void()> some = [&] { ++calls; };
    Callback<void()> d = some;  // a std::function is a target like any other
    d();
    BOOST_TEST(calls == 1);
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------

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
