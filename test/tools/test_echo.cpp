#define BOOST_TEST_MODULE tools_echo
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>
#include <boost/test/data/test_case.hpp>
#include <boost/test/data/monomorphic.hpp>

#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"
#include "rx_test.hpp"
#include "server.hpp"

using namespace ringxfer;
using engine::Endpoint;
using engine::Fd;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};
BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

namespace {

constexpr std::size_t MiB = 1 << 20;

/// tools::Server on its own thread with its own Ring and BufferPool (a Ring
/// belongs to the thread that created it). Results are read after join().
class ServerThread {
public:
    ServerThread(Fd listener, tools::ServeOptions so,
                 engine::Backend backend = engine::Backend::uring) {
        thread_ = std::thread([this, so, backend, fd = listener.release()] {
            try {
                Fd l(fd);
                auto driver = engine::make_driver(backend);
                engine::BufferPool pool(driver->ring());
                {
                    tools::Server server(*driver, pool, std::move(l), so);
                    summary = server.run(stop);
                }
                leased_after = pool.stats().leased_buffers;
                finished = true;
            } catch (const std::exception& e) {
                error = e.what();
            }
            exited_ = true;
        });
    }
    ~ServerThread() {
        if (thread_.joinable()) {
            stop = true;
            thread_.join();
        }
    }
    /// Waits for run() to return by itself (one-off). A safety net stops it
    /// after rxtest::kHangLimit; then the result is false.
    [[nodiscard]] bool join() {
        auto deadline = std::chrono::steady_clock::now() + rxtest::kHangLimit;
        while (!exited_.load() && std::chrono::steady_clock::now() < deadline)
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        bool by_itself = exited_.load();
        stop_and_join();
        return by_itself;
    }
    void stop_and_join() {
        stop = true;
        if (thread_.joinable()) thread_.join();
    }

    std::atomic<bool> stop{false};
    tools::ServeSummary summary;
    std::size_t leased_after = SIZE_MAX;
    bool finished = false;
    std::string error;

private:
    std::atomic<bool> exited_{false};
    std::thread thread_;
};

/// A plain blocking TCP connection to `ep`, for tests that play a raw peer.
Fd raw_connect(const Endpoint& ep) {
    engine::SockAddr addr = engine::resolve(ep);
    Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    BOOST_REQUIRE(fd);
    BOOST_REQUIRE(::connect(fd.get(), addr.get(), addr.len) == 0);
    return fd;
}

tools::ServeOptions one_off(bool store_and_forward = false) {
    tools::ServeOptions so;
    so.one_off = true;
    so.store_and_forward = store_and_forward;
    so.quiet = true;
    return so;
}

struct Spec {
    std::size_t size;
    std::uint8_t flags;
    std::uint64_t seed;
};

const std::vector<Spec> kSpecs = {
    {0, 0, 1}, {1, 0, 2}, {4096, 0, 3}, {MiB + 3, 0, 4}, {10'000'000, 0, 5}};

/// Client on the test thread: sends every frame (pipelined), reads every
/// echo, verifies them byte for byte, then closes.
void echo_client(const Endpoint& ep, const std::vector<Spec>& specs, bool checksum = false) {
    engine::Ring ring;
    engine::BufferPool pool(&ring);
    Fd fd;
    int err = 1;
    engine::async_connect(ring, ep, [&](Fd f, int e) {
        fd = std::move(f);
        err = e;
    });
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return err != 1; }));
    BOOST_REQUIRE_MESSAGE(err == 0, "connect to " << ep.to_string() << ": " << err);

    auto stream = std::make_unique<engine::SocketStream>(ring, std::move(fd));
    proto::WriterOptions wo;
    wo.checksum = checksum;
    proto::FrameWriter writer(*stream, wo);
    auto reader = std::make_unique<proto::FrameReader>(*stream, pool);

    std::vector<proto::Frame> sent_back(specs.size());
    std::size_t written = 0;
    for (std::size_t i = 0; i < specs.size(); ++i) {
        proto::Frame f;
        BOOST_REQUIRE(proto::Frame::allocate(pool, specs[i].size, f, specs[i].flags) == 0);
        rxtest::fill_pattern(f.mutable_payload(), specs[i].seed);
        BOOST_REQUIRE(writer.try_write(f, [&, i](proto::Frame back, std::error_code ec) {
            BOOST_TEST(!ec);
            sent_back[i] = std::move(back);
            ++written;
        }));
    }

    std::vector<proto::Frame> echoes;
    std::error_code read_error;
    bool reading = true;
    std::function<void(proto::Frame, std::error_code)> on = [&](proto::Frame f, std::error_code ec) {
        if (ec) {
            read_error = ec;
            reading = false;
            return;
        }
        echoes.push_back(std::move(f));
        if (echoes.size() < specs.size()) reader->read(on);
        else reading = false;
    };
    reader->read(on);
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return !reading && written == specs.size(); }));
    BOOST_REQUIRE_MESSAGE(!read_error, "echo read failed: " << read_error.message());
    BOOST_REQUIRE(echoes.size() == specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        BOOST_TEST_CONTEXT("frame " << i << " (" << specs[i].size << " B)") {
            BOOST_TEST(echoes[i].size() == specs[i].size);
            // The control flag always survives; whether the echo carries a
            // checksum depends on the server mode (cut-through forwards the
            // sender's header, store-and-forward writes with its own options).
            BOOST_TEST(echoes[i].is_control() == ((specs[i].flags & proto::kFlagControl) != 0));
            if (!checksum) BOOST_TEST(int(echoes[i].flags()) == int(specs[i].flags));
            BOOST_TEST(rxtest::pattern_mismatch(echoes[i].payload(), specs[i].seed) ==
                       static_cast<std::size_t>(-1));
            BOOST_TEST(rxtest::matches_pattern(sent_back[i].payload(), specs[i].seed));
        }
    }
    echoes.clear();
    sent_back.clear();
    stream.reset();  // the server sees a clean close
    BOOST_REQUIRE(rxtest::drain(ring));
    reader.reset();  // an idle reader still holds its staging buffer
    BOOST_TEST(pool.stats().leased_buffers == 0u);
}

