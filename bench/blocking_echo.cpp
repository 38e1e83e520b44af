// blocking_echo — the plain blocking-socket echo baseline for ringxfer.
//
// What it is: a deliberately ordinary client/server that speaks the ringxfer
// v1 wire format (16-byte little-endian header + payload) over TCP or Unix
// stream sockets using nothing but blocking recv()/sendmsg(). The server reads
// a whole frame and echoes it back; the client keeps one frame in flight,
// waits for the complete echo, and repeats.
//
// Why it is the fair baseline: it is what a competent engineer writes without
// io_uring or other tricks, and it avoids the usual strawman mistakes:
//   * buffers are allocated once and reused (the server grows its buffer only
//     when a bigger frame arrives); there is no per-frame allocation or copy;
//   * header and payload go out in one sendmsg() (gather I/O, MSG_NOSIGNAL),
//     short reads/writes and EINTR are handled by looping;
//   * TCP_NODELAY is on; kernel buffer sizes are left at their defaults;
//   * headers are validated (magic/version/flags/--max-frame) before any
//     allocation, exactly as the ringxfer receiver must;
//   * warmup frames (default 1, which also faults in the buffers) are excluded
//     from timing, and the self-started server is bound before fork() so the
//     client never races it.
// With --verify every echoed byte is compared against what was sent; that
// memcmp is inside the timed region, so headline numbers should come from
// runs without --verify.
//
// Usage:
//   blocking_echo serve --listen HOST:PORT|unix:PATH [--one-off] [--max-frame SIZE]
//   blocking_echo bench [HOST:PORT|unix:PATH] --frame-size SIZE --frames N
//                 [--warmup-frames W] [--json FILE] [--verify]
//                 [--transport tcp|unix] [--max-frame SIZE]
// SIZE: plain bytes or K/M/G (10^3) or Ki/Mi/Gi (2^10) suffixes.
// Throughput = N * frame_size / seconds, in MB/s (1 MB = 10^6 bytes).

#include <nlohmann/json.hpp>

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr std::size_t kHeaderSize = 16;
constexpr std::uint8_t kVersion = 1;
constexpr std::uint64_t kDefaultMaxFrame = 1ULL << 30;

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& what, const std::string& detail) {
    throw Error(what + ": " + detail);
}
[[noreturn]] void fail_errno(const std::string& what) { fail(what, std::strerror(errno)); }

// ---------------------------------------------------------------- parsing --

std::uint64_t parse_size(const std::string& s) {
    std::size_t pos = 0;
    std::uint64_t v = 0;
    try {
        if (s.empty() || s[0] == '-') throw std::invalid_argument(s);
        v = std::stoull(s, &pos, 10);
    } catch (const std::exception&) {
        fail("bad size '" + s + "'", "expected bytes with optional K/M/G/Ki/Mi/Gi suffix");
    }
    const std::string suf = s.substr(pos);
    static constexpr std::pair<const char*, std::uint64_t> kSuffixes[] = {
        {"", 1}, {"K", 1000}, {"M", 1000'000}, {"G", 1000'000'000},
        {"Ki", 1ULL << 10}, {"Mi", 1ULL << 20}, {"Gi", 1ULL << 30}};
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

Address parse_address(const std::string& s) {
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

void encode_header(std::uint8_t* h, std::uint64_t len) {
    h[0] = 'R'; h[1] = 'X'; h[2] = kVersion; h[3] = 0;
    h[4] = h[5] = h[6] = h[7] = 0;  // checksum: unused in v1
    for (int i = 0; i < 8; ++i) h[8 + i] = static_cast<std::uint8_t>(len >> (8 * i));
}

std::uint64_t decode_header(const std::uint8_t* h, std::uint64_t max_frame) {
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

// ------------------------------------------------------------- socket I/O --

// Fills buf completely. Returns false on a clean EOF before the first byte
// when eof_ok (i.e. at a frame boundary); any other EOF is an error.
bool recv_all(int fd, void* buf, std::size_t n, const char* what, bool eof_ok = false) {
    auto* p = static_cast<std::uint8_t*>(buf);
    std::size_t got = 0;
    while (got < n) {
        const ssize_t r = ::recv(fd, p + got, n - got, 0);
        if (r > 0) { got += static_cast<std::size_t>(r); continue; }
        if (r == 0) {
            if (eof_ok && got == 0) return false;
            fail(what, "connection closed mid-frame");
        }
        if (errno != EINTR) fail_errno(what);
    }
    return true;
}

// Sends header + payload with gather I/O, looping on short writes.
void send_frame(int fd, const std::uint8_t* hdr, const void* payload, std::size_t len) {
    iovec iov[2] = {{const_cast<std::uint8_t*>(hdr), kHeaderSize},
                    {const_cast<void*>(payload), len}};
    iovec* v = iov;
    int cnt = len ? 2 : 1;
    while (cnt > 0) {
        msghdr m{};
        m.msg_iov = v;
        m.msg_iovlen = static_cast<std::size_t>(cnt);
        const ssize_t w = ::sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            fail_errno("send frame");
        }
        auto left = static_cast<std::size_t>(w);
        while (cnt > 0 && left >= v->iov_len) { left -= v->iov_len; ++v; --cnt; }
        if (cnt > 0) {
            v->iov_base = static_cast<std::uint8_t*>(v->iov_base) + left;
            v->iov_len -= left;
        }
    }
}

struct Fd {  // owning socket descriptor
    int fd;
    explicit Fd(int f) : fd(f) {}
    Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
    ~Fd() { if (fd >= 0) ::close(fd); }
};

void set_nodelay(int fd) {
    int one = 1;
    if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) fail_errno("setsockopt TCP_NODELAY");
}

sockaddr_un unix_sockaddr(const std::string& path) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);  // length checked in parse_address
    return sa;
}

