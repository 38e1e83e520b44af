// blocking_echo — the plain blocking-socket echo baseline for ringxfer.
//
// What it is: a deliberately ordinary client/server that speaks the ringxfer
// v1 wire format (16-byte little-endian header + payload) over TCP or Unix
// stream sockets using nothing but blocking recv()/sendmsg(). The server reads
// a whole frame and echoes it back; the client keeps one frame in flight,
// waits for the complete echo, and repeats.
//
// --mode stream is the one-way variant: the client sends frames back to back
// and the server consumes them without echoing. A zero-length frame is a
// barrier: the stream server answers it with a zero-length frame, so the
// client starts the clock after the warmup frames were consumed and stops it
// once the last measured frame was (the same rule as bench/peers/epoll_echo).
//
// Why it is the fair baseline: it is what a competent engineer writes without
// io_uring or other tricks, and it avoids the usual strawman mistakes:
//   * buffers are allocated once and reused (the server grows its buffer only
//     when a bigger frame arrives); there is no per-frame allocation or copy;
//   * header and payload go out in one sendmsg() (gather I/O, MSG_NOSIGNAL),
//     short reads/writes and EINTR are handled by looping;
//   * TCP_NODELAY is on; kernel buffer sizes are left at their defaults
//     (--sndbuf SIZE sets SO_SNDBUF on both sides, to compare like with like);
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
//   blocking_echo serve --listen HOST:PORT|unix:PATH [--mode echo|stream] [--one-off]
//                 [--max-frame SIZE] [--sndbuf SIZE]
//   blocking_echo bench [HOST:PORT|unix:PATH] [--mode echo|stream] --frame-size SIZE
//                 --frames N [--warmup-frames W] [--json FILE] [--verify]
//                 [--transport tcp|unix] [--max-frame SIZE] [--sndbuf SIZE]
// SIZE: plain bytes or K/M/G (10^3) or Ki/Mi/Gi (2^10) suffixes.
// Throughput = N * frame_size / seconds, in MB/s (1 MB = 10^6 bytes).
// JSON results.cpu.{client,server}.total_s: CPU seconds of each process over
// the measured span (the self-started server's through its CPU clock).

#include <nlohmann/json.hpp>

#include "peers/wire.hpp"

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

using namespace ringxfer::bench::wire;

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

// ----------------------------------------------------------------- server --

// Echoes frames (stream: consumes them, answering only zero-length barrier
// frames) until the peer closes cleanly at a frame boundary.
void serve_connection(int fd, bool tcp, bool stream, std::uint64_t max_frame) {
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
        if (!stream || len == 0) send_frame(fd, hdr, buf.get(), len);
    }
}

// Accepts one connection at a time; with one_off, returns after the first.
// In forever mode a failed connection is reported and the server keeps going.
void serve(int lfd, bool tcp, bool stream, std::uint64_t max_frame, bool one_off) {
    for (;;) {
        Fd c(::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC));
        if (c.fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            fail_errno("accept");
        }
        if (one_off) { serve_connection(c.fd, tcp, stream, max_frame); return; }
        try {
            serve_connection(c.fd, tcp, stream, max_frame);
        } catch (const Error& e) {
            std::fprintf(stderr, "blocking_echo: %s\n", e.what());
        }
    }
}

// ------------------------------------------------------------------ bench --

nlohmann::ordered_json json_or_null(std::optional<double> v) {
    return v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(nullptr);
}

Child g_server;  // self-started server: killed and cleaned up if the client fails

struct BenchOpts {
    std::optional<std::string> addr;
    std::string transport = "tcp";
    bool transport_given = false;
    bool stream = false;  // --mode stream
    std::uint64_t frame_size = 0, frames = 0, warmup = 1, max_frame = kDefaultMaxFrame;
    bool have_size = false, have_frames = false, verify = false;
    std::string json_path;
};