std::uint64_t total(const std::vector<Spec>& specs) {
    std::uint64_t n = 0;
    for (auto& s : specs) n += s.size;
    return n;
}

void check_clean_summary(ServerThread& server, std::uint64_t frames, std::uint64_t bytes) {
    BOOST_TEST(server.error.empty(), server.error);
    BOOST_TEST(server.finished);
    BOOST_TEST(server.summary.connections == 1u);
    BOOST_TEST(server.summary.frames == frames);
    BOOST_TEST(server.summary.bytes == bytes);
    BOOST_TEST(server.summary.errors == 0u);
    BOOST_TEST(server.leased_after == 0u);
}

}  // namespace

// Both server modes: cut-through (default: bytes echoed as they land) and
// store-and-forward (whole frames).
BOOST_AUTO_TEST_CASE(echo_over_tcp_loopback) {
    for (bool saf : {false, true}) {
        BOOST_TEST_CONTEXT("store_and_forward " << saf) {
            Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
            Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
            ServerThread server(std::move(listener), one_off(saf));
            echo_client(ep, kSpecs);
            BOOST_TEST(server.join(), "one-off server did not return");  // once the connection is done
            check_clean_summary(server, kSpecs.size(), total(kSpecs));
        }
    }
}

BOOST_AUTO_TEST_CASE(echo_over_unix_socket) {
    for (bool saf : {false, true}) {
        BOOST_TEST_CONTEXT("store_and_forward " << saf) {
            rxtest::TempDir dir;
            Endpoint ep;
            ep.kind = Endpoint::Kind::unix_socket;
            ep.path = dir.file("echo.sock");
            Fd listener = engine::listen_on(ep);
            ServerThread server(std::move(listener), one_off(saf));
            echo_client(ep, kSpecs);
            BOOST_TEST(server.join(), "one-off server did not return");
            check_clean_summary(server, kSpecs.size(), total(kSpecs));
        }
    }
}

