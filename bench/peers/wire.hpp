// wire.hpp — what the C++ comparison peers share: size and address parsing,
// the ringxfer v1 frame header, the payload pattern, and plain socket setup.
//
// Header-only on purpose: each peer is one translation unit built straight
// from bench/meson.build, and none of this belongs in the library (it is the
// peers' own, deliberately library-free, implementation of the wire format).
// Errors are exceptions (`Error`): these are command-line tools, and the
// first failure ends the run with its message.
#pragma once

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace ringxfer::bench::wire {

constexpr std::size_t kHeaderSize = 16;
constexpr std::uint8_t kVersion = 1;
constexpr std::uint64_t kDefaultMaxFrame = 1ULL << 30;

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& what, const std::string& detail) {
    throw Error(what + ": " + detail);
}
[[noreturn]] inline void fail_errno(const std::string& what) { fail(what, std::strerror(errno)); }

// ---------------------------------------------------------------- parsing --

// Plain bytes or K/M/G (10^3) or Ki/Mi/Gi (2^10) suffixes, as the ringxfer CLI.
inline std::uint64_t parse_size(const std::string& s) {
    std::size_t pos = 0;
    std::uint64_t v = 0;
    try {
        if (s.empty() || s[0] == '-') throw std::invalid_argument(s);
        v = std::stoull(s, &pos, 10);
    } catch (const std::exception&) {
        fail("bad size '" + s + "'", "expected bytes with optional K/M/G/Ki/Mi/Gi suffix");
    }
    const std::string suf = s.substr(pos);
    static constexpr std::pair<const char*, std::uint64_t> kSuffixes[] = {{"", 1},
                                                                          {"K", 1000},
                                                                          {"M", 1000'000},
                                                                          {"G", 1000'000'000},
                                                                          {"Ki", 1ULL << 10},
                                                                          {"Mi", 1ULL << 20},
                                                                          {"Gi", 1ULL << 30}};
    std::uint64_t mult = 0;
    for (const auto& [name, m] : kSuffixes)
        if (suf == name) mult = m;
    if (mult == 0) fail("bad size '" + s + "'", "unknown suffix '" + suf + "'");
    if (v != 0 && mult > UINT64_MAX / v) fail("bad size '" + s + "'", "overflow");
    return v * mult;
}

struct Address {
    bool unix_socket = false;
    std::string path;        // unix
    std::string host, port;  // tcp
};

inline Address parse_address(const std::string& s) {
    Address a;
    if (s.rfind("unix:", 0) == 0) {
        a.unix_socket = true;
        a.path = s.substr(5);
        if (a.path.empty() || a.path.size() >= sizeof(sockaddr_un{}.sun_path))
            fail("bad address '" + s + "'", "unix path empty or too long");
        return a;
    }
    const auto colon = s.rfind(':');
    if (colon == std::string::npos || colon + 1 == s.size())
        fail("bad address '" + s + "'", "expected HOST:PORT or unix:PATH");
    a.host = s.substr(0, colon);
    a.port = s.substr(colon + 1);
    if (a.host.size() >= 2 && a.host.front() == '[' && a.host.back() == ']')
        a.host = a.host.substr(1, a.host.size() - 2);  // [v6addr]:port
    return a;
}

// ------------------------------------------------------------ wire format --

// 'R' 'X', version 1, flags 0, checksum 0 (unused in v1), u64 LE payload length.
inline void encode_header(std::uint8_t* h, std::uint64_t len) {
    h[0] = 'R';
    h[1] = 'X';
    h[2] = kVersion;
    h[3] = 0;
    h[4] = h[5] = h[6] = h[7] = 0;
    for (int i = 0; i < 8; ++i) h[8 + i] = static_cast<std::uint8_t>(len >> (8 * i));
}

// Validates before anyone allocates for the payload, as the ringxfer receiver must.
inline std::uint64_t decode_header(const std::uint8_t* h, std::uint64_t max_frame) {
    if (h[0] != 'R' || h[1] != 'X') fail("bad frame header", "bad magic");
    if (h[2] != kVersion) fail("bad frame header", "unsupported version " + std::to_string(h[2]));
    if (h[3] != 0) fail("bad frame header", "unknown flags " + std::to_string(h[3]));
    std::uint64_t len = 0;
    for (int i = 0; i < 8; ++i) len |= std::uint64_t{h[8 + i]} << (8 * i);
    if (len > max_frame)
        fail("bad frame header", "payload length " + std::to_string(len) + " exceeds --max-frame " +
                                     std::to_string(max_frame));
    return len;
}

// ---------------------------------------------------------------- payload --

// Non-trivial base pattern (xorshift64*), written once.
inline void fill_pattern(std::uint8_t* p, std::size_t n) {
    std::uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (std::size_t i = 0; i < n; i += 8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        const std::uint64_t w = x * 0x2545F4914F6CDD1DULL;
        std::memcpy(p + i, &w, std::min<std::size_t>(8, n - i));
    }
}

// Makes each frame distinct cheaply: one seed-derived word per 4 KiB page plus
// the tail, so a stale or misplaced page in an echo fails --verify.
inline void stamp_frame(std::uint8_t* p, std::size_t n, std::uint64_t seq) {
    const std::uint64_t seed = (seq + 1) * 0xD6E8FEB86659FD93ULL;
    for (std::size_t off = 0; off < n; off += 4096) {
        const std::uint64_t w = seed ^ off;
        std::memcpy(p + off, &w, std::min<std::size_t>(8, n - off));
    }
    if (n >= 8) std::memcpy(p + n - 8, &seed, 8);
}

// ---------------------------------------------------------------- sockets --

struct Fd {  // owning descriptor
    int fd;
    explicit Fd(int f) : fd(f) {}
    Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
    Fd& operator=(Fd&& o) noexcept {
        std::swap(fd, o.fd);
        return *this;
    }
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
};

// SO_SNDBUF the peers set on their TCP sockets (their --sndbuf; 0: the
// kernel's autotuning, their default): to measure a peer with the send
// buffer ringxfer gives same-host connections.
inline int& peer_sndbuf() {
    static int bytes = 0;
    return bytes;
}

// TCP_NODELAY, and peer_sndbuf() when set.
inline void set_nodelay(int fd) {
    int one = 1;
    if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        fail_errno("setsockopt TCP_NODELAY");
    int sndbuf = peer_sndbuf();
    if (sndbuf > 0 && ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf) < 0)
        fail_errno("setsockopt SO_SNDBUF");
}

