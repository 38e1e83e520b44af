// `ringxfer serve` and `ringxfer bench` through ringxfer-faultproxy, and
// serve under hundreds of idle connections, as a user runs them: real
// binaries, real sockets. meson passes RINGXFER_EXE, RINGXFER_FAULTPROXY and
// RINGXFER_TEST_TMPDIR.
//
// Benign faults (tiny pieces, delays, stalls shorter than every timeout)
// must deliver every frame intact. Resets and truncations mid-header and
// mid-payload must fail bench quickly with a message naming the broken
// connection, while the server keeps serving with every buffer and
// descriptor back. Every wait is bounded; nothing asserts on speed.
#define BOOST_TEST_MODULE tools_faults
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <dirent.h>
#include <poll.h>
#include <sys/resource.h>

#include <array>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cli_runner.hpp"
#include "serve_process.hpp"
#include "ringxfer/proto/header.hpp"
#include "rx_test.hpp"

namespace {

using namespace std::chrono_literals;
using rxtest::Background;
using rxtest::Run;
using rxtest::Serve;
using rxtest::eventually;
using rxtest::raw_connect;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};

std::size_t count_fds(pid_t pid) {
    std::size_t n = 0;
    DIR* d = ::opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
    BOOST_REQUIRE(d);
    while (dirent* e = ::readdir(d))
        if (e->d_name[0] != '.') ++n;
    ::closedir(d);
    return n;
}

/// VmRSS of `pid` in bytes.
std::size_t rss_bytes(pid_t pid) {
    std::string status = rxtest::slurp("/proc/" + std::to_string(pid) + "/status");
    auto pos = status.find("VmRSS:");
    BOOST_REQUIRE(pos != std::string::npos);
    return std::stoull(status.substr(pos + 6)) * 1024;
}

/// ringxfer-faultproxy in front of `upstream`, with `faults`.
class Proxy {
public:
    Proxy(std::uint16_t upstream, const std::vector<std::string>& faults)
        : proc_(argv(upstream, faults), "faultproxy") {
        std::string out = proc_.wait_for("\n", /*on_stderr=*/false);
        port = static_cast<std::uint16_t>(std::stoi(out));
    }
    std::string address() const { return "127.0.0.1:" + std::to_string(port); }
    /// Waits until the proxy closed its first connection (both peers gone).
    void wait_closed() const { proc_.wait_for(": closed ("); }
    /// Stops the proxy (SIGTERM, must exit 0) and returns its log.
    std::string stop() {
        BOOST_TEST(proc_.stop(SIGTERM) == 0, "faultproxy did not exit cleanly on SIGTERM");
        return proc_.err();
    }
    std::uint16_t port = 0;

private:
    static std::vector<std::string> argv(std::uint16_t upstream,
                                         const std::vector<std::string>& faults) {
        std::vector<std::string> a = {rxtest::env_or_fail("RINGXFER_FAULTPROXY"), "--upstream",
                                      "127.0.0.1:" + std::to_string(upstream)};
        a.insert(a.end(), faults.begin(), faults.end());
        return a;
    }
    Background proc_;
};

/// A number from the proxy's exit line ("... 123 writes, ...").
std::uint64_t proxy_stat(const std::string& log, const std::string& what) {
    auto end = log.rfind(" " + what);
    BOOST_REQUIRE_MESSAGE(end != std::string::npos, "no '" << what << "' in: " << log);
    auto begin = log.rfind(' ', end - 1);
    return std::stoull(log.substr(begin + 1, end - begin - 1));
}

/// Window 2: the one-way modes' automatic window queues 8 MiB, which would
/// make every slowed-down run push megabytes more through the proxy.
Run bench(const std::string& address, const std::string& mode, const std::string& size,
          int frames) {
    return rxtest::run_cli({"bench", address, "--mode", mode, "--frame-size", size, "--frames",
                            std::to_string(frames), "--window", "2", "--verify", "--quiet"},
                           30s);
}