int run_bench(const BenchOpts& o) {
    Address addr = self_start(g_server, o.addr, o.transport, o.transport_given, "blocking_echo",
                              [&](int lfd, bool tcp) {
                                  serve(lfd, tcp, o.stream, o.max_frame, /*one_off=*/true);
                              });
    const bool tcp = !addr.unix_socket;

    Fd s = open_socket(addr, /*listening=*/false);
    const std::size_t n = o.frame_size;
    std::unique_ptr<std::uint8_t[]> tx(new std::uint8_t[n ? n : 1]);
    std::unique_ptr<std::uint8_t[]> rx(new std::uint8_t[o.stream ? 1 : (n ? n : 1)]);
    fill_pattern(tx.get(), n);
    std::uint8_t hdr[kHeaderSize], rhdr[kHeaderSize];
    encode_header(hdr, n);

    auto one_frame = [&](std::uint64_t seq) {
        stamp_frame(tx.get(), n, seq);
        send_frame(s.fd, hdr, tx.get(), n);
        if (o.stream) return;
        recv_all(s.fd, rhdr, kHeaderSize, "recv echo header");
        if (decode_header(rhdr, o.max_frame) != n) fail("bad echo", "payload length mismatch");
        recv_all(s.fd, rx.get(), n, "recv echo payload");
        if (o.verify && std::memcmp(tx.get(), rx.get(), n) != 0)
            fail("verify", "echoed payload differs from frame " + std::to_string(seq));
    };

    // Stream mode only: a zero-length frame, answered once the server consumed
    // everything sent before it.
    auto barrier = [&] {
        std::uint8_t bhdr[kHeaderSize];
        encode_header(bhdr, 0);
        send_frame(s.fd, bhdr, nullptr, 0);
        recv_all(s.fd, rhdr, kHeaderSize, "recv barrier");
        if (decode_header(rhdr, o.max_frame) != 0) fail("bad stream reply", "expected an empty frame");
    };

    std::uint64_t seq = 0;
    for (std::uint64_t i = 0; i < o.warmup; ++i) one_frame(seq++);
    if (o.stream) barrier();
    const auto cpu0_client = process_cpu_s(), cpu0_server = child_cpu_s(g_server.pid);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::uint64_t i = 0; i < o.frames; ++i) one_frame(seq++);
    if (o.stream) barrier();
    const auto t1 = std::chrono::steady_clock::now();
    const auto cpu_client = cpu_delta(cpu0_client, process_cpu_s());
    const auto cpu_server = cpu_delta(cpu0_server, child_cpu_s(g_server.pid));
    if (::shutdown(s.fd, SHUT_WR) < 0) fail_errno("shutdown");
    if (recv_all(s.fd, rhdr, 1, "recv after shutdown", /*eof_ok=*/true))
        fail("bad echo", "unexpected data after last frame");

    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    const std::uint64_t rss_client = static_cast<std::uint64_t>(ru.ru_maxrss) * 1024;
    const std::optional<std::uint64_t> rss_server = g_server.reap("self-started server");
    g_server.cleanup();

    const double secs = std::chrono::duration<double>(t1 - t0).count();
    const std::uint64_t bytes = o.frames * n;
    const double mbps = secs > 0 ? static_cast<double>(bytes) / secs / 1e6 : 0.0;
    auto mib = [](std::uint64_t b) { return std::to_string((b + (1 << 19)) >> 20) + " MiB"; };
    const std::string srv = rss_server ? mib(*rss_server) : "n/a";
    std::printf("blocking_echo: %s%llu frames x %llu B in %.3f s = %.1f MB/s (rss client %s, server %s)\n",
                o.stream ? "stream " : "", static_cast<unsigned long long>(o.frames),
                static_cast<unsigned long long>(n), secs, mbps,
                mib(rss_client).c_str(), srv.c_str());

    if (!o.json_path.empty()) {
        nlohmann::ordered_json j = {
            {"schema_version", 1},
            {"tool", {{"name", "blocking_echo"}}},
            {"params", {{"mode", o.stream ? "stream" : "echo"}, {"frame_bytes", n}, {"frames", o.frames},
                        {"transport", tcp ? "tcp" : "unix"}, {"warmup_frames", o.warmup}}},
            {"results", {{"frames", o.frames}, {"bytes", bytes}, {"seconds", secs},
                         {"throughput_mbps", mbps}, {"errors", 0},
                         {"rss_peak_bytes", {{"client", rss_client},
                                             {"server", rss_server ? nlohmann::ordered_json(*rss_server)
                                                                   : nlohmann::ordered_json(nullptr)}}},
                         {"cpu", {{"client", {{"total_s", json_or_null(cpu_client)}}},
                                  {"server", {{"total_s", json_or_null(cpu_server)}}}}}}}};
        std::ofstream f(o.json_path);
        f << j.dump(2) << '\n';
        f.close();
        if (!f) fail_errno("write " + o.json_path);
    }
    return 0;
}

// ------------------------------------------------------------------- main --

[[noreturn]] void usage() {
    std::fputs("usage: blocking_echo serve --listen HOST:PORT|unix:PATH [--mode echo|stream] [--one-off]\n"
               "                     [--max-frame SIZE] [--sndbuf SIZE]\n"
               "       blocking_echo bench [HOST:PORT|unix:PATH] [--mode echo|stream] --frame-size SIZE --frames N\n"
               "                     [--warmup-frames W] [--json FILE] [--verify]\n"
               "                     [--transport tcp|unix] [--max-frame SIZE] [--sndbuf SIZE]\n", stderr);
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
        else if (a == "--sndbuf") peer_sndbuf() = static_cast<int>(parse_size(value()));
        else if (a == "--mode") {
            const std::string m = value();
            if (m != "echo" && m != "stream") fail("--mode " + m, "expected echo or stream");
            b.stream = m == "stream";
        }
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
        serve(lfd.fd, !addr.unix_socket, b.stream, b.max_frame, one_off);
        return 0;
    }
    if (mode != "bench") usage();
    if (!b.have_size || !b.have_frames) fail("bench", "--frame-size and --frames are required");
    if (b.frames == 0) fail("bench", "--frames must be at least 1");
    if (b.frame_size > b.max_frame) fail("bench", "--frame-size exceeds --max-frame");
    if (b.stream && b.frame_size == 0) fail("bench", "--mode stream needs --frame-size of at least 1");
    if (b.stream && b.verify) fail("bench", "--verify needs --mode echo (a stream server keeps no copy)");
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
    g_server.cleanup();
    return 1;
}
