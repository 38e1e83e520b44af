// epoll_echo — the non-blocking epoll baseline for ringxfer.
//
// What it is: the best *straightforward* readiness-based client/server a
// competent engineer writes without io_uring: one thread, non-blocking
// sockets registered once with epoll in edge-triggered mode, every socket
// drained until EAGAIN before waiting again. It speaks the ringxfer v1 wire
// format (16-byte header + payload) over TCP or Unix stream sockets, and has
// the command-line shape and JSON of bench/blocking_echo.
//
//   echo    the client keeps one frame in flight and sends and receives at
//           the same time (it reads the echo while its send is still going);
//           the server relays bytes as they arrive through one reused 1 MiB
//           buffer (cut-through), validating each header as it passes. This
//           overlap is what a non-blocking loop buys over blocking_echo.
//   stream  the client sends frames back to back; the server reads into the
//           same reused buffer and discards. A zero-length frame is a
//           barrier the stream server answers with a zero-length frame: the
//           clock starts once the warmup frames were consumed and stops once
//           the last measured frame was.
//
// Not done on purpose (that would no longer be straightforward): batching
// several frames per syscall, busy polling, SO_ZEROCOPY, socket buffer
// tuning (kernel autotuning is left on, as for every peer).
//
// Usage:
//   epoll_echo serve --listen HOST:PORT|unix:PATH [--mode echo|stream] [--one-off]
//              [--max-frame SIZE]
//   epoll_echo bench [HOST:PORT|unix:PATH] [--mode echo|stream] --frame-size SIZE --frames N
//              [--warmup-frames W] [--json FILE] [--verify] [--transport tcp|unix]
//              [--max-frame SIZE]
// Throughput = N * frame_size / seconds, in MB/s (1 MB = 10^6 bytes).

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "wire.hpp"

namespace {

using namespace ringxfer::bench::wire;

constexpr std::size_t kRelayBytes = 1 << 20;  // server buffer, reused for the connection's life

void set_nonblocking(int fd) {
    const int fl = ::fcntl(fd, F_GETFL);
    if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) fail_errno("fcntl O_NONBLOCK");
}

bool would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

// An epoll instance; fds are added once, edge-triggered, for both directions.
struct Epoll {
    Fd ep{::epoll_create1(EPOLL_CLOEXEC)};
    Epoll() {
        if (ep.fd < 0) fail_errno("epoll_create1");
    }
    void add(int fd, std::uint64_t key) {
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.u64 = key;
        if (::epoll_ctl(ep.fd, EPOLL_CTL_ADD, fd, &ev) < 0) fail_errno("epoll_ctl ADD");
    }
    int wait(epoll_event* evs, int max) {
        for (;;) {
            const int n = ::epoll_wait(ep.fd, evs, max, -1);
            if (n >= 0) return n;
            if (errno != EINTR) fail_errno("epoll_wait");
        }
    }
};

// Sends as much of iov[0..cnt) as the socket takes now, advancing the iovecs.
// Returns bytes sent (0 when the socket would block).
std::size_t send_some(int fd, iovec*& v, int& cnt) {
    msghdr m{};
    m.msg_iov = v;
    m.msg_iovlen = static_cast<std::size_t>(cnt);
    ssize_t w;
    do w = ::sendmsg(fd, &m, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0) {
        if (would_block(errno)) return 0;
        fail_errno("send");
    }
    auto left = static_cast<std::size_t>(w);
    while (cnt > 0 && left >= v->iov_len) {
        left -= v->iov_len;
        ++v;
        --cnt;
    }
    if (cnt > 0) {
        v->iov_base = static_cast<std::uint8_t*>(v->iov_base) + left;
        v->iov_len -= left;
    }
    return static_cast<std::size_t>(w);
}

// Receives into buf[0..n). Returns bytes read, 0 when it would block; EOF
// is reported through `eof`.
std::size_t recv_some(int fd, void* buf, std::size_t n, bool& eof, const char* what) {
    ssize_t r;
    do r = ::recv(fd, buf, n, 0);
    while (r < 0 && errno == EINTR);
    if (r > 0) return static_cast<std::size_t>(r);
    if (r == 0) {
        eof = true;
        return 0;
    }
    if (would_block(errno)) return 0;
    fail_errno(what);
}