/// A verified bench straight to the server must succeed.
void good_client_is_served(const Serve& serve) {
    Run r = bench(serve.address(), "echo", "256Ki", 3);
    BOOST_TEST(r.exit_code == 0, "a good client was not served after the fault: " << r.err);
}

std::vector<std::byte> frame_bytes(std::size_t size, std::uint64_t seed) {
    std::vector<std::byte> f(ringxfer::proto::kHeaderSize);
    ringxfer::proto::encode_header(
        ringxfer::proto::FrameHeader{0, 0, size},
        std::span<std::byte, ringxfer::proto::kHeaderSize>(f.data(), ringxfer::proto::kHeaderSize));
    auto p = rxtest::pattern_vector(size, seed);
    f.insert(f.end(), p.begin(), p.end());
    return f;
}

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

// Tiny pieces, delays and stalls shorter than every timeout: every frame
// arrives intact (--verify checks every byte), in every mode that sends
// data each way, and the proxy really applied the fault.
BOOST_AUTO_TEST_CASE(benign_faults_deliver_every_frame_intact) {
    Serve serve;
    struct Case {
        std::vector<std::string> faults;
        const char* size;
        int frames;
        std::vector<std::string> modes;
    };
    // bidir's server sends until told to stop, megabytes more than counted:
    // it runs where that costs no time (no per-piece delay, no 7-byte shreds).
    const Case cases[] = {
        {{"--split", "7"}, "3000", 20, {"echo", "stream"}},  // headers and payloads in shreds
        {{"--split", "1000"}, "100K", 3, {"bidir"}},
        {{"--split", "1000", "--delay", "1"}, "100K", 3, {"echo", "stream"}},  // 1 ms per piece
        {{"--stall-after", "150000", "--stall", "1200"}, "100K", 3,  // mid-payload pause
         {"echo", "stream", "bidir"}},
    };
    for (const Case& c : cases) {
        for (const std::string& mode : c.modes) {
            std::string what = mode + " " + c.size + " with";
            for (auto& f : c.faults) what += " " + f;
            BOOST_TEST_CONTEXT(what) {
                Proxy proxy(serve.port, c.faults);
                Run r = bench(proxy.address(), mode, c.size, c.frames);
                BOOST_TEST(r.exit_code == 0, r.err);
                int counted = mode == "bidir" ? 2 * c.frames : c.frames;  // both directions
                BOOST_TEST(r.err.find("ringxfer bench: " + mode + " " + std::to_string(counted) +
                                      " frames") != std::string::npos,
                           r.err);
                std::string log = proxy.stop();
                if (c.faults[0] == "--split") {
                    std::uint64_t bytes = proxy_stat(log, "bytes up") + proxy_stat(log, "bytes down");
                    std::uint64_t piece = std::stoull(c.faults[1]);
                    BOOST_TEST(proxy_stat(log, "writes") >= bytes / piece, log);
                } else {
                    BOOST_TEST(log.find("stalling") != std::string::npos, log);
                }
            }
        }
    }
    Serve::Status s = serve.settled();
    BOOST_TEST(s.leased == 0u);
    BOOST_TEST(serve.log().find("dropped") == std::string::npos, serve.log());
}