Fd open_socket(const Address& a, bool listening) {
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
    const int rc = ::getaddrinfo(a.host.empty() ? nullptr : a.host.c_str(), a.port.c_str(), &hints, &res);
    if (rc != 0) fail("resolve " + a.host + ":" + a.port, ::gai_strerror(rc));
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, ::freeaddrinfo);
    int saved = 0;
    for (addrinfo* ai = res; ai; ai = ai->ai_next) {
        Fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
        if (s.fd < 0) { saved = errno; continue; }
        int one = 1;
        if (listening) ::setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        const bool ok = listening ? ::bind(s.fd, ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(s.fd, 16) == 0
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

// ----------------------------------------------------------------- server --

// Echoes frames until the peer closes cleanly at a frame boundary.
void serve_connection(int fd, bool tcp, std::uint64_t max_frame) {
    if (tcp) set_nodelay(fd);
    std::unique_ptr<std::uint8_t[]> buf;  // reused; grown only for bigger frames
    std::size_t cap = 0;
    std::uint8_t hdr[kHeaderSize];
    while (recv_all(fd, hdr, kHeaderSize, "recv header", /*eof_ok=*/true)) {
        const std::uint64_t len = decode_header(hdr, max_frame);  // validated before allocating
        if (len > cap) {
            buf.reset(new std::uint8_t[len]);  // uninitialised on purpose; recv fills it
            cap = len;
        }
        recv_all(fd, buf.get(), len, "recv payload");
        send_frame(fd, hdr, buf.get(), len);
    }
}

// Accepts one connection at a time; with one_off, returns after the first.
// In forever mode a failed connection is reported and the server keeps going.
void serve(int lfd, bool tcp, std::uint64_t max_frame, bool one_off) {
    for (;;) {
        Fd c(::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC));
        if (c.fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            fail_errno("accept");
        }
        if (one_off) { serve_connection(c.fd, tcp, max_frame); return; }
        try {
            serve_connection(c.fd, tcp, max_frame);
        } catch (const Error& e) {
            std::fprintf(stderr, "blocking_echo: %s\n", e.what());
        }
    }
}

// ------------------------------------------------------------------ bench --

pid_t g_child = -1;        // self-started server, killed if the client fails
std::string g_unix_dir;    // temp dir for a self-started unix server

void cleanup() {
    if (g_child > 0) { ::kill(g_child, SIGKILL); ::waitpid(g_child, nullptr, 0); g_child = -1; }
    if (!g_unix_dir.empty()) {
        ::unlink((g_unix_dir + "/sock").c_str());
        ::rmdir(g_unix_dir.c_str());
        g_unix_dir.clear();
    }
}

// Non-trivial base pattern (xorshift64*), written once.
void fill_pattern(std::uint8_t* p, std::size_t n) {
    std::uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (std::size_t i = 0; i < n; i += 8) {
        x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
        const std::uint64_t w = x * 0x2545F4914F6CDD1DULL;
        std::memcpy(p + i, &w, std::min<std::size_t>(8, n - i));
    }
}

// Makes each frame distinct cheaply: one seed-derived word per 4 KiB page plus
// the tail, so a stale or misplaced page in the echo fails --verify.
void stamp_frame(std::uint8_t* p, std::size_t n, std::uint64_t seq) {
    const std::uint64_t seed = (seq + 1) * 0xD6E8FEB86659FD93ULL;
    for (std::size_t off = 0; off < n; off += 4096) {
        const std::uint64_t w = seed ^ off;
        std::memcpy(p + off, &w, std::min<std::size_t>(8, n - off));
    }
    if (n >= 8) std::memcpy(p + n - 8, &seed, 8);
}

struct BenchOpts {
    std::optional<std::string> addr;
    std::string transport = "tcp";
    bool transport_given = false;
    std::uint64_t frame_size = 0, frames = 0, warmup = 1, max_frame = kDefaultMaxFrame;
    bool have_size = false, have_frames = false, verify = false;
    std::string json_path;
};

int run_bench(const BenchOpts& o) {
    Address addr;
    if (o.addr) {
        addr = parse_address(*o.addr);
        if (o.transport_given && (o.transport == "unix") != addr.unix_socket)
            fail("--transport " + o.transport, "conflicts with address " + *o.addr);
    } else if (o.transport == "unix") {
        char tmpl[] = "/tmp/blocking_echo.XXXXXX";
        if (!::mkdtemp(tmpl)) fail_errno("mkdtemp");
        g_unix_dir = tmpl;
        addr = parse_address("unix:" + g_unix_dir + "/sock");
    } else {
        addr = parse_address("127.0.0.1:0");
    }
    const bool tcp = !addr.unix_socket;

    if (!o.addr) {  // self-start: bind and learn the port before fork, so no race
        Fd lfd = open_socket(addr, /*listening=*/true);
        if (tcp) {
            sockaddr_in sa{};
            socklen_t sl = sizeof sa;
            if (::getsockname(lfd.fd, reinterpret_cast<sockaddr*>(&sa), &sl) < 0) fail_errno("getsockname");
            addr.port = std::to_string(ntohs(sa.sin_port));
        }
        std::fflush(nullptr);
        g_child = ::fork();
        if (g_child < 0) fail_errno("fork");
        if (g_child == 0) {
            int rc = 0;
            try {
                serve(lfd.fd, tcp, o.max_frame, /*one_off=*/true);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "blocking_echo: server: %s\n", e.what());
                rc = 1;
            }
            std::fflush(nullptr);
            ::_exit(rc);
        }
    }  // parent closes its copy of the listening socket here

    Fd s = open_socket(addr, /*listening=*/false);
    const std::size_t n = o.frame_size;
    std::unique_ptr<std::uint8_t[]> tx(new std::uint8_t[n ? n : 1]);
    std::unique_ptr<std::uint8_t[]> rx(new std::uint8_t[n ? n : 1]);
    fill_pattern(tx.get(), n);
    std::uint8_t hdr[kHeaderSize], rhdr[kHeaderSize];
    encode_header(hdr, n);

    auto one_frame = [&](std::uint64_t seq) {
        stamp_frame(tx.get(), n, seq);
        send_frame(s.fd, hdr, tx.get(), n);
        recv_all(s.fd, rhdr, kHeaderSize, "recv echo header");
        if (decode_header(rhdr, o.max_frame) != n) fail("bad echo", "payload length mismatch");
        recv_all(s.fd, rx.get(), n, "recv echo payload");
        if (o.verify && std::memcmp(tx.get(), rx.get(), n) != 0)
            fail("verify", "echoed payload differs from frame " + std::to_string(seq));
    };

    std::uint64_t seq = 0;
    for (std::uint64_t i = 0; i < o.warmup; ++i) one_frame(seq++);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::uint64_t i = 0; i < o.frames; ++i) one_frame(seq++);
    const auto t1 = std::chrono::steady_clock::now();
    if (::shutdown(s.fd, SHUT_WR) < 0) fail_errno("shutdown");
    if (recv_all(s.fd, rhdr, 1, "recv after shutdown", /*eof_ok=*/true))
        fail("bad echo", "unexpected data after last frame");

    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    const std::uint64_t rss_client = static_cast<std::uint64_t>(ru.ru_maxrss) * 1024;
    std::optional<std::uint64_t> rss_server;
    if (g_child > 0) {
        int status = 0;
        rusage cru{};
        if (::wait4(g_child, &status, 0, &cru) < 0) fail_errno("wait4 server");
        g_child = -1;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fail("server", "self-started server exited abnormally (status " + std::to_string(status) + ")");
        rss_server = static_cast<std::uint64_t>(cru.ru_maxrss) * 1024;
    }
    cleanup();

    const double secs = std::chrono::duration<double>(t1 - t0).count();
    const std::uint64_t bytes = o.frames * n;
    const double mbps = secs > 0 ? static_cast<double>(bytes) / secs / 1e6 : 0.0;
    auto mib = [](std::uint64_t b) { return std::to_string((b + (1 << 19)) >> 20) + " MiB"; };
    const std::string srv = rss_server ? mib(*rss_server) : "n/a";
    std::printf("blocking_echo: %llu frames x %llu B in %.3f s = %.1f MB/s (rss client %s, server %s)\n",
                static_cast<unsigned long long>(o.frames), static_cast<unsigned long long>(n), secs, mbps,
                mib(rss_client).c_str(), srv.c_str());

    if (!o.json_path.empty()) {
        nlohmann::ordered_json j = {
            {"schema_version", 1},
            {"tool", {{"name", "blocking_echo"}}},
            {"params", {{"mode", "echo"}, {"frame_bytes", n}, {"frames", o.frames},
                        {"transport", tcp ? "tcp" : "unix"}, {"warmup_frames", o.warmup}}},
            {"results", {{"frames", o.frames}, {"bytes", bytes}, {"seconds", secs},
                         {"throughput_mbps", mbps}, {"errors", 0},
                         {"rss_peak_bytes", {{"client", rss_client},
                                             {"server", rss_server ? nlohmann::ordered_json(*rss_server)
                                                                   : nlohmann::ordered_json(nullptr)}}}}}};
        std::ofstream f(o.json_path);
        f << j.dump(2) << '\n';
        f.close();
        if (!f) fail_errno("write " + o.json_path);
    }
    return 0;
}