// ----------------------------------------------------------------- server --

// Follows frame boundaries through a byte stream so every header is validated
// as it passes, without holding more than the header's 16 bytes.
struct FrameScanner {
    std::uint64_t max_frame;
    std::uint8_t hdr[kHeaderSize]{};
    std::size_t hdr_got = 0;
    std::uint64_t payload_left = 0;

    bool at_boundary() const { return hdr_got == 0 && payload_left == 0; }

    // Calls on_empty() for each zero-length frame (a stream-mode barrier).
    template <class F>
    void scan(const std::uint8_t* p, std::size_t n, F&& on_empty) {
        while (n > 0) {
            if (payload_left > 0) {
                const std::size_t k = std::min<std::uint64_t>(payload_left, n);
                payload_left -= k;
                p += k;
                n -= k;
                continue;
            }
            const std::size_t k = std::min(kHeaderSize - hdr_got, n);
            std::memcpy(hdr + hdr_got, p, k);
            hdr_got += k;
            p += k;
            n -= k;
            if (hdr_got == kHeaderSize) {
                hdr_got = 0;
                payload_left = decode_header(hdr, max_frame);
                if (payload_left == 0) on_empty();
            }
        }
    }
};

struct Conn {
    Fd fd;
    bool stream;
    FrameScanner scanner;
    std::unique_ptr<std::uint8_t[]> buf{new std::uint8_t[kRelayBytes]};
    std::size_t head = 0, tail = 0;   // echo: buf[head, tail) still to be sent back
    std::vector<std::uint8_t> reply;  // stream: barrier answers still to be sent
    std::size_t reply_sent = 0;
    bool eof = false;

    Conn(Fd f, bool s, std::uint64_t max_frame) : fd(std::move(f)), stream(s), scanner{max_frame} {}

    bool pending_out() const { return stream ? reply_sent < reply.size() : head < tail; }

    // Moves bytes until the socket would block both ways (what edge-triggered
    // readiness requires). Returns true when the connection is finished.
    bool progress() {
        for (bool moved = true; moved;) {
            moved = false;
            if (pending_out()) {
                iovec iov{stream ? reply.data() + reply_sent : buf.get() + head,
                          stream ? reply.size() - reply_sent : tail - head};
                iovec* v = &iov;
                int cnt = 1;
                const std::size_t w = send_some(fd.fd, v, cnt);
                (stream ? reply_sent : head) += w;
                moved |= w > 0;
                if (!stream && head == tail) head = tail = 0;  // drained: reuse from the start
                if (stream && reply_sent == reply.size()) {
                    reply.clear();
                    reply_sent = 0;
                }
            }
            // Echo mode reads only into free space: a peer that does not read
            // its echo stalls us (back-pressure) instead of growing memory.
            const std::size_t room = stream ? kRelayBytes : kRelayBytes - tail;
            if (!eof && room > 0) {
                std::uint8_t* dst = buf.get() + (stream ? 0 : tail);
                const std::size_t r = recv_some(fd.fd, dst, room, eof, "recv");
                if (eof && !scanner.at_boundary()) fail("recv", "connection closed mid-frame");
                scanner.scan(dst, r, [this] {
                    if (!stream) return;  // echo mode relays the empty frame like any other
                    reply.resize(reply.size() + kHeaderSize);
                    encode_header(reply.data() + reply.size() - kHeaderSize, 0);
                });
                if (!stream) tail += r;
                moved |= r > 0;
            }
        }
        return eof && !pending_out();
    }
};