// A reset (RST) or a truncation (FIN) mid-header or mid-payload, either
// direction: bench fails within the safety limit naming the broken
// connection; the server drops that connection, keeps serving, and has
// every buffer and descriptor back.
BOOST_AUTO_TEST_CASE(reset_or_truncation_mid_frame_fails_bench_and_server_recovers) {
    Serve serve;
    good_client_is_served(serve);
    serve.settled();
    const std::size_t fds_before = count_fds(serve.pid());
    // Offset 8 is inside the first frame's header (the control hello, or the
    // server's hello-ok downstream); 150000 is inside the first 100 KB data
    // frame's payload (or its echo).
    for (std::string fault : {"--reset-after", "--truncate-after"}) {
        for (std::string where : {"8", "150000"}) {
            for (std::string dir : {"up", "down"}) {
                for (std::string mode : {"echo", "stream"}) {
                    if (mode == "stream" && dir == "down" && where != "8") continue;  // no data down
                    BOOST_TEST_CONTEXT(fault << " " << where << " --dir " << dir << ", " << mode) {
                        Proxy proxy(serve.port, {fault, where, "--dir", dir});
                        Run r = bench(proxy.address(), mode, "100K", 3);
                        BOOST_TEST(r.exit_code == 1, r.err);
                        bool named = r.err.find("reset by peer") != std::string::npos ||
                                     r.err.find("Broken pipe") != std::string::npos ||
                                     r.err.find("closed the connection") != std::string::npos;
                        BOOST_TEST(named, "bench did not name the connection failure: " << r.err);
                        std::string log = proxy.stop();
                        BOOST_TEST(log.find(fault.substr(2)) != std::string::npos, log);
                        Serve::Status s = serve.settled();
                        BOOST_TEST(s.leased == 0u);
                        BOOST_TEST(count_fds(serve.pid()) == fds_before);
                        good_client_is_served(serve);
                    }
                }
            }
        }
    }
    serve.settled();
    BOOST_TEST(count_fds(serve.pid()) == fds_before);
    BOOST_TEST(serve.stop() == 0);
    BOOST_TEST(serve.log().find(", 0 buffers leased") != std::string::npos, serve.log());
}

// The server's side of a cut: a close right after a complete frame is a
// normal end; a close in the middle of one is an error it reports.
BOOST_AUTO_TEST_CASE(clean_close_after_a_frame_is_not_an_error_mid_frame_is) {
    Serve serve;
    const auto first = frame_bytes(5000, 1), second = frame_bytes(5000, 2);
    for (bool mid : {false, true}) {
        BOOST_TEST_CONTEXT((mid ? "mid frame" : "after a complete frame")) {
            std::size_t cut = first.size() + (mid ? 2500 : 0);
            Proxy proxy(serve.port, {"--truncate-after", std::to_string(cut), "--dir", "up"});
            std::size_t log_before = serve.log().size();
            auto raw = raw_connect(proxy.port);
            int fd = raw.get();
            std::vector<std::byte> echoed;
            rxtest::PeerThread reader(fd, -1, [&] { echoed = rxtest::read_to_eof(fd); });
            rxtest::write_all(fd, first);
            rxtest::write_all(fd, second);  // may fail once the proxy cut
            BOOST_TEST(reader.join());
            raw.reset();
            proxy.wait_closed();  // the server's side ended too, by itself
            proxy.stop();
            serve.settled();
            std::string log = serve.log().substr(log_before);
            if (mid)
                BOOST_TEST(log.find("dropped: peer closed the connection in the middle of a frame") !=
                               std::string::npos,
                           log);
            else
                BOOST_TEST(log.find("dropped") == std::string::npos, log);
        }
    }
}