BOOST_AUTO_TEST_CASE(checksummed_frames_survive_the_echo) {
    for (bool saf : {false, true}) {
        BOOST_TEST_CONTEXT("store_and_forward " << saf) {
            Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
            Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
            ServerThread server(std::move(listener), one_off(saf));
            const std::vector<Spec> specs = {{0, 0, 1}, {3 * MiB + 1, 0, 2}, {77, 0, 3}};
            echo_client(ep, specs, /*checksum=*/true);
            BOOST_TEST(server.join(), "one-off server did not return");
            check_clean_summary(server, specs.size(), total(specs));
        }
    }
}

BOOST_AUTO_TEST_CASE(server_keeps_serving_until_stopped) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so;
    so.quiet = true;
    ServerThread server(std::move(listener), so);
    const std::vector<Spec> small = {{10, 0, 1}, {70000, 0, 2}};
    echo_client(ep, small);
    echo_client(ep, small);
    server.stop_and_join();
    BOOST_TEST(server.error.empty(), server.error);
    BOOST_TEST(server.finished);
    BOOST_TEST(server.summary.connections == 2u);
    BOOST_TEST(server.summary.frames == 4u);
    BOOST_TEST(server.summary.errors == 0u);
    BOOST_TEST(server.leased_after == 0u);
}

BOOST_AUTO_TEST_CASE(client_leaving_mid_frame_is_an_error_on_the_server) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    ServerThread server(std::move(listener), one_off());

    Fd raw = raw_connect(ep);
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::encode_header(proto::FrameHeader{0, 0, 1000}, h);
    BOOST_REQUIRE(rxtest::write_all(raw.get(), h));
    BOOST_REQUIRE(rxtest::write_all(raw.get(), rxtest::pattern_vector(100, 1)));
    ::shutdown(raw.get(), SHUT_WR);
    rxtest::read_to_eof(raw.get());
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.summary.errors == 1u);
    BOOST_TEST(server.summary.frames == 0u);
    BOOST_TEST(server.leased_after == 0u);
}

// --idle-timeout: a client that connects and goes quiet is cut off, counted
// as an error, and the server's buffers all come back.
BOOST_AUTO_TEST_CASE(idle_connection_is_closed_after_the_idle_timeout) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so = one_off();
    so.idle_timeout = std::chrono::milliseconds(300);
    ServerThread server(std::move(listener), so);
    Fd raw = raw_connect(ep);
    auto reply = rxtest::read_to_eof(raw.get());  // returns once the server hangs up
    BOOST_TEST(reply.empty());
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.summary.errors == 1u);
    BOOST_TEST(server.leased_after == 0u);
}

// A peer that sends a header and then trickles is cut off by the minimum
// rate, not left holding a frame buffer forever.
BOOST_AUTO_TEST_CASE(slow_sender_is_cut_off_by_the_minimum_rate) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so = one_off();
    so.min_rate = 100'000;  // B/s
    so.rate_window = std::chrono::milliseconds(300);
    ServerThread server(std::move(listener), so);
    Fd raw = raw_connect(ep);
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::encode_header(proto::FrameHeader{0, 0, 1'000'000}, h);
    BOOST_REQUIRE(rxtest::write_all(raw.get(), h));
    BOOST_REQUIRE(rxtest::write_all(raw.get(), rxtest::pattern_vector(10, 1)));
    rxtest::read_to_eof(raw.get());  // returns once the server hangs up
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.summary.errors == 1u);
    BOOST_TEST(server.leased_after == 0u);
}

// A sender above the minimum rate is never cut off, by the rate or by the
// idle timeout, even though its bytes wait in the socket for the receive's
// low water mark (SO_RCVLOWAT: the whole rest of the frame here) and the
// reader sees none of them for many windows: bytes queued in the kernel
// count as arrived.
BOOST_DATA_TEST_CASE(steady_sender_above_the_minimum_rate_is_served,
                     boost::unit_test::data::make({"min-rate", "idle-timeout"}), limit) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so = one_off();
    if (std::string(limit) == "min-rate") {
        so.min_rate = 100'000;  // B/s
        so.rate_window = std::chrono::milliseconds(200);
    } else {
        so.idle_timeout = std::chrono::milliseconds(200);
    }
    ServerThread server(std::move(listener), so);
    Fd raw = raw_connect(ep);
    constexpr std::size_t kLen = 500'000, kPiece = 10'000;  // 400 KB/s, 1.25 s
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::encode_header(proto::FrameHeader{0, 0, kLen}, h);
    BOOST_REQUIRE(rxtest::write_all(raw.get(), h));
    auto payload = rxtest::pattern_vector(kLen, 3);
    for (std::size_t pos = 0; pos < kLen; pos += kPiece) {
        BOOST_REQUIRE(rxtest::write_all(raw.get(), {payload.data() + pos, kPiece}));
        std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    auto echo = rxtest::read_exact(raw.get(), proto::kHeaderSize + kLen);
    BOOST_REQUIRE(echo.size() == proto::kHeaderSize + kLen);
    BOOST_TEST(rxtest::matches_pattern({echo.data() + proto::kHeaderSize, kLen}, 3));
    raw.reset();
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.summary.errors == 0u);
    BOOST_TEST(server.leased_after == 0u);
}