inline sockaddr_un unix_sockaddr(const std::string& path) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);  // length checked in parse_address
    return sa;
}

// A listening socket, or a connected one (blocking, TCP_NODELAY on TCP).
inline Fd open_socket(const Address& a, bool listening) {
    const std::string what = listening ? "listen" : "connect";
    if (a.unix_socket) {
        Fd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (s.fd < 0) fail_errno("socket");
        const sockaddr_un sa = unix_sockaddr(a.path);
        const auto* sp = reinterpret_cast<const sockaddr*>(&sa);
        if (listening ? (::bind(s.fd, sp, sizeof sa) < 0 || ::listen(s.fd, 16) < 0)
                      : ::connect(s.fd, sp, sizeof sa) < 0)
            fail_errno(what + " unix:" + a.path);
        return s;
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = listening ? AI_PASSIVE : 0;
    addrinfo* res = nullptr;
    const int rc =
        ::getaddrinfo(a.host.empty() ? nullptr : a.host.c_str(), a.port.c_str(), &hints, &res);
    if (rc != 0) fail("resolve " + a.host + ":" + a.port, ::gai_strerror(rc));
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, ::freeaddrinfo);
    int saved = 0;
    for (addrinfo* ai = res; ai; ai = ai->ai_next) {
        Fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
        if (s.fd < 0) {
            saved = errno;
            continue;
        }
        int one = 1;
        if (listening) ::setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        const bool ok =
            listening ? ::bind(s.fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(s.fd, 16) == 0
                      : ::connect(s.fd, ai->ai_addr, ai->ai_addrlen) == 0;
        if (ok) {
            if (!listening) set_nodelay(s.fd);
            return s;
        }
        saved = errno;
    }
    errno = saved;
    fail_errno(what + " " + a.host + ":" + a.port);
}

// The port a TCP listening socket was given (for HOST:0).
inline std::string bound_port(int fd) {
    sockaddr_storage sa{};
    socklen_t sl = sizeof sa;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &sl) < 0) fail_errno("getsockname");
    const auto port = sa.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&sa)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&sa)->sin_port;
    return std::to_string(ntohs(port));
}