// One thread serves every connection; with one_off it returns after the first
// connection ends. In forever mode a failed connection is reported and dropped.
void serve(int lfd, bool tcp, bool stream, std::uint64_t max_frame, bool one_off) {
    set_nonblocking(lfd);
    Epoll ep;
    constexpr std::uint64_t kListener = ~0ULL;
    ep.add(lfd, kListener);
    std::map<std::uint64_t, Conn> conns;
    std::uint64_t next_key = 0;
    epoll_event evs[64];
    for (;;) {
        const int n = ep.wait(evs, 64);
        for (int i = 0; i < n; ++i) {
            const std::uint64_t key = evs[i].data.u64;
            if (key == kListener) {
                for (;;) {  // edge-triggered: accept until EAGAIN
                    Fd c(::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
                    if (c.fd < 0) {
                        if (would_block(errno)) break;
                        if (errno == EINTR || errno == ECONNABORTED) continue;
                        fail_errno("accept");
                    }
                    if (tcp) set_nodelay(c.fd);
                    const std::uint64_t k = next_key++;
                    auto& conn =
                        conns.try_emplace(k, std::move(c), stream, max_frame).first->second;
                    ep.add(conn.fd.fd, k);
                }
                continue;
            }
            const auto it = conns.find(key);
            if (it == conns.end()) continue;
            bool done = false;
            try {
                done = it->second.progress();
            } catch (const Error& e) {
                if (one_off) throw;
                std::fprintf(stderr, "epoll_echo: %s\n", e.what());
                done = true;
            }
            if (done) {
                conns.erase(it);  // closing the fd also removes it from epoll
                if (one_off) return;
            }
        }
    }
}

// ------------------------------------------------------------------ bench --

Child g_server;  // self-started server: killed and cleaned up if the client fails

struct BenchOpts {
    std::optional<std::string> addr;
    std::string transport = "tcp";
    bool transport_given = false;
    bool stream = false;
    std::uint64_t frame_size = 0, frames = 0, warmup = 1, max_frame = kDefaultMaxFrame;
    bool have_size = false, have_frames = false, verify = false;
    std::string json_path;
};

// The client side of one connection: sends one frame (or barrier) while
// receiving whatever is expected back, with both directions progressing
// together and epoll_wait only when both would block.
struct Client {
    Fd fd;
    Epoll ep;
    explicit Client(Fd f) : fd(std::move(f)) {
        set_nonblocking(fd.fd);
        ep.add(fd.fd, 0);
    }

    // Sends hdr+payload and, if rx_len is set, receives exactly 16 + *rx_len
    // bytes into rhdr and rx. Returns when both are complete.
    void exchange(const std::uint8_t* hdr, const std::uint8_t* payload, std::size_t len,
                  std::uint8_t* rhdr, std::uint8_t* rx, std::optional<std::size_t> rx_len) {
        iovec out[2] = {{const_cast<std::uint8_t*>(hdr), kHeaderSize},
                        {const_cast<std::uint8_t*>(payload), len}};
        iovec* ov = out;
        int ocnt = len ? 2 : 1;
        iovec in[2] = {{rhdr, kHeaderSize}, {rx, rx_len.value_or(0)}};
        iovec* iv = in;
        int icnt = !rx_len ? 0 : (*rx_len ? 2 : 1);
        epoll_event evs[4];
        while (ocnt > 0 || icnt > 0) {
            bool moved = false;
            if (ocnt > 0) moved |= send_some(fd.fd, ov, ocnt) > 0;
            if (icnt > 0) moved |= recv_iov(iv, icnt) > 0;
            if (!moved) ep.wait(evs, 4);
        }
    }

  private:
    // Scatter receive into the remaining iovecs; there is exactly one frame in
    // flight, so a read never takes bytes beyond it.
    std::size_t recv_iov(iovec*& v, int& cnt) {
        msghdr m{};
        m.msg_iov = v;
        m.msg_iovlen = static_cast<std::size_t>(cnt);
        ssize_t r;
        do r = ::recvmsg(fd.fd, &m, 0);
        while (r < 0 && errno == EINTR);
        if (r == 0) fail("recv", "connection closed mid-frame");
        if (r < 0) {
            if (would_block(errno)) return 0;
            fail_errno("recv");
        }
        auto left = static_cast<std::size_t>(r);
        while (cnt > 0 && left >= v->iov_len) {
            left -= v->iov_len;
            ++v;
            --cnt;
        }
        if (cnt > 0) {
            v->iov_base = static_cast<std::uint8_t*>(v->iov_base) + left;
            v->iov_len -= left;
        }
        return static_cast<std::size_t>(r);
    }
};

int run_bench(const BenchOpts& o) {
    Address addr = self_start(g_server, o.addr, o.transport, o.transport_given, "epoll_echo",
                              [&](int lfd, bool tcp) {
                                  serve(lfd, tcp, o.stream, o.max_frame, /*one_off=*/true);
                              });
    const bool tcp = !addr.unix_socket;

    Client c(open_socket(addr, /*listening=*/false));
    const std::size_t n = o.frame_size;
    std::unique_ptr<std::uint8_t[]> tx(new std::uint8_t[n ? n : 1]);
    std::unique_ptr<std::uint8_t[]> rx(new std::uint8_t[o.stream ? 1 : (n ? n : 1)]);
    fill_pattern(tx.get(), n);
    std::uint8_t hdr[kHeaderSize], rhdr[kHeaderSize], empty[kHeaderSize];
    encode_header(hdr, n);
    encode_header(empty, 0);

    auto one_frame = [&](std::uint64_t seq) {
        stamp_frame(tx.get(), n, seq);
        if (o.stream) {
            c.exchange(hdr, tx.get(), n, nullptr, nullptr, std::nullopt);
            return;
        }
        c.exchange(hdr, tx.get(), n, rhdr, rx.get(), n);
        if (decode_header(rhdr, o.max_frame) != n) fail("bad echo", "payload length mismatch");
        if (o.verify && std::memcmp(tx.get(), rx.get(), n) != 0)
            fail("verify", "echoed payload differs from frame " + std::to_string(seq));
    };
    // Stream mode only: answered once the server consumed everything before it.
    auto barrier = [&] {
        c.exchange(empty, nullptr, 0, rhdr, nullptr, 0);
        if (decode_header(rhdr, o.max_frame) != 0)
            fail("bad stream reply", "expected an empty frame");
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

    // Clean close: the server ends the connection once it saw our EOF at a
    // frame boundary, so wait for its EOF (no stray bytes allowed).
    if (::shutdown(c.fd.fd, SHUT_WR) < 0) fail_errno("shutdown");
    for (bool eof = false; !eof;) {
        std::uint8_t b;
        if (recv_some(c.fd.fd, &b, 1, eof, "recv after shutdown") > 0)
            fail("bad echo", "unexpected data after last frame");
        if (!eof) {
            epoll_event ev[4];
            c.ep.wait(ev, 4);
        }
    }

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
    std::printf(
        "epoll_echo: %s %llu frames x %llu B in %.3f s = %.1f MB/s (rss client %s, server %s)\n",
        o.stream ? "stream" : "echo", static_cast<unsigned long long>(o.frames),
        static_cast<unsigned long long>(n), secs, mbps, mib(rss_client).c_str(), srv.c_str());

    if (!o.json_path.empty()) {
        using J = nlohmann::ordered_json;
        J j = {{"schema_version", 1},
               {"tool", {{"name", "epoll_echo"}}},
               {"params",
                {{"mode", o.stream ? "stream" : "echo"},
                 {"frame_bytes", n},
                 {"frames", o.frames},
                 {"transport", tcp ? "tcp" : "unix"},
                 {"warmup_frames", o.warmup}}},
               {"results",
                {{"frames", o.frames},
                 {"bytes", bytes},
                 {"seconds", secs},
                 {"throughput_mbps", mbps},
                 {"errors", 0},
                 {"rss_peak_bytes",
                  {{"client", rss_client}, {"server", rss_server ? J(*rss_server) : J(nullptr)}}},
                 // CPU over the measured span; the server's is read through its
                 // CPU clock (null for an external server).
                 {"cpu",
                  {{"client", {{"total_s", cpu_client ? J(*cpu_client) : J(nullptr)}}},
                   {"server", {{"total_s", cpu_server ? J(*cpu_server) : J(nullptr)}}}}}}}};
        std::ofstream f(o.json_path);
        f << j.dump(2) << '\n';
        f.close();
        if (!f) fail_errno("write " + o.json_path);
    }
    return 0;
}

// ------------------------------------------------------------------- main --

[[noreturn]] void usage() {
    std::fputs(
        "usage: epoll_echo serve --listen HOST:PORT|unix:PATH [--mode echo|stream] [--one-off]\n"
        "                  [--max-frame SIZE]\n"
        "       epoll_echo bench [HOST:PORT|unix:PATH] [--mode echo|stream] --frame-size SIZE\n"
        "                  --frames N [--warmup-frames W] [--json FILE] [--verify]\n"
        "                  [--transport tcp|unix] [--max-frame SIZE]\n",
        stderr);
    std::exit(2);
}

int run(int argc, char** argv) {
    if (argc < 2) usage();
    const std::string cmd = argv[1];
    std::vector<std::string> args(argv + 2, argv + argc);
    BenchOpts b;
    std::string listen;
    bool one_off = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string a = args[i], val;
        const auto eq = a.find('=');
        const bool inline_val = a.rfind("--", 0) == 0 && eq != std::string::npos;
        if (inline_val) {
            val = a.substr(eq + 1);
            a = a.substr(0, eq);
        }
        auto value = [&]() -> std::string {
            if (inline_val) return val;
            if (i + 1 >= args.size()) fail("option " + a, "missing value");
            return args[++i];
        };
        if (a == "--max-frame")
            b.max_frame = parse_size(value());
        else if (a == "--mode") {
            const std::string m = value();
            if (m != "echo" && m != "stream") fail("--mode " + m, "expected echo or stream");
            b.stream = m == "stream";
        } else if (cmd == "serve" && a == "--listen")
            listen = value();
        else if (cmd == "serve" && a == "--one-off")
            one_off = true;
        else if (cmd == "bench" && a == "--frame-size") {
            b.frame_size = parse_size(value());
            b.have_size = true;
        } else if (cmd == "bench" && a == "--frames") {
            b.frames = parse_size(value());
            b.have_frames = true;
        } else if (cmd == "bench" && a == "--warmup-frames")
            b.warmup = parse_size(value());
        else if (cmd == "bench" && a == "--json")
            b.json_path = value();
        else if (cmd == "bench" && a == "--verify")
            b.verify = true;
        else if (cmd == "bench" && a == "--transport") {
            b.transport = value();
            b.transport_given = true;
            if (b.transport != "tcp" && b.transport != "unix")
                fail("--transport " + b.transport, "expected tcp or unix");
        } else if (cmd == "bench" && a.rfind("--", 0) != 0 && !b.addr)
            b.addr = a;
        else
            fail("bad argument '" + a + "'", "see usage");
    }
    if (cmd == "serve") {
        if (listen.empty()) fail("serve", "--listen is required");
        const Address addr = parse_address(listen);
        Fd lfd = open_socket(addr, /*listening=*/true);
        serve(lfd.fd, !addr.unix_socket, b.stream, b.max_frame, one_off);
        return 0;
    }
    if (cmd != "bench") usage();
    if (!b.have_size || !b.have_frames) fail("bench", "--frame-size and --frames are required");
    if (b.frames == 0) fail("bench", "--frames must be at least 1");
    if (b.frame_size > b.max_frame) fail("bench", "--frame-size exceeds --max-frame");
    if (b.stream && b.frame_size == 0)
        fail("bench", "--mode stream needs --frame-size of at least 1");
    if (b.stream && b.verify)
        fail("bench", "--verify needs --mode echo (a stream server keeps no copy)");
    return run_bench(b);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const Error& e) {
        std::fprintf(stderr, "epoll_echo: %s\n", e.what());
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "epoll_echo: allocate buffers: %s\n", std::strerror(ENOMEM));
    }
    g_server.cleanup();
    return 1;
}