// Beyond --max-connections a newcomer is closed at once; the others go on.
BOOST_AUTO_TEST_CASE(connections_beyond_the_maximum_are_refused) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so;
    so.quiet = true;
    so.max_connections = 1;
    ServerThread server(std::move(listener), so);
    Fd first = raw_connect(ep);
    // The first is served: an echo comes back.
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::encode_header(proto::FrameHeader{0, 0, 3}, h);
    BOOST_REQUIRE(rxtest::write_all(first.get(), h));
    BOOST_REQUIRE(rxtest::write_all(first.get(), rxtest::pattern_vector(3, 7)));
    auto echo = rxtest::read_exact(first.get(), proto::kHeaderSize + 3);
    BOOST_REQUIRE(echo.size() == proto::kHeaderSize + 3);
    Fd second = raw_connect(ep);
    auto reply = rxtest::read_to_eof(second.get());  // closed at once
    BOOST_TEST(reply.empty());
    first.reset();
    server.stop_and_join();
    BOOST_TEST(server.summary.connections == 1u);
    BOOST_TEST(server.summary.errors == 1u);
}

// From here to the end of the file the server drops a connection from inside
// its reader's handler (tools/server.cpp, Server::on_closed); with the current
// server that is a use-after-free under ASan, which aborts the binary, so
// these cases come last. On the epoll backend it happens at every connection
// end.

// Zero-length frames carry nothing but cost the receiver work: a long run of
// them is refused.
BOOST_AUTO_TEST_CASE(flood_of_empty_frames_is_refused) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so = one_off(/*store_and_forward=*/true);
    so.reader.max_consecutive_empty = 100;
    ServerThread server(std::move(listener), so);
    Fd raw = raw_connect(ep);
    std::vector<std::byte> flood(proto::kHeaderSize * 150);
    for (std::size_t i = 0; i < 150; ++i)
        proto::encode_header(proto::FrameHeader{0, 0, 0},
                             std::span<std::byte, proto::kHeaderSize>(flood.data() + i * proto::kHeaderSize,
                                                                      proto::kHeaderSize));
    BOOST_REQUIRE(rxtest::write_all(raw.get(), flood));
    rxtest::read_to_eof(raw.get());
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.summary.errors == 1u);
    BOOST_TEST(server.summary.frames == 100u);  // the allowed ones were served
    BOOST_TEST(server.leased_after == 0u);
}

// A client speaking another control-protocol version gets a clear error
// reply (and the server drops it, counted as an error) instead of a hang.
BOOST_AUTO_TEST_CASE(control_protocol_mismatch_is_refused_with_a_message) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    ServerThread server(std::move(listener), one_off());
    Fd raw = raw_connect(ep);
    const std::string hello = R"({"type":"hello","protocol":99,"mode":"echo"})";
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::encode_header(proto::FrameHeader{proto::kFlagControl, 0, hello.size()}, h);
    BOOST_REQUIRE(rxtest::write_all(raw.get(), h));
    BOOST_REQUIRE(rxtest::write_all(raw.get(), rxtest::as_bytes(hello)));
    auto reply = rxtest::read_to_eof(raw.get());
    BOOST_REQUIRE(reply.size() > proto::kHeaderSize);
    proto::FrameHeader rh;
    BOOST_REQUIRE(!proto::decode_header(std::span<const std::byte, proto::kHeaderSize>(
                                            reply.data(), proto::kHeaderSize),
                                        1 << 20, rh));
    BOOST_TEST((rh.flags & proto::kFlagControl) != 0);
    std::string body(reinterpret_cast<const char*>(reply.data()) + proto::kHeaderSize, rh.length);
    BOOST_TEST(body.find("\"type\":\"error\"") != std::string::npos, body);
    BOOST_TEST(body.find("protocol mismatch") != std::string::npos, body);
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.summary.errors == 1u);
    BOOST_TEST(server.leased_after == 0u);
}

