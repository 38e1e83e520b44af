#define BOOST_TEST_MODULE engine_socket
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "rx_test.hpp"

using namespace ringxfer::engine;

BOOST_AUTO_TEST_CASE(endpoint_parse_accepts_the_documented_forms) {
    Endpoint a = Endpoint::parse("127.0.0.1:8080");
    BOOST_TEST((a.kind == Endpoint::Kind::tcp));
    BOOST_TEST(a.host == "127.0.0.1");
    BOOST_TEST(a.port == 8080);
    BOOST_TEST(a.to_string() == "127.0.0.1:8080");

    Endpoint b = Endpoint::parse("[::1]:7878");
    BOOST_TEST(b.host == "::1");
    BOOST_TEST(b.port == 7878);
    BOOST_TEST(b.to_string() == "[::1]:7878");

    Endpoint c = Endpoint::parse(":0");
    BOOST_TEST(c.host == "0.0.0.0");
    BOOST_TEST(c.port == 0);

    Endpoint d = Endpoint::parse("unix:/tmp/x.sock");
    BOOST_TEST((d.kind == Endpoint::Kind::unix_socket));
    BOOST_TEST(d.path == "/tmp/x.sock");
    BOOST_TEST(d.to_string() == "unix:/tmp/x.sock");

    Endpoint e = Endpoint::parse("unix:@abstract");
    BOOST_TEST(e.path == "@abstract");
}

BOOST_AUTO_TEST_CASE(endpoint_parse_rejects_garbage_with_einval) {
    for (const char* bad : {"localhost", "host:", "host:port", "1.2.3.4:65536", "1.2.3.4:-1",
                            "unix:", "1.2.3.4:80x"}) {
        BOOST_TEST_CONTEXT(bad) {
            try {
                Endpoint::parse(bad);
                BOOST_ERROR("accepted");
            } catch (const Error& err) {
                BOOST_TEST(err.code() == EINVAL);
                BOOST_TEST(std::string(err.what()).find("HOST:PORT") != std::string::npos);
            }
        }
    }
    std::string long_path = "unix:/" + std::string(200, 'a');
    BOOST_CHECK_THROW(Endpoint::parse(long_path), Error);
}

BOOST_AUTO_TEST_CASE(listen_on_port_zero_reports_the_real_port) {
    Fd l = listen_on(Endpoint::parse("127.0.0.1:0"));
    BOOST_REQUIRE(static_cast<bool>(l));
    Endpoint ep = local_endpoint(l.get(), Endpoint::Kind::tcp);
    BOOST_TEST(ep.host == "127.0.0.1");
    BOOST_TEST(ep.port != 0);

    // Binding the same port again fails with an actionable message.
    try {
        Fd dup = listen_on(ep);
        BOOST_ERROR("second listener on the same port accepted");
    } catch (const Error& err) {
        BOOST_TEST(err.code() == EADDRINUSE);
        BOOST_TEST(std::string(err.what()).find(ep.to_string()) != std::string::npos);
    }
}

BOOST_AUTO_TEST_CASE(unix_listener_replaces_a_stale_path_but_not_a_live_one) {
    rxtest::TempDir dir;
    Endpoint ep;
    ep.kind = Endpoint::Kind::unix_socket;
    ep.path = dir.file("s.sock");
    {
        Fd first = listen_on(ep);
        BOOST_TEST(local_endpoint(first.get(), ep.kind).path == ep.path);
        // Live: refused.
        BOOST_CHECK_THROW(listen_on(ep), Error);
    }
    // The first listener is gone but its file is left: stale, replaced.
    struct stat st{};
    BOOST_REQUIRE(::stat(ep.path.c_str(), &st) == 0);
    Fd second = listen_on(ep);
    BOOST_TEST(static_cast<bool>(second));
}

BOOST_AUTO_TEST_CASE(abstract_unix_endpoint_round_trips) {
    Endpoint ep = Endpoint::parse("unix:@ringxfer-test-" + std::to_string(::getpid()));
    Fd l = listen_on(ep);
    BOOST_TEST(local_endpoint(l.get(), ep.kind).path == ep.path);
}

BOOST_AUTO_TEST_CASE(async_connect_and_accept_over_tcp) {
    Ring ring;
    auto [client, server] = rxtest::tcp_pair(ring);
    BOOST_TEST(static_cast<bool>(client));
    BOOST_TEST(static_cast<bool>(server));
    BOOST_TEST(peer_name(server.get()).rfind("127.0.0.1:", 0) == 0u);
    tune_socket(client.get(), SocketTuning{});
    BOOST_REQUIRE(::write(client.get(), "ping", 4) == 4);
    auto got = rxtest::read_exact(server.get(), 4);
    BOOST_TEST(got.size() == 4u);
    BOOST_TEST(ring.in_flight() == 0u);
}

namespace {
// A socket address of `family` holding the textual address `a`.
SockAddr addr(int family, const char* a) {
    SockAddr s;
    s.storage.ss_family = static_cast<sa_family_t>(family);
    void* dst = family == AF_INET
                    ? static_cast<void*>(&reinterpret_cast<sockaddr_in*>(&s.storage)->sin_addr)
                    : static_cast<void*>(&reinterpret_cast<sockaddr_in6*>(&s.storage)->sin6_addr);
    BOOST_REQUIRE(::inet_pton(family, a, dst) == 1);
    s.len = family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
    return s;
}
SockAddr v4(const char* a) { return addr(AF_INET, a); }
SockAddr v6(const char* a) { return addr(AF_INET6, a); }
int sndbuf(int fd) {
    int v = 0;
    socklen_t len = sizeof v;
    ::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, &len);
    return v;
}
}  // namespace

