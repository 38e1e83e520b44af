// The Driver contract, checked on both backends (io_uring and epoll): the
// same Stream semantics whichever event loop is underneath.
#define BOOST_TEST_MODULE engine_driver
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"
#include "rx_test.hpp"

using namespace ringxfer;
using namespace ringxfer::engine;
using rxtest::PeerThread;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace {

constexpr Backend kBackends[] = {Backend::uring, Backend::epoll};

const char* name(Backend b) { return b == Backend::epoll ? "epoll" : "io_uring"; }

/// A driver plus a pool suited to it (registered only where there is a ring).
struct Loop {
    std::unique_ptr<Driver> driver;
    std::unique_ptr<BufferPool> pool;
    explicit Loop(Backend b) : driver(make_driver(b)), pool(std::make_unique<BufferPool>(driver->ring())) {}
    ~Loop() {
        rxtest::drain(*driver);
        pool.reset();
    }
    Driver& d() { return *driver; }
    Lease lease(std::size_t n) {
        Lease l;
        BOOST_REQUIRE(pool->lease(n, l) == 0);
        return l;
    }
    SendBuffers make_send(std::string_view prefix, std::size_t body_len, std::uint64_t seed) {
        SendBuffers b;
        std::memcpy(b.prefix.data(), prefix.data(), prefix.size());
        b.prefix_len = prefix.size();
        if (body_len) {
            b.body = lease(body_len);
            rxtest::fill_pattern({b.body.data(), body_len}, seed);
            b.body_len = body_len;
        }
        return b;
    }
};

using rxtest::RecvResult;

std::pair<Fd, Fd> tcp_pair(Driver& d) {
    Fd listener = listen_on(Endpoint::parse("127.0.0.1:0"), 4);
    Endpoint ep = local_endpoint(listener.get(), Endpoint::Kind::tcp);
    Fd a, c;
    int aerr = 1, cerr = 1;
    d.async_accept(listener.get(), [&](Fd f, int e) {
        a = std::move(f);
        aerr = e;
    });
    d.async_connect(ep, [&](Fd f, int e) {
        c = std::move(f);
        cerr = e;
    });
    BOOST_REQUIRE(rxtest::drive(d, [&] { return aerr != 1 && cerr != 1; }));
    BOOST_REQUIRE(aerr == 0);
    BOOST_REQUIRE(cerr == 0);
    return {std::move(c), std::move(a)};
}

}  // namespace

BOOST_AUTO_TEST_SUITE(selection)

BOOST_AUTO_TEST_CASE(parse_backend_names) {
    BOOST_TEST((parse_backend("auto") == Backend::automatic));
    BOOST_TEST((parse_backend("uring") == Backend::uring));
    BOOST_TEST((parse_backend("io_uring") == Backend::uring));
    BOOST_TEST((parse_backend("epoll") == Backend::epoll));
    try {
        parse_backend("kqueue");
        BOOST_ERROR("accepted an unknown backend");
    } catch (const Error& e) {
        BOOST_TEST(e.code() == EINVAL);
        BOOST_TEST(std::string(e.what()).find("kqueue") != std::string::npos);
    }
}

BOOST_AUTO_TEST_CASE(each_backend_says_what_it_is) {
    auto u = make_driver(Backend::uring);
    BOOST_TEST(u->ring() != nullptr);
    BOOST_TEST(std::string(u->backend_name()) == "io_uring");
    BOOST_TEST(u->describe().find("io_uring") != std::string::npos);
    auto e = make_driver(Backend::epoll);
    BOOST_TEST(e->ring() == nullptr);
    BOOST_TEST(std::string(e->backend_name()) == "epoll");
    BOOST_TEST(e->describe().find("epoll") != std::string::npos);
    BOOST_TEST(e->in_flight() == 0u);
}

