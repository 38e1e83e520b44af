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
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "auth.hpp"
#include "cli_runner.hpp"
#include "ringxfer/proto/header.hpp"
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


/// Two key files with different secrets, removed at the end of the test.
struct Keys {
    std::string one = rxtest::scratch_file("key-one", "the first shared secret, 32 bytes");
    std::string two = rxtest::scratch_file("key-two", "the other shared secret, 32 byte");
    ~Keys() {
        ::unlink(one.c_str());
        ::unlink(two.c_str());
    }
};

std::shared_ptr<const ringxfer::tools::AuthKey> load(const std::string& path) {
    std::string error;
    auto key = ringxfer::tools::AuthKey::load(path, error);
    BOOST_REQUIRE_MESSAGE(key, error);
    return key;
}

/// The bytes of a control frame holding `j`.
std::string control_frame(const nlohmann::json& j) {
    std::string text = j.dump();
    std::string out(ringxfer::proto::kHeaderSize, '\0');
    ringxfer::proto::encode_header(
        ringxfer::proto::FrameHeader{ringxfer::proto::kFlagControl, 0, text.size()},
        std::span<std::byte, ringxfer::proto::kHeaderSize>(
            reinterpret_cast<std::byte*>(out.data()), ringxfer::proto::kHeaderSize));
    return out + text;
}

/// No Boost.Test here: it also runs on a fake peer's thread (Boost.Test is
/// not thread-safe; ThreadSanitizer caught its checkpoint string racing).
bool send_bytes(int fd, const std::string& bytes) {
    return ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
           static_cast<ssize_t>(bytes.size());
}

void send_all(int fd, const std::string& bytes) {
    BOOST_REQUIRE_MESSAGE(send_bytes(fd, bytes), std::strerror(errno));
}

/// Reads exactly `n` bytes (false: closed, failed or 10 s without them).
bool read_exactly(int fd, std::size_t n, std::string& out) {
    out.clear();
    while (out.size() < n) {
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 10'000) <= 0) return false;
        char buf[4096];
        ssize_t got = ::recv(fd, buf, std::min(sizeof buf, n - out.size()), 0);
        if (got <= 0) return false;
        out.append(buf, static_cast<std::size_t>(got));
    }
    return true;
}

/// The next frame from `fd`, as a control message (nullopt: none came, it
/// was a data frame, or its header is bad). No Boost.Test: see send_bytes().
std::optional<nlohmann::json> read_control(int fd) {
    std::string head, body;
    if (!read_exactly(fd, ringxfer::proto::kHeaderSize, head)) return std::nullopt;
    ringxfer::proto::FrameHeader h;
    if (ringxfer::proto::decode_header(
            std::span<const std::byte, ringxfer::proto::kHeaderSize>(
                reinterpret_cast<const std::byte*>(head.data()), ringxfer::proto::kHeaderSize),
            1 << 20, h))
        return std::nullopt;
    if (!read_exactly(fd, h.length, body) || !(h.flags & ringxfer::proto::kFlagControl))
        return std::nullopt;
    return nlohmann::json::parse(body);
}

/// Splits a recorded byte stream into its frames' bytes.
std::vector<std::string> split_frames(const std::string& stream) {
    std::vector<std::string> frames;
    std::size_t at = 0;
    while (stream.size() - at >= ringxfer::proto::kHeaderSize) {
        ringxfer::proto::FrameHeader h;
        BOOST_REQUIRE(!ringxfer::proto::decode_header(
            std::span<const std::byte, ringxfer::proto::kHeaderSize>(
                reinterpret_cast<const std::byte*>(stream.data() + at),
                ringxfer::proto::kHeaderSize),
            1 << 30, h));
        std::size_t size = ringxfer::proto::kHeaderSize + h.length;
        BOOST_REQUIRE(stream.size() - at >= size);
        frames.push_back(stream.substr(at, size));
        at += size;
    }
    return frames;
}