BOOST_AUTO_TEST_CASE(same_host_means_loopback_or_our_own_address) {
    BOOST_TEST(same_host(v4("127.0.0.1"), v4("127.0.0.1")));
    BOOST_TEST(same_host(v4("127.0.0.1"), v4("127.3.2.1")));
    BOOST_TEST(same_host(v4("10.1.2.3"), v4("10.1.2.3")));
    BOOST_TEST(!same_host(v4("10.1.2.3"), v4("10.1.2.4")));
    BOOST_TEST(!same_host(v4("192.168.0.1"), v4("128.0.0.1")));
    BOOST_TEST(same_host(v6("::1"), v6("::1")));
    BOOST_TEST(same_host(v6("::ffff:127.0.0.1"), v6("::ffff:127.0.0.1")));
    BOOST_TEST(same_host(v6("fd00::5"), v6("fd00::5")));
    BOOST_TEST(!same_host(v6("fd00::5"), v6("fd00::6")));
    BOOST_TEST(!same_host(v6("::ffff:10.0.0.1"), v6("::ffff:10.0.0.2")));
    BOOST_TEST(!same_host(v4("127.0.0.1"), v6("::1")));  // families differ: not a connection
    SockAddr unix_addr;
    unix_addr.storage.ss_family = AF_UNIX;
    BOOST_TEST(!same_host(unix_addr, unix_addr));
}

// A loopback TCP connection and a Unix socket get the local send buffer
// (the kernel reports twice what was set); an explicit send_buffer wins;
// local_send_buffer 0 leaves the kernel's default.
BOOST_AUTO_TEST_CASE(tune_socket_gives_same_host_connections_the_local_send_buffer) {
    Ring ring;
    auto [client, server] = rxtest::tcp_pair(ring);
    int before = sndbuf(client.get());
    SocketTuning t;
    tune_socket(client.get(), t);
    tune_socket(server.get(), t);
    // Root may pass net.core.wmem_max (SO_SNDBUFFORCE); others get the cap.
    int wmem_max = 0;
    FILE* f = std::fopen("/proc/sys/net/core/wmem_max", "r");
    if (f) {
        if (std::fscanf(f, "%d", &wmem_max) != 1) wmem_max = 0;
        std::fclose(f);
    }
    int want = ::geteuid() == 0 || wmem_max >= t.local_send_buffer
                   ? 2 * t.local_send_buffer
                   : 2 * wmem_max;
    BOOST_TEST(sndbuf(client.get()) == want);
    BOOST_TEST(sndbuf(server.get()) == want);
    BOOST_TEST(before != want);  // the default was autotuning's, not ours

    auto [c2, s2] = rxtest::tcp_pair(ring);
    int autotuned = sndbuf(c2.get());
    SocketTuning off;
    off.local_send_buffer = 0;
    tune_socket(c2.get(), off);
    BOOST_TEST(sndbuf(c2.get()) == autotuned);
    SocketTuning fixed;
    fixed.send_buffer = 64 * 1024;
    tune_socket(s2.get(), fixed);
    BOOST_TEST(sndbuf(s2.get()) == 128 * 1024);

    // Unix sockets never leave the host: the local buffer, unless turned off.
    auto [u1, u2] = rxtest::socket_pair();
    int unix_before = sndbuf(u1.get());
    tune_socket(u1.get(), off);
    BOOST_TEST(sndbuf(u1.get()) == unix_before);
    tune_socket(u1.get(), t);
    BOOST_TEST(sndbuf(u1.get()) == want);
    BOOST_TEST(unix_before != want);
}

BOOST_AUTO_TEST_CASE(async_connect_to_a_closed_port_is_refused) {
    // A bound, non-listening socket reserves a port nobody accepts on.
    Fd reserve(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    BOOST_REQUIRE(::bind(reserve.get(), reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
    Endpoint ep = local_endpoint(reserve.get(), Endpoint::Kind::tcp);

    Ring ring;
    int err = 1;
    Fd got;
    async_connect(ring, ep, [&](Fd f, int e) {
        got = std::move(f);
        err = e;
    });
    BOOST_REQUIRE(rxtest::drive(ring, [&] { return err != 1; }));
    BOOST_TEST(err == -ECONNREFUSED);
    BOOST_TEST(!got);
}

BOOST_AUTO_TEST_CASE(async_accept_can_be_cancelled) {
    Ring ring;
    Fd l = listen_on(Endpoint::parse("127.0.0.1:0"));
    int err = 1;
    Completion* token = async_accept(ring, l.get(), [&](Fd, int e) { err = e; });
    ring.run_once(0, std::chrono::nanoseconds(0));
    BOOST_TEST(err == 1);
    ring.cancel(token);
    BOOST_REQUIRE(rxtest::drain(ring));
    BOOST_TEST(err == -ECANCELED);
}