BOOST_AUTO_TEST_CASE(automatic_picks_io_uring_when_it_works) {
    std::vector<std::string> warnings;
    auto d = make_driver(Backend::automatic, {}, [&](std::string_view w) { warnings.emplace_back(w); });
    BOOST_TEST(std::string(d->backend_name()) == "io_uring");
    BOOST_TEST(warnings.empty());
}

BOOST_AUTO_TEST_CASE(run_until_is_bounded) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            auto d = make_driver(b);
            BOOST_TEST(run_until(*d, [] { return true; }));
            // Nothing will ever happen: returns false once the timeout passed.
            BOOST_TEST(!run_until(*d, [] { return false; }, std::chrono::milliseconds(20)));
        }
    }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(stream_contract)

BOOST_AUTO_TEST_CASE(recv_waits_for_min_while_the_peer_writes_in_pieces) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [local, peer] = rxtest::socket_pair();
            auto s = loop.d().make_stream(std::move(local), {});
            RecvResult res;
            s->recv(loop.lease(500), 7, 100, 100, res.handler());
            BOOST_TEST(!res.done);  // handlers only run from run_once
            auto data = rxtest::pattern_vector(100, 1);
            for (std::size_t i = 0; i < 10; ++i) {
                loop.d().run_once(0, std::chrono::nanoseconds(0));
                BOOST_TEST_REQUIRE(!res.done);
                BOOST_REQUIRE(rxtest::write_all(peer.get(), {data.data() + 10 * i, 10}));
            }
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return res.done; }));
            BOOST_TEST(res.r.ok());
            BOOST_TEST(res.r.bytes == 100u);
            BOOST_TEST(rxtest::matches_pattern({res.lease.data() + 7, 100}, 1));
            BOOST_TEST(s->counters().bytes_received == 100u);
            BOOST_TEST(loop.d().in_flight() == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(recv_reports_eof_with_the_bytes_that_came) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [local, peer] = rxtest::socket_pair();
            auto s = loop.d().make_stream(std::move(local), {});
            BOOST_REQUIRE(::write(peer.get(), "xyz", 3) == 3);
            ::shutdown(peer.get(), SHUT_WR);
            RecvResult res;
            s->recv(loop.lease(64), 0, 10, 10, res.handler());
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return res.done; }));
            BOOST_TEST(res.r.eof);
            BOOST_TEST(res.r.err == 0);
            BOOST_TEST(res.r.bytes == 3u);
            BOOST_TEST(std::memcmp(res.lease.data(), "xyz", 3) == 0);
        }
    }
}

namespace {

/// A stream whose peer reads everything until EOF: sends are queued with
/// the bytes they should put on the wire, then check() says whether the
/// handlers ran in send order and the peer got exactly those bytes.
struct OrderedSends {
    Loop& loop;
    Fd peer;
    std::unique_ptr<Stream> s;
    std::vector<std::byte> got, expected;
    std::vector<int> order;
    PeerThread reader;

    OrderedSends(Loop& l, std::pair<Fd, Fd> fds)
        : loop(l),
          peer(std::move(fds.second)),
          s(l.d().make_stream(std::move(fds.first), {})),
          reader(peer.get(), -1, [this] { got = rxtest::read_to_eof(peer.get()); }) {}

    /// Queues send `i`; `then` runs after its handler recorded it.
    void send(int i, const std::string& prefix, std::size_t body, std::function<void()> then = {}) {
        auto pb = rxtest::as_bytes(prefix);
        expected.insert(expected.end(), pb.begin(), pb.end());
        auto bb = rxtest::pattern_vector(body, 70 + i);
        expected.insert(expected.end(), bb.begin(), bb.end());
        s->send(loop.make_send(prefix, body, 70 + i),
                [this, i, total = prefix.size() + body, then = std::move(then)](SendBuffers,
                                                                               IoResult r) {
                    order.push_back(r.ok() && r.bytes == total ? i : -1 - i);
                    if (then) then();
                });
    }