/// A listening TCP socket on a free loopback port, for a peer the test
/// plays itself (a fake server, a recording relay) on `thread`.
struct Listener {
    ringxfer::engine::Fd fd;
    std::uint16_t port = 0;
    std::thread thread;
    Listener() {
        fd = ringxfer::engine::listen_on(ringxfer::engine::Endpoint::parse("127.0.0.1:0"));
        port = ringxfer::engine::local_endpoint(fd.get(), ringxfer::engine::Endpoint::Kind::tcp).port;
    }
    ~Listener() {
        if (thread.joinable()) thread.join();
    }
    std::string address() const { return "127.0.0.1:" + std::to_string(port); }
    /// The next connection (invalid after 20 s without one).
    ringxfer::engine::Fd accept() {
        pollfd p{fd.get(), POLLIN, 0};
        if (::poll(&p, 1, 20'000) <= 0) return {};
        return ringxfer::engine::Fd(::accept4(fd.get(), nullptr, nullptr, SOCK_CLOEXEC));
    }
};

/// Relays one connection between a client and `upstream`, recording what
/// the client sent, until both sides closed.
void relay_recording(Listener& l, std::uint16_t upstream, std::string& from_client) {
    ringxfer::engine::Fd a = l.accept();
    if (!a) return;
    // Not rxtest::raw_connect: no Boost.Test on this thread (send_bytes()).
    ringxfer::engine::Endpoint ep;
    ep.host = "127.0.0.1";
    ep.port = upstream;
    ringxfer::engine::SockAddr addr = ringxfer::engine::resolve(ep);
    ringxfer::engine::Fd b(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!b || ::connect(b.get(), addr.get(), addr.len) != 0) return;
    bool a_open = true, b_open = true;
    while (a_open || b_open) {
        pollfd p[2] = {{a_open ? a.get() : -1, POLLIN, 0}, {b_open ? b.get() : -1, POLLIN, 0}};
        if (::poll(p, 2, 20'000) <= 0) return;
        char buf[65536];
        for (int i = 0; i < 2; ++i) {
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            int from = i == 0 ? a.get() : b.get(), to = i == 0 ? b.get() : a.get();
            ssize_t n = ::recv(from, buf, sizeof buf, 0);
            if (n <= 0) {
                ::shutdown(to, SHUT_WR);
                (i == 0 ? a_open : b_open) = false;
                continue;
            }
            if (i == 0) from_client.append(buf, static_cast<std::size_t>(n));
            for (ssize_t sent = 0; sent < n;) {
                ssize_t w = ::send(to, buf + sent, static_cast<std::size_t>(n - sent), MSG_NOSIGNAL);
                if (w <= 0) return;
                sent += w;
            }
        }
    }
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

BOOST_AUTO_TEST_SUITE(auth_key)

using ringxfer::tools::AuthRole;

BOOST_AUTO_TEST_CASE(the_same_key_on_both_sides_echoes_through) {
    Keys keys;
    Serve serve({"--auth-key-file", keys.one});
    BOOST_TEST(contains(serve.log(), "clients must authenticate with the key of " + keys.one));
    Run r = bench(serve.address(), {"--auth-key-file", keys.one});
    BOOST_TEST(r.exit_code == 0, r.err);
    // The self-started server holds bench's key too (over a Unix socket).
    Run u = rxtest::run_cli({"bench", "--transport", "unix", "--auth-key-file", keys.one,
                             "--frame-size", "64Ki", "--frames", "3", "--verify", "--quiet"},
                            30s);
    BOOST_TEST(u.exit_code == 0, u.err);
    serve.settled(0);
    BOOST_TEST(!contains(serve.log(), "dropped"), serve.log());
    BOOST_TEST(serve.stop() == 0);
}

// Different keys: the client finds out first (the server's proof does not
// verify) and goes no further; the server sees it leave.
BOOST_AUTO_TEST_CASE(different_keys_are_refused) {
    Keys keys;
    Serve serve({"--auth-key-file", keys.one});
    Run r = bench(serve.address(), {"--auth-key-file", keys.two});
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(contains(r.err, "the server could not prove it holds the key of --auth-key-file"),
               r.err);
    serve.wait_for("dropped: closed the connection while authenticating");
    serve.settled(0);
    BOOST_TEST(serve.stop() == 0);
    BOOST_TEST(contains(serve.log(), "0 frames"), serve.log());
}

// A client that does not check the server (a raw peer) and answers with
// the wrong key: the server refuses it with a reason and reads nothing more.
BOOST_AUTO_TEST_CASE(server_refuses_a_wrong_client_proof) {
    Keys keys;
    Serve serve({"--auth-key-file", keys.one});
    auto wrong = load(keys.two);
    auto fd = rxtest::raw_connect(serve.port);
    auto nc = ringxfer::tools::random_nonce();
    send_all(fd.get(), control_frame({{"type", "auth"}, {"protocol", 1},
                                      {"nonce", ringxfer::tools::to_hex(nc)}}));
    auto challenge = read_control(fd.get());
    BOOST_REQUIRE(challenge);
    BOOST_TEST((*challenge)["type"] == "auth-challenge");
    ringxfer::tools::AuthNonce ns{};
    BOOST_REQUIRE(ringxfer::tools::from_hex((*challenge)["nonce"].get<std::string>(), ns));
    // The hello travels right behind the bad proof: it must not be run.
    send_all(fd.get(),
             control_frame({{"type", "auth-proof"},
                            {"proof", ringxfer::tools::to_hex(wrong->proof(AuthRole::client, nc, ns))}}) +
                 control_frame({{"type", "hello"}, {"protocol", 1}, {"mode", "echo"},
                                {"frame_bytes", 16}}));
    auto answer = read_control(fd.get());
    BOOST_REQUIRE(answer);
    BOOST_TEST((*answer)["type"] == "error");
    BOOST_TEST(contains((*answer)["message"].get<std::string>(), "authentication failed"));
    Ending e = read_until_closed(fd.get());
    BOOST_TEST(e.error != ETIMEDOUT, "the server kept the connection open");
    BOOST_TEST(e.bytes.empty(), "after refusing, the server sent " << e.bytes.size() << " bytes");
    serve.wait_for("dropped: authentication failed (wrong key)");
    serve.settled(0);
}

// A server that cannot prove the key (a fake one, playing the protocol
// with another key): bench refuses it and sends it nothing more: neither
// its own proof nor its hello.
BOOST_AUTO_TEST_CASE(client_refuses_a_server_without_the_key) {
    Keys keys;
    auto wrong = load(keys.two);
    Listener fake;
    std::string after_challenge;
    bool challenged = false;
    fake.thread = std::thread([&] {
        ringxfer::engine::Fd c = fake.accept();
        if (!c) return;
        auto hello = read_control(c.get());
        if (!hello || (*hello)["type"] != "auth") return;
        ringxfer::tools::AuthNonce nc{};
        if (!ringxfer::tools::from_hex((*hello)["nonce"].get<std::string>(), nc)) return;
        auto ns = ringxfer::tools::random_nonce();
        if (!send_bytes(c.get(), control_frame({{"type", "auth-challenge"},
                                                {"nonce", ringxfer::tools::to_hex(ns)},
                                                {"proof", ringxfer::tools::to_hex(wrong->proof(
                                                              AuthRole::server, nc, ns))}})))
            return;
        challenged = true;
        after_challenge = read_until_closed(c.get()).bytes;
    });
    Run r = bench(fake.address(), {"--auth-key-file", keys.one});
    fake.thread.join();
    BOOST_TEST(challenged);
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(contains(r.err, "could not prove it holds the key"), r.err);
    BOOST_TEST(after_challenge.empty(),
               "bench sent " << after_challenge.size() << " bytes to an unproven server");
}

BOOST_AUTO_TEST_CASE(no_key_on_the_client_is_refused_with_what_to_do) {
    Keys keys;
    Serve serve({"--auth-key-file", keys.one});
    Run r = bench(serve.address());
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(contains(r.err, "this server requires authentication: run bench with "
                               "--auth-key-file"), r.err);
    serve.wait_for("dropped: sent 'hello' before authenticating");
    // A plain data frame first (an echo client) is not echoed either.
    auto fd = rxtest::raw_connect(serve.port);
    std::string data(ringxfer::proto::kHeaderSize, '\0');
    ringxfer::proto::encode_header(
        ringxfer::proto::FrameHeader{0, 0, 5},
        std::span<std::byte, ringxfer::proto::kHeaderSize>(reinterpret_cast<std::byte*>(data.data()),
                                                           ringxfer::proto::kHeaderSize));
    send_all(fd.get(), data + "hello");
    auto answer = read_control(fd.get());
    BOOST_REQUIRE(answer);
    BOOST_TEST((*answer)["type"] == "error");
    BOOST_TEST(read_until_closed(fd.get()).bytes.empty());
    serve.wait_for("dropped: sent a data frame before authenticating");
    serve.settled(0);
    BOOST_TEST(serve.stop() == 0);
    BOOST_TEST(contains(serve.log(), "0 frames"), serve.log());
}

BOOST_AUTO_TEST_CASE(no_key_on_the_server_is_refused_with_what_to_do) {
    Keys keys;
    Serve serve;
    Run r = bench(serve.address(), {"--auth-key-file", keys.one});
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(contains(r.err, "this server has no --auth-key-file: start serve with the same "
                               "--auth-key-file, or run bench without it"), r.err);
    serve.wait_for("asked for authentication, but serve has no --auth-key-file");
}

// A recorded handshake (what a real bench sent through a relay) replayed
// on a new connection: the server's nonce is new, so the recorded proof
// fails, and nothing behind it is run.
BOOST_AUTO_TEST_CASE(a_replayed_handshake_fails) {
    Keys keys;
    Serve serve({"--auth-key-file", keys.one});
    Listener relay;
    std::string recorded;
    relay.thread = std::thread([&] { relay_recording(relay, serve.port, recorded); });
    Run r = bench(relay.address(), {"--auth-key-file", keys.one});
    relay.thread.join();
    BOOST_REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    std::vector<std::string> frames = split_frames(recorded);
    BOOST_REQUIRE(frames.size() >= 3);
    BOOST_TEST(contains(frames[0], "\"type\":\"auth\""));
    BOOST_TEST(contains(frames[1], "\"type\":\"auth-proof\""));
    BOOST_TEST(contains(frames[2], "\"type\":\"hello\""));

    // Step by step: the challenge differs, the old proof is refused.
    auto fd = rxtest::raw_connect(serve.port);
    send_all(fd.get(), frames[0]);
    auto challenge = read_control(fd.get());
    BOOST_REQUIRE(challenge);
    BOOST_TEST((*challenge)["type"] == "auth-challenge");
    send_all(fd.get(), frames[1]);
    auto answer = read_control(fd.get());
    BOOST_REQUIRE(answer);
    BOOST_TEST((*answer)["type"] == "error");
    BOOST_TEST(contains((*answer)["message"].get<std::string>(), "authentication failed"));
    BOOST_TEST(read_until_closed(fd.get()).bytes.empty());

    // The whole session at once: refused at the proof; the hello and the
    // data behind it are never run (no hello-ok, no echo).
    auto all = rxtest::raw_connect(serve.port);
    send_all(all.get(), recorded);
    Ending e = read_until_closed(all.get());
    BOOST_TEST(e.error != ETIMEDOUT);
    BOOST_TEST(contains(e.bytes, "authentication failed"), e.bytes);
    BOOST_TEST(!contains(e.bytes, "hello-ok"));
    serve.settled(0);
    BOOST_TEST(serve.stop() == 0);
    std::string log = serve.log();
    std::size_t failures = 0;
    for (auto at = log.find("authentication failed"); at != std::string::npos;
         at = log.find("authentication failed", at + 1))
        failures++;
    BOOST_TEST(failures == 2, log);
    BOOST_TEST(contains(log, "3 connections, 4 frames"), log);  // only bench's own frames
}

// A peer that connects and says nothing is closed once the 10 s for
// authentication are over, having been sent nothing.
BOOST_AUTO_TEST_CASE(a_silent_peer_is_closed_after_the_timeout) {
    Keys keys;
    Serve serve({"--auth-key-file", keys.one});
    auto t0 = std::chrono::steady_clock::now();
    auto fd = rxtest::raw_connect(serve.port);
    Ending e = read_until_closed(fd.get(), 30s);
    double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    BOOST_TEST(e.error != ETIMEDOUT, "the silent peer was not closed within 30 s");
    BOOST_TEST(e.bytes.empty());
    BOOST_TEST(waited >= 9.5, "closed after " << waited << " s, before the 10 s were up");
    serve.wait_for("dropped: did not authenticate within 10.0 s");
    serve.settled(0);
}

// The other way round: bench does not wait forever on a server that
// accepts and never answers.
BOOST_AUTO_TEST_CASE(bench_gives_up_on_a_silent_server) {
    Keys keys;
    Listener silent;  // the kernel accepts into the backlog; nobody answers
    Run r = bench(silent.address(), {"--auth-key-file", keys.one});
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(contains(r.err, "did not complete authentication within 10 s"), r.err);
    BOOST_TEST(r.seconds < 25);
}

BOOST_AUTO_TEST_CASE(key_files_are_checked_at_start) {
    std::string open = rxtest::scratch_file("open-key", "secret", 0644);
    std::string empty = rxtest::scratch_file("empty-key", "");
    for (const char* command : {"serve", "bench"}) {
        std::vector<std::string> base = {command};
        if (std::string(command) == "serve") base = {"serve", "--listen", "127.0.0.1:0"};
        auto with = [&](const std::string& key) {
            auto a = base;
            a.insert(a.end(), {"--auth-key-file", key});
            return rxtest::run_cli(a, 10s);
        };
        Run r = with(open);
        BOOST_TEST(r.exit_code == 2, command);
        BOOST_TEST(contains(r.err, open + " is accessible by group or others (mode 0644)"), r.err);
        BOOST_TEST(contains(r.err, "chmod 600 " + open), r.err);
        Run e = with(empty);
        BOOST_TEST(e.exit_code == 2, command);
        BOOST_TEST(contains(e.err, empty + " is empty"), e.err);
        Run m = with(rxtest::scratch("no-such-key"));
        BOOST_TEST(m.exit_code == 2, command);
        BOOST_TEST(contains(m.err, "No such file or directory"), m.err);
    }
    ::unlink(open.c_str());
    ::unlink(empty.c_str());
}

BOOST_AUTO_TEST_SUITE_END()