// Half-close: a client that sends its frames and then shuts down its
// sending side still gets every echo, byte for byte, before the server
// closes: directly and through the proxy in 1000-byte pieces.
BOOST_AUTO_TEST_CASE(half_closed_client_receives_all_its_echoes) {
    Serve serve;
    std::vector<std::byte> wire;
    std::uint64_t seed = 10;
    for (std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{3000},
                             std::size_t{100'000}, std::size_t{3} << 20}) {
        auto f = frame_bytes(size, seed++);
        wire.insert(wire.end(), f.begin(), f.end());
    }
    std::optional<Proxy> proxy;
    for (bool via_proxy : {false, true}) {
        BOOST_TEST_CONTEXT((via_proxy ? "through the proxy, --split 1000" : "direct")) {
            if (via_proxy) proxy.emplace(serve.port, std::vector<std::string>{"--split", "1000"});
            auto raw = raw_connect(via_proxy ? proxy->port : serve.port);
            int fd = raw.get();
            std::vector<std::byte> echoed;
            bool ok = false;
            rxtest::PeerThread reader(fd, -1, [&] { echoed = rxtest::read_to_eof(fd, &ok); });
            BOOST_REQUIRE(rxtest::write_all(fd, wire));
            BOOST_REQUIRE(::shutdown(fd, SHUT_WR) == 0);
            BOOST_TEST(reader.join(), "the server never closed after the half-close");
            BOOST_TEST(ok);
            BOOST_TEST(echoed.size() == wire.size());
            BOOST_TEST((echoed == wire), "echoes differ from what was sent");
        }
    }
    if (proxy) proxy->stop();
    BOOST_TEST(serve.settled().leased == 0u);
    BOOST_TEST(serve.log().find("dropped") == std::string::npos, serve.log());
}

// 500 idle connections: the server's memory stays flat while a good client
// runs a verified bench, and --idle-timeout cuts every one of them off.
//
// Bound: an idle connection holds a 4 KiB staging buffer (registered, so
// resident) and about 2 KiB of connection, stream and reader state: ~3 MiB
// for 500. 16 MiB leaves room for allocator and sanitizer overhead and is
// half of what the former 64 KiB up-front staging buffer alone cost (32 MiB).
BOOST_AUTO_TEST_CASE(hundreds_of_idle_connections_stay_cheap_and_are_cut_off) {
    constexpr std::size_t kIdle = 500;
    constexpr std::size_t kBound = 16u << 20;
    rlimit lim{};
    BOOST_REQUIRE(::getrlimit(RLIMIT_NOFILE, &lim) == 0);
    if (lim.rlim_cur < 2 * kIdle + 64) {  // ours, and the server inherits it
        lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 2 * kIdle + 64);
        BOOST_REQUIRE_MESSAGE(::setrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur >= 2 * kIdle + 64,
                              "cannot raise RLIMIT_NOFILE to " << 2 * kIdle + 64);
    }
    Serve serve({"--idle-timeout", "4"});
    good_client_is_served(serve);  // the pool's regions for this frame size exist now
    serve.settled();
    const std::size_t rss_before = rss_bytes(serve.pid());
    const std::size_t fds_before = count_fds(serve.pid());

    std::vector<ringxfer::engine::Fd> idle;
    const auto opened = std::chrono::steady_clock::now();  // before any of them exists
    for (std::size_t i = 0; i < kIdle; ++i) idle.push_back(raw_connect(serve.port));
    serve.settled(kIdle);
    good_client_is_served(serve);
    const std::size_t rss_with_idle = rss_bytes(serve.pid());
    BOOST_TEST(serve.status().open == kIdle, "idle connections were cut before the measurement");
    BOOST_TEST(count_fds(serve.pid()) == fds_before + kIdle);
    BOOST_TEST_MESSAGE("server RSS " << rss_before / 1024 << " KiB, with " << kIdle << " idle: "
                                     << rss_with_idle / 1024 << " KiB");
    BOOST_TEST(rss_with_idle < rss_before + kBound,
               "RSS grew by " << (rss_with_idle - rss_before) / 1024 << " KiB");

    // Every idle socket sees the server hang up (EOF) after the timeout.
    std::size_t closed = 0;
    for (auto& fd : idle) {
        pollfd p{fd.get(), POLLIN, 0};
        if (::poll(&p, 1, 15'000) == 1 && rxtest::read_available(fd.get()).empty()) ++closed;
    }
    BOOST_TEST(closed == kIdle);
    BOOST_TEST((std::chrono::steady_clock::now() - opened >= 4s), "cut off before --idle-timeout");
    BOOST_TEST(serve.settled().leased == 0u);
    BOOST_TEST(count_fds(serve.pid()) == fds_before);
    BOOST_TEST(serve.log().find("idle for more than 4.0 s") != std::string::npos);
}