    void check(int sends) {
        BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return order.size() == std::size_t(sends); }));
        for (int i = 0; i < sends; ++i) BOOST_TEST_REQUIRE(order[i] == i);
        s.reset();
        BOOST_TEST(reader.join(), "peer thread was still blocked and had to be aborted");
        BOOST_REQUIRE(got.size() == expected.size());
        BOOST_TEST((got == expected));
        BOOST_TEST(loop.pool->stats().leased_buffers == 0u);
    }
};

}  // namespace

BOOST_AUTO_TEST_CASE(sends_leave_in_order_and_handlers_run_in_order) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            OrderedSends t(loop, rxtest::socket_pair());
            for (int i = 0; i < 120; ++i) {
                bool empty = i % 5 == 4;
                t.send(i, empty ? std::string() : "<" + std::to_string(i) + ">",
                       empty ? 0 : static_cast<std::size_t>(i) * 1500);
            }
            t.check(120);
        }
    }
}

// Each completed send queues two more: the queue grows while its head moves
// (the epoll backend's send queue is a ring buffer that must keep the order
// when it grows around its end; the ring's recycles finished operations).
BOOST_AUTO_TEST_CASE(sends_queued_from_handlers_keep_their_order) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            OrderedSends t(loop, rxtest::socket_pair());
            constexpr int kSends = 300;
            int next = 0;
            std::function<void()> queue_one = [&] {
                int i = next++;
                t.send(i, "<" + std::to_string(i) + ">", static_cast<std::size_t>(i % 7) * 900, [&] {
                    for (int k = 0; k < 2 && next < kSends; ++k) queue_one();
                });
            };
            for (int k = 0; k < 3; ++k) queue_one();
            t.check(kSends);
        }
    }
}

BOOST_AUTO_TEST_CASE(a_handler_may_queue_the_next_operation) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [local, peer] = rxtest::socket_pair();
            auto s = loop.d().make_stream(std::move(local), {});
            // Ping-pong of 50 one-byte messages, each next op queued from the
            // previous handler.
            int received = 0, sent = 0;
            std::function<void(Lease, IoResult)> on_recv = [&](Lease l, IoResult r) {
                if (!r.ok()) return;
                ++received;
                if (received < 50) s->recv(std::move(l), 0, 1, 1, on_recv);
            };
            std::function<void(SendBuffers, IoResult)> on_send = [&](SendBuffers, IoResult r) {
                if (!r.ok()) return;
                ++sent;
                if (sent < 50) s->send(loop.make_send("s", 0, 0), on_send);
            };
            s->recv(loop.lease(16), 0, 1, 1, on_recv);
            s->send(loop.make_send("s", 0, 0), on_send);
            auto ones = std::vector<std::byte>(50, std::byte{'r'});
            BOOST_REQUIRE(rxtest::write_all(peer.get(), ones));
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return received == 50 && sent == 50; }));
            s.reset();
            auto got = rxtest::read_to_eof(peer.get());
            BOOST_TEST(got.size() == 50u);  // each send exactly once
        }
    }
}

BOOST_AUTO_TEST_CASE(destroying_a_stream_drops_pending_handlers_and_frees_buffers) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [local, peer] = rxtest::socket_pair();  // nobody reads or writes
            int called = 0;
            {
                auto s = loop.d().make_stream(std::move(local), {});
                s->recv(loop.lease(4096), 0, 10, 10, [&](Lease, IoResult) { ++called; });
                for (int i = 0; i < 3; ++i)
                    s->send(loop.make_send("h", 4 << 20, i), [&](SendBuffers, IoResult) { ++called; });
                loop.d().run_once(0, std::chrono::nanoseconds(0));
                BOOST_TEST(loop.d().in_flight() > 0u);
            }
            BOOST_REQUIRE(rxtest::drain(loop.d()));
            BOOST_TEST(called == 0);
            BOOST_TEST(loop.pool->stats().leased_buffers == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(close_fails_pending_and_later_operations) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [local, peer] = rxtest::socket_pair();
            auto s = loop.d().make_stream(std::move(local), {});
            RecvResult pending;
            s->recv(loop.lease(128), 0, 10, 10, pending.handler());
            loop.d().run_once(0, std::chrono::nanoseconds(0));
            s->close();
            s->close();  // idempotent
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return pending.done; }));
            BOOST_TEST(!pending.r.ok());
            BOOST_TEST(static_cast<bool>(pending.lease));

            RecvResult late;
            s->recv(std::move(pending.lease), 0, 1, 128, late.handler());
            bool sent = false;
            IoResult sr;
            s->send(loop.make_send("x", 10, 1), [&](SendBuffers, IoResult r) {
                sr = r;
                sent = true;
            });
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return late.done && sent; }));
            BOOST_TEST(late.r.err == -ECANCELED);
            BOOST_TEST(sr.err == -ECANCELED);
            BOOST_REQUIRE(rxtest::drain(loop.d()));
        }
    }
}