// ------------------------------------------------------------------- main --

[[noreturn]] void usage() {
    std::fputs("usage: blocking_echo serve --listen HOST:PORT|unix:PATH [--one-off] [--max-frame SIZE]\n"
               "       blocking_echo bench [HOST:PORT|unix:PATH] --frame-size SIZE --frames N\n"
               "                     [--warmup-frames W] [--json FILE] [--verify]\n"
               "                     [--transport tcp|unix] [--max-frame SIZE]\n", stderr);
    std::exit(2);
}

int run(int argc, char** argv) {
    if (argc < 2) usage();
    const std::string mode = argv[1];
    std::vector<std::string> args(argv + 2, argv + argc);
    BenchOpts b;
    std::string listen;
    bool one_off = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string a = args[i], val;
        const auto eq = a.find('=');
        const bool inline_val = a.rfind("--", 0) == 0 && eq != std::string::npos;
        if (inline_val) { val = a.substr(eq + 1); a = a.substr(0, eq); }
        auto value = [&]() -> std::string {
            if (inline_val) return val;
            if (i + 1 >= args.size()) fail("option " + a, "missing value");
            return args[++i];
        };
        if (a == "--max-frame") b.max_frame = parse_size(value());
        else if (mode == "serve" && a == "--listen") listen = value();
        else if (mode == "serve" && a == "--one-off") one_off = true;
        else if (mode == "bench" && a == "--frame-size") { b.frame_size = parse_size(value()); b.have_size = true; }
        else if (mode == "bench" && a == "--frames") { b.frames = parse_size(value()); b.have_frames = true; }
        else if (mode == "bench" && a == "--warmup-frames") b.warmup = parse_size(value());
        else if (mode == "bench" && a == "--json") b.json_path = value();
        else if (mode == "bench" && a == "--verify") b.verify = true;
        else if (mode == "bench" && a == "--transport") {
            b.transport = value();
            b.transport_given = true;
            if (b.transport != "tcp" && b.transport != "unix") fail("--transport " + b.transport, "expected tcp or unix");
        } else if (mode == "bench" && a.rfind("--", 0) != 0 && !b.addr) b.addr = a;
        else fail("bad argument '" + a + "'", "see usage");
    }
    if (mode == "serve") {
        if (listen.empty()) fail("serve", "--listen is required");
        const Address addr = parse_address(listen);
        Fd lfd = open_socket(addr, /*listening=*/true);
        serve(lfd.fd, !addr.unix_socket, b.max_frame, one_off);
        return 0;
    }
    if (mode != "bench") usage();
    if (!b.have_size || !b.have_frames) fail("bench", "--frame-size and --frames are required");
    if (b.frames == 0) fail("bench", "--frames must be at least 1");
    if (b.frame_size > b.max_frame) fail("bench", "--frame-size exceeds --max-frame");
    return run_bench(b);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const Error& e) {
        std::fprintf(stderr, "blocking_echo: %s\n", e.what());
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "blocking_echo: allocate buffers: %s\n", std::strerror(ENOMEM));
    }
    cleanup();
    return 1;
}