// --------------------------------------------------------------------- cpu --

// CPU seconds (user + system, all threads) used so far by this process or
// by a child of ours, read at the edges of the measured span so start-up,
// buffer faulting and warmup are left out, as ringxfer does. Nullopt when
// the clock cannot be read (no child, or it is gone).
inline std::optional<double> cpu_clock_s(clockid_t clock) {
    timespec ts{};
    if (::clock_gettime(clock, &ts) != 0) return std::nullopt;
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}
inline std::optional<double> process_cpu_s() { return cpu_clock_s(CLOCK_PROCESS_CPUTIME_ID); }
inline std::optional<double> child_cpu_s(pid_t pid) {
    clockid_t clock;
    if (pid <= 0 || ::clock_getcpuclockid(pid, &clock) != 0) return std::nullopt;
    return cpu_clock_s(clock);
}

inline std::optional<double> cpu_delta(std::optional<double> a, std::optional<double> b) {
    if (!a || !b) return std::nullopt;
    return *b - *a;
}

// ------------------------------------------------------- forked helpers --

// A process a peer forks (its own server, or zmq_stream's sender) and the
// temp dir of its Unix socket: reaped at the end of a run, killed and
// removed when the run fails.
class Child {
public:
    pid_t pid = -1;

    /// A fresh /tmp/TOOL.XXXXXX for a Unix socket; returns "DIR/sock".
    std::string make_socket_dir(const char* tool) {
        std::string tmpl = std::string("/tmp/") + tool + ".XXXXXX";
        if (!::mkdtemp(tmpl.data())) fail_errno("mkdtemp");
        dir_ = tmpl;
        return dir_ + "/sock";
    }

    /// Waits for the child to end; its peak RSS (nullopt without one).
    /// Throws, naming it `what`, when it did not exit cleanly.
    std::optional<std::uint64_t> reap(const std::string& what) {
        if (pid <= 0) return std::nullopt;
        int status = 0;
        rusage cru{};
        if (::wait4(pid, &status, 0, &cru) < 0) fail_errno("wait4 " + what);
        pid = -1;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail(what, "exited abnormally (status " + std::to_string(status) + ")");
        return static_cast<std::uint64_t>(cru.ru_maxrss) * 1024;
    }

    /// Kills a child still running and removes the socket dir; idempotent
    /// (the error paths of main() call it too).
    void cleanup() noexcept {
        if (pid > 0) {
            ::kill(pid, SIGKILL);
            ::waitpid(pid, nullptr, 0);
            pid = -1;
        }
        if (!dir_.empty()) {
            ::unlink((dir_ + "/sock").c_str());
            ::rmdir(dir_.c_str());
            dir_.clear();
        }
    }

private:
    std::string dir_;
};

// The bench side of an echo peer: the address to connect to — ADDRESS, or
// with none a one-off server of the peer's own, forked on a free loopback
// port (or a fresh Unix socket) that is bound *before* the fork, so the
// client can never race it. `serve(listen_fd, tcp)` runs in the child; `tool`
// prefixes its errors.
template <class Serve>
Address self_start(Child& server, const std::optional<std::string>& addr_arg,
                   const std::string& transport, bool transport_given, const char* tool,
                   Serve&& serve) {
    if (addr_arg) {
        Address addr = parse_address(*addr_arg);
        if (transport_given && (transport == "unix") != addr.unix_socket)
            fail("--transport " + transport, "conflicts with address " + *addr_arg);
        return addr;
    }
    Address addr = parse_address(transport == "unix" ? "unix:" + server.make_socket_dir(tool)
                                                     : std::string("127.0.0.1:0"));
    Fd lfd = open_socket(addr, /*listening=*/true);
    const bool tcp = !addr.unix_socket;
    if (tcp) addr.port = bound_port(lfd.fd);
    std::fflush(nullptr);
    server.pid = ::fork();
    if (server.pid < 0) fail_errno("fork");
    if (server.pid == 0) {
        int rc = 0;
        try {
            serve(lfd.fd, tcp);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "%s: server: %s\n", tool, e.what());
            rc = 1;
        }
        std::fflush(nullptr);
        ::_exit(rc);
    }
    return addr;  // the parent's copy of the listening socket closes here
}

}  // namespace ringxfer::bench::wire