BOOST_AUTO_TEST_CASE(tcp_accept_connect_and_both_directions) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [c, a] = tcp_pair(loop.d());
            auto sc = loop.d().make_stream(std::move(c), {});
            auto sa = loop.d().make_stream(std::move(a), {});
            BOOST_TEST(sa->peer().rfind("127.0.0.1:", 0) == 0u);
            constexpr std::size_t kN = 3 << 20;  // larger than the socket buffers
            RecvResult at_a, at_c;
            sa->recv(loop.lease(kN), 0, kN, kN, at_a.handler());
            sc->recv(loop.lease(kN), 0, kN, kN, at_c.handler());
            int sends = 0;
            sc->send(loop.make_send("", kN, 1), [&](SendBuffers, IoResult r) { sends += r.ok(); });
            sa->send(loop.make_send("", kN, 2), [&](SendBuffers, IoResult r) { sends += r.ok(); });
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return at_a.done && at_c.done && sends == 2; }));
            BOOST_TEST(rxtest::matches_pattern({at_a.lease.data(), kN}, 1));
            BOOST_TEST(rxtest::matches_pattern({at_c.lease.data(), kN}, 2));
        }
    }
}

BOOST_AUTO_TEST_CASE(connect_refused_and_accept_cancelled) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            Fd reserve(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
            sockaddr_in sin{};
            sin.sin_family = AF_INET;
            sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            BOOST_REQUIRE(::bind(reserve.get(), reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
            int cerr = 1;
            loop.d().async_connect(local_endpoint(reserve.get(), Endpoint::Kind::tcp),
                                   [&](Fd f, int e) {
                                       cerr = e;
                                       BOOST_TEST(!f);
                                   });
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return cerr != 1; }));
            BOOST_TEST(cerr == -ECONNREFUSED);

            Fd listener = listen_on(Endpoint::parse("127.0.0.1:0"));
            int aerr = 1;
            void* token = loop.d().async_accept(listener.get(), [&](Fd, int e) { aerr = e; });
            loop.d().run_once(0, std::chrono::nanoseconds(0));
            BOOST_TEST(aerr == 1);
            loop.d().cancel(token);
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return aerr != 1; }));
            BOOST_TEST(aerr == -ECANCELED);
            BOOST_REQUIRE(rxtest::drain(loop.d()));
        }
    }
}

BOOST_AUTO_TEST_CASE(completion_fd_signals_ready_work) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            int cfd = loop.d().completion_fd();
            BOOST_REQUIRE(cfd >= 0);
            auto [local, peer] = rxtest::socket_pair();
            auto s = loop.d().make_stream(std::move(local), {});
            RecvResult res;
            s->recv(loop.lease(64), 0, 4, 4, res.handler());
            loop.d().run_once(0, std::chrono::nanoseconds(0));
            BOOST_TEST(!res.done);
            BOOST_REQUIRE(::write(peer.get(), "ping", 4) == 4);
            pollfd p{cfd, POLLIN, 0};
            BOOST_REQUIRE(::poll(&p, 1, 10'000) == 1);  // bound only for a failure
            // A foreign loop: after readability, non-blocking run_once calls
            // complete the work.
            for (int i = 0; i < 10 && !res.done; ++i) loop.d().run_once(0, std::chrono::nanoseconds(0));
            BOOST_TEST(res.done);
            BOOST_TEST(res.r.bytes == 4u);
        }
    }
}

