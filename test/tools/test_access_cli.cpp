// Access control of `ringxfer serve`, run as a user runs it: --allow
// (address ranges) and --auth-key-file (a pre-shared key, challenge-response
// in control frames). Real binaries, real sockets; meson passes
// RINGXFER_EXE and RINGXFER_TEST_TMPDIR. Every wait is bounded.
#define BOOST_TEST_MODULE tools_access_cli
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "cli_runner.hpp"
#include "rx_test.hpp"
#include "serve_process.hpp"

namespace {

using namespace std::chrono_literals;
using rxtest::Run;
using rxtest::Serve;

struct IgnoreSigpipeFixture : rxtest::IgnoreSigpipe {};

Run bench(const std::string& address, std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"bench", address, "--frame-size", "64Ki", "--frames", "3",
                                  "--verify", "--quiet"};
    a.insert(a.end(), extra.begin(), extra.end());
    return rxtest::run_cli(a, 30s);
}

bool contains(const std::string& text, const std::string& needle) {
    return text.find(needle) != std::string::npos;
}

/// What a raw peer gets from `fd` until the server closes it: the bytes read
/// and how it ended (0: orderly close, else the errno, ETIMEDOUT: still open
/// after `limit`).
struct Ending {
    std::string bytes;
    int error = ETIMEDOUT;
};
Ending read_until_closed(int fd, std::chrono::milliseconds limit = 15s) {
    Ending e;
    auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) return e;
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
        char buf[4096];
        ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n > 0) {
            e.bytes.append(buf, static_cast<std::size_t>(n));
            continue;
        }
        e.error = n == 0 ? 0 : errno;
        return e;
    }
}

/// True when this host can listen on and connect to IPv6 loopback.
bool have_ipv6_loopback() {
    int fd = ::socket(AF_INET6, SOCK_STREAM, 0);
    if (fd < 0) return false;
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
}

}  // namespace

BOOST_TEST_GLOBAL_FIXTURE(IgnoreSigpipeFixture);

BOOST_AUTO_TEST_SUITE(allow)

// A peer outside every range is closed at accept: it reads nothing (not
// even an error frame: the server never parsed a byte of it), the server
// logs it once and keeps nothing of it.
BOOST_AUTO_TEST_CASE(peer_outside_the_ranges_is_closed_before_any_read) {
    Serve serve({"--allow", "10.0.0.0/8"});
    BOOST_TEST(contains(serve.log(), "accepting connections only from 10.0.0.0/8"), serve.log());
    auto fd = rxtest::raw_connect(serve.port);
    Ending e = read_until_closed(fd.get());
    BOOST_TEST(e.error != ETIMEDOUT, "the server kept the connection open");
    BOOST_TEST(e.bytes.empty(), "the refused peer read " << e.bytes.size() << " bytes");
    std::string log = serve.wait_for("refused: not in --allow");
    BOOST_TEST(contains(log, "connection from 127.0.0.1:"), log);

    // bench sees the connection closed and says what may have happened.
    Run r = bench(serve.address());
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(contains(r.err, "closed the connection before accepting the test"), r.err);
    BOOST_TEST(contains(r.err, "--allow"), r.err);
    serve.settled(0);
    BOOST_TEST(serve.stop() == 0);
    BOOST_TEST(contains(serve.log(), "0 frames"), serve.log());
    BOOST_TEST(contains(serve.log(), "2 refused"), serve.log());
}

BOOST_AUTO_TEST_CASE(peer_inside_a_range_is_served) {
    Serve serve({"--allow", "10.0.0.0/8,127.0.0.0/8"});
    Run r = bench(serve.address());
    BOOST_TEST(r.exit_code == 0, r.err);
    BOOST_TEST(!contains(serve.log(), "refused"), serve.log());
    BOOST_TEST(serve.stop() == 0);
}

// A dual-stack listener sees IPv4 clients as ::ffff:127.0.0.1: an IPv4 rule
// must match them, and an IPv6 rule (::1) must not.
BOOST_AUTO_TEST_CASE(ipv4_mapped_peers_on_a_dual_stack_listener) {
    if (!have_ipv6_loopback()) {
        BOOST_TEST_MESSAGE("skipped: no IPv6 loopback on this host");
        return;
    }
    {
        Serve serve({"--allow", "127.0.0.0/8"}, "::");
        Run r = bench(serve.address());
        BOOST_TEST(r.exit_code == 0, r.err);
        BOOST_TEST(serve.stop() == 0);
    }
    {
        Serve serve({"--allow", "::1"}, "::");
        Run r = bench(serve.address());
        BOOST_TEST(r.exit_code == 1, r.err);
        BOOST_TEST(contains(serve.wait_for("refused: not in --allow"), "[::ffff:127.0.0.1]:"));
        Run r6 = bench("[::1]:" + std::to_string(serve.port));
        BOOST_TEST(r6.exit_code == 0, r6.err);
        BOOST_TEST(serve.stop() == 0);
    }
}

BOOST_AUTO_TEST_CASE(bad_cidr_is_a_usage_error_naming_the_entry) {
    for (const char* bad : {"10.0.0.0/33", "10.0.0.0/8,example.org", "10.1.2.3/8"}) {
        Run r = rxtest::run_cli({"serve", "--listen", "127.0.0.1:0", "--allow", bad}, 10s);
        BOOST_TEST(r.exit_code == 2, bad);
        std::string entry = std::string(bad).substr(std::string(bad).rfind(',') + 1);
        BOOST_TEST(contains(r.err, "--allow entry '" + entry + "'"), r.err);
    }
}

BOOST_AUTO_TEST_CASE(allow_on_a_unix_listener_is_a_usage_error) {
    std::string path = rxtest::scratch("allow.sock");
    for (const std::string& listen : {"unix:" + path, "shm:" + path}) {
        Run r = rxtest::run_cli({"serve", "--listen", listen, "--allow", "127.0.0.1"}, 10s);
        BOOST_TEST(r.exit_code == 2, listen);
        BOOST_TEST(contains(r.err, "file permissions"), r.err);
        BOOST_TEST(::access(path.c_str(), F_OK) != 0, "the refused server left " << path);
    }
}

BOOST_AUTO_TEST_SUITE_END()