// Control frames (flag bit 1) carry the bench control channel, not data: one
// that is not a JSON control message gets the connection dropped, counted as
// an error, with every buffer back in the pool.
BOOST_AUTO_TEST_CASE(server_drops_a_client_sending_a_bogus_control_frame) {
    for (bool saf : {false, true}) {
        BOOST_TEST_CONTEXT("store_and_forward " << saf) {
            Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
            Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
            ServerThread server(std::move(listener), one_off(saf));
            Fd raw = raw_connect(ep);
            const char body[] = "not json";
            std::array<std::byte, proto::kHeaderSize> h{};
            proto::encode_header(proto::FrameHeader{proto::kFlagControl, 0, sizeof body - 1}, h);
            BOOST_REQUIRE(rxtest::write_all(raw.get(), h));
            BOOST_REQUIRE(rxtest::write_all(raw.get(), rxtest::as_bytes(body)));
            auto reply = rxtest::read_to_eof(raw.get());
            BOOST_TEST(reply.empty());  // nothing echoed, the server hangs up
            BOOST_TEST(server.join(), "one-off server did not return");
            BOOST_TEST(server.summary.errors == 1u);
            BOOST_TEST(server.summary.frames == 0u);
            BOOST_TEST(server.leased_after == 0u);
        }
    }
}

BOOST_AUTO_TEST_CASE(echo_from_a_server_on_the_epoll_backend) {
    for (bool saf : {false, true}) {
        BOOST_TEST_CONTEXT("store_and_forward " << saf) {
            Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
            Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
            ServerThread server(std::move(listener), one_off(saf), engine::Backend::epoll);
            echo_client(ep, kSpecs);
            BOOST_TEST(server.join(), "one-off server did not return");
            check_clean_summary(server, kSpecs.size(), total(kSpecs));
        }
    }
}

// A peer that is not speaking the protocol is dropped: the connection is
// closed, counted as an error, and the server's buffers all come back.
BOOST_AUTO_TEST_CASE(server_drops_a_client_sending_a_bad_header) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    ServerThread server(std::move(listener), one_off());

    Fd raw = raw_connect(ep);
    const char request[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    BOOST_REQUIRE(rxtest::write_all(raw.get(), rxtest::as_bytes(request)));
    bool ok = false;
    auto reply = rxtest::read_to_eof(raw.get(), &ok);  // the server hangs up
    BOOST_TEST(reply.empty());
    BOOST_TEST(server.join(), "one-off server did not return");
    BOOST_TEST(server.error.empty(), server.error);
    BOOST_TEST(server.summary.connections == 1u);
    BOOST_TEST(server.summary.frames == 0u);
    BOOST_TEST(server.summary.errors == 1u);
    BOOST_TEST(server.leased_after == 0u);
}

BOOST_AUTO_TEST_CASE(corrupted_frame_is_an_error_on_the_server) {
    for (bool saf : {false, true}) {
        BOOST_TEST_CONTEXT("store_and_forward " << saf) {
            Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
            Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
            ServerThread server(std::move(listener), one_off(saf));
            Fd raw = raw_connect(ep);
            auto payload = rxtest::pattern_vector(2 * MiB, 4);
            std::array<std::byte, proto::kHeaderSize> h{};
            proto::encode_header(proto::FrameHeader{proto::kFlagChecksum, 0x12345678u, payload.size()}, h);
            int rfd = raw.get();
            std::vector<std::byte> echoed;
            rxtest::PeerThread drain_echo(rfd, -1, [&] { echoed = rxtest::read_to_eof(rfd); });
            BOOST_REQUIRE(rxtest::write_all(rfd, h));
            rxtest::write_all(rfd, payload);  // the server may hang up before the end
            BOOST_TEST(server.join(), "one-off server did not return");
            BOOST_TEST(drain_echo.join(), "peer thread was still blocked and had to be aborted");
            BOOST_TEST(server.error.empty(), server.error);
            BOOST_TEST(server.summary.errors == 1u);
            BOOST_TEST(server.summary.frames == 0u);
            BOOST_TEST(server.leased_after == 0u);
        }
    }
}