// The epoll backend writes its wake-up eventfd only for work made ready
// outside run_once() (a foreign loop must see it); work that handlers queue
// inside run_once() runs before it returns and leaves completion_fd() quiet.
BOOST_AUTO_TEST_CASE(epoll_completion_fd_is_readable_exactly_when_work_waits) {
    Loop loop(Backend::epoll);
    int cfd = loop.d().completion_fd();
    auto readable = [&] {
        pollfd p{cfd, POLLIN, 0};
        return ::poll(&p, 1, 0) == 1;
    };
    auto [local, peer] = rxtest::socket_pair();
    auto s = loop.d().make_stream(std::move(local), {});
    loop.d().run_once(0, std::chrono::nanoseconds(0));  // a new socket is writable: one event
    BOOST_TEST(!readable());
    bool sent = false;
    s->send(loop.make_send("hello", 0, 0), [&](SendBuffers, IoResult r) { sent = r.ok(); });
    BOOST_TEST(readable());  // queued outside a turn: announced
    // A handler that queues the next operation: the echo of one ping.
    RecvResult second;
    s->recv(loop.lease(64), 0, 4, 4, [&](Lease l, IoResult r) {
        BOOST_TEST(r.bytes == 4u);
        s->send(loop.make_send("pong", 0, 0), [&](SendBuffers, IoResult) {});
        s->recv(std::move(l), 0, 4, 4, second.handler());
    });
    BOOST_REQUIRE(::write(peer.get(), "ping", 4) == 4);
    BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return sent && loop.d().in_flight() == 1; }));
    BOOST_TEST(!readable());  // the reply went out in the same turn, no stray wake-up
    auto got = rxtest::read_exact(peer.get(), 9);
    BOOST_TEST(std::string(reinterpret_cast<const char*>(got.data()), got.size()) == "hellopong");
    // The second recv saw EAGAIN; the next data must still reach it.
    BOOST_REQUIRE(::write(peer.get(), "more", 4) == 4);
    BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return second.done; }));
    BOOST_TEST(second.r.bytes == 4u);
    BOOST_TEST(std::memcmp(second.lease.data(), "more", 4) == 0);
}

// busy_poll on either backend: a waiting run_once polls without sleeping, so
// a completion that arrives while it polls costs the thread no voluntary
// context switch; without it the thread sleeps until the data comes.
BOOST_AUTO_TEST_CASE(busy_poll_waits_without_sleeping_on_each_backend) {
    auto voluntary_switches = [] {
        rusage u{};
        ::getrusage(RUSAGE_THREAD, &u);
        return u.ru_nvcsw;
    };
    for (Backend b : kBackends) {
        for (auto poll : {std::chrono::microseconds(0), std::chrono::microseconds(5'000'000)}) {
            BOOST_TEST_CONTEXT(name(b) << ", busy_poll " << poll.count() << " us") {
                RingOptions o;
                o.busy_poll = poll;
                auto driver = make_driver(b, o);
                BufferPool pool(driver->ring());
                auto [local, peer] = rxtest::socket_pair();
                auto s = driver->make_stream(std::move(local), {});
                Lease l;
                BOOST_REQUIRE(pool.lease(64, l) == 0);
                RecvResult res;
                s->recv(std::move(l), 0, 2, 2, res.handler());
                driver->run_once(0, std::chrono::nanoseconds(0));  // the recv is waiting
                BOOST_REQUIRE(!res.done);
                // The writer is up before the measurement and outlives it:
                // a thread starting or exiting maps and unmaps memory, and a
                // page fault of ours waiting on that lock would be a sleep
                // that is not the driver's (seen under ASan in CI).
                std::atomic<bool> up{false}, measured{false};
                std::thread writer([&, fd = peer.get()] {
                    up = true;
                    std::this_thread::sleep_for(std::chrono::milliseconds(20));
                    [[maybe_unused]] auto n = ::write(fd, "hi", 2);
                    while (!measured) std::this_thread::sleep_for(std::chrono::milliseconds(1));
                });
                while (!up) std::this_thread::yield();
                auto before = voluntary_switches();
                int n = 0;
                for (int calls = 0; !res.done && calls < 100; ++calls)  // a signal may end a wait early
                    n += driver->run_once(1, std::chrono::seconds(20));
                auto slept = voluntary_switches() - before;
                measured = true;
                writer.join();
                BOOST_TEST(n == 1);
                BOOST_TEST(res.done);
                if (poll.count() == 0)
                    BOOST_TEST(slept >= 1);
                else
                    BOOST_TEST(slept == 0);
                s.reset();
                rxtest::drain(*driver);
            }
        }
    }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(framing)

BOOST_AUTO_TEST_CASE(frames_round_trip_over_each_backend) {
    for (Backend b : kBackends) {
        BOOST_TEST_CONTEXT(name(b)) {
            Loop loop(b);
            auto [x, y] = rxtest::socket_pair();
            auto out = loop.d().make_stream(std::move(x), {});
            auto in = loop.d().make_stream(std::move(y), {});
            proto::WriterOptions wo;
            wo.checksum = true;
            proto::FrameWriter writer(*out, wo);
            proto::ReaderOptions ro;
            ro.progress_bytes = 256 * 1024;
            auto reader = std::make_unique<proto::FrameReader>(*in, *loop.pool, ro);

            const std::size_t sizes[] = {0, 1, 65536, (3 << 20) + 1, 100};
            int written = 0;
            for (std::size_t i = 0; i < std::size(sizes); ++i) {
                proto::Frame f;
                BOOST_REQUIRE(proto::Frame::allocate(*loop.pool, sizes[i], f, i == 1 ? proto::kFlagControl : 0) == 0);
                rxtest::fill_pattern(f.mutable_payload(), 900 + i);
                BOOST_REQUIRE(writer.try_write(f, [&](proto::Frame, std::error_code ec) {
                    BOOST_TEST(!ec);
                    ++written;
                }));
            }
            std::vector<proto::Frame> got;
            std::size_t last_progress = 0;
            bool progress_ok = true, stop = false;
            std::function<void(proto::Frame, std::error_code)> on = [&](proto::Frame f, std::error_code ec) {
                if (ec) {
                    stop = true;
                    return;
                }
                got.push_back(std::move(f));
                last_progress = 0;
                if (got.size() < std::size(sizes))
                    reader->read(on, [&](const proto::FrameHeader&, const Lease&, std::size_t ready) {
                        progress_ok = progress_ok && ready >= last_progress;
                        last_progress = ready;
                    });
                else
                    stop = true;
            };
            reader->read(on);
            BOOST_REQUIRE(rxtest::drive(loop.d(), [&] { return stop && written == int(std::size(sizes)); }));
            BOOST_REQUIRE(got.size() == std::size(sizes));
            BOOST_TEST(progress_ok);
            for (std::size_t i = 0; i < std::size(sizes); ++i) {
                BOOST_TEST_CONTEXT("frame " << i) {
                    BOOST_TEST(got[i].size() == sizes[i]);
                    BOOST_TEST(got[i].is_control() == (i == 1));
                    BOOST_TEST(rxtest::matches_pattern(got[i].payload(), 900 + i));
                }
            }
            got.clear();
            out.reset();
            in.reset();
            BOOST_REQUIRE(rxtest::drain(loop.d()));
            reader.reset();
            BOOST_TEST(loop.pool->stats().leased_buffers == 0u);
        }
    }
}

BOOST_AUTO_TEST_SUITE_END()