namespace {
/// Descriptors this process has open now.
std::size_t open_fds() {
    std::size_t n = 0;
    for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
        (void)e;
        n++;
    }
    return n - 1;  // the iterator's own
}

/// One 3-byte frame sent on `fd`; true when its echo comes back within `ms`.
bool echoes_within(int fd, int ms) {
    std::array<std::byte, proto::kHeaderSize> h{};
    proto::encode_header(proto::FrameHeader{0, 0, 3}, h);
    if (!rxtest::write_all(fd, h) || !rxtest::write_all(fd, rxtest::pattern_vector(3, 1)))
        return false;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, ms) != 1) return false;
    return rxtest::read_exact(fd, proto::kHeaderSize + 3).size() == proto::kHeaderSize + 3;
}

double process_cpu_seconds() {
    rusage u{};
    ::getrusage(RUSAGE_SELF, &u);
    return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
           static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}
}  // namespace

// Out of descriptors, the server neither spins on accept nor drops what it
// has: new connections wait in the backlog, accept is retried at each sweep,
// and they are served once others close.
BOOST_AUTO_TEST_CASE(out_of_descriptors_new_connections_wait_and_are_served_later) {
    Fd listener = engine::listen_on(Endpoint::parse("127.0.0.1:0"));
    Endpoint ep = engine::local_endpoint(listener.get(), Endpoint::Kind::tcp);
    tools::ServeOptions so;
    so.quiet = true;
    ServerThread server(std::move(listener), so);
    // Client sockets are made before the limit drops (connect needs no new
    // descriptor); then the server has room for a couple of accepted ones.
    std::vector<Fd> clients;
    engine::SockAddr addr = engine::resolve(ep);
    for (int i = 0; i < 8; i++) {
        clients.emplace_back(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
        BOOST_REQUIRE(clients.back());
    }
    rlimit saved{};
    BOOST_REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
    rlimit low = saved;
    low.rlim_cur = open_fds() + 2;
    BOOST_REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
    struct Restore {
        rlimit lim;
        ~Restore() { ::setrlimit(RLIMIT_NOFILE, &lim); }
    } restore{saved};
    // Connect one at a time until one gets no echo: it waits in the backlog.
    std::size_t served = 0;
    while (served < clients.size()) {
        BOOST_REQUIRE(::connect(clients[served].get(), addr.get(), addr.len) == 0);
        if (!echoes_within(clients[served].get(), 500)) break;
        served++;
    }
    BOOST_REQUIRE(served >= 1);
    BOOST_REQUIRE(served + 1 < clients.size());
    const int waiting = clients[served].get();
    // The server does not spin on accept meanwhile (a spinning loop burns a
    // whole core: ~1 CPU-second per second).
    double cpu0 = process_cpu_seconds();
    std::this_thread::sleep_for(std::chrono::seconds(1));
    BOOST_TEST(process_cpu_seconds() - cpu0 < 0.5);

    for (std::size_t i = 0; i < served; i++) clients[i].reset();
    // Their descriptors come back: the waiting one is accepted and the frame
    // it sent is echoed; one more connection is served after it.
    pollfd p{waiting, POLLIN, 0};
    BOOST_REQUIRE(::poll(&p, 1, 10'000) == 1);
    BOOST_TEST(rxtest::read_exact(waiting, proto::kHeaderSize + 3).size() ==
               proto::kHeaderSize + 3);
    BOOST_REQUIRE(::connect(clients[served + 1].get(), addr.get(), addr.len) == 0);
    BOOST_TEST(echoes_within(clients[served + 1].get(), 10'000));
    clients.clear();
    server.stop_and_join();
    BOOST_TEST(server.error.empty());
    BOOST_TEST(server.summary.connections == served + 2);
}
