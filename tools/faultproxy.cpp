// ringxfer-faultproxy: a TCP relay that injects connection faults, for tests
// and for trying ringxfer against a bad network by hand (docs/cli.md).
//
// Each accepted client gets its own connection to the upstream; bytes are
// relayed both ways through a bounded buffer per direction (a full buffer
// stops reading: back-pressure, nothing is dropped). Faults apply to the
// chosen direction(s) and count bytes per connection and direction:
// pieces of at most --split bytes, --delay between pieces, one --stall after
// --stall-after bytes, a reset (RST on both sides) or a truncation (clean FIN
// on both sides) after exactly N bytes. Half-closes are relayed as such.
//
// One thread, one poll loop, non-blocking sockets. The bound port is printed
// on stdout (one line) once the proxy listens; SIGTERM/SIGINT end it cleanly.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <list>
#include <optional>
#include <string>
#include <vector>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/socket.hpp"
#include "units.hpp"

namespace {

using namespace ringxfer;
using Clock = std::chrono::steady_clock;
using engine::Fd;

constexpr std::size_t kBufferBytes = 256 * 1024;  // per connection and direction

struct Faults {
    std::size_t split = 0;  // 0: whole buffer per write
    Clock::duration delay{};
    std::optional<std::uint64_t> stall_after;
    Clock::duration stall{};
    std::optional<std::uint64_t> reset_after;
    std::optional<std::uint64_t> truncate_after;
    bool up = true, down = true;
};

/// One direction of a connection: bytes read from `from`, written to `to`.
struct Pipe {
    const char* name;  // "up" (client -> upstream) or "down"
    bool faulty = false;
    std::vector<std::byte> buf = std::vector<std::byte>(kBufferBytes);
    std::size_t begin = 0, end = 0;
    std::uint64_t relayed = 0;
    Clock::time_point ready_at{};  // next piece not before (delay, stall)
    bool stalled = false;          // the one stall happened
    bool eof = false;              // `from` sent FIN
    bool shut = false;             // FIN relayed to `to`
    bool blocked = false;          // last write hit EAGAIN

    std::size_t pending() const { return end - begin; }
    bool wants_read() const { return !eof && end < buf.size(); }
    /// After a write: reclaim the space already sent, so reading resumes.
    void consumed(std::size_t n) {
        begin += n;
        if (begin == end) {
            begin = end = 0;
        } else if (begin >= buf.size() / 2) {  // amortised: at most one move per half buffer
            std::memmove(buf.data(), buf.data() + begin, end - begin);
            end -= begin;
            begin = 0;
        }
    }
};

struct Session {
    unsigned id;
    std::string peer;
    Fd client, upstream;
    bool connecting = true;
    bool draining = false;  // truncated: discarding until both peers close
    Clock::time_point drain_deadline{};
    Pipe up{"up"}, down{"down"};
    bool done = false;
};

struct Stats {
    std::uint64_t sessions = 0, up_bytes = 0, down_bytes = 0, writes = 0, resets = 0, truncations = 0;
};

class Proxy {
public:
    Proxy(Fd listener, engine::SockAddr upstream, Faults faults, bool quiet)
        : listener_(std::move(listener)), upstream_(upstream), faults_(faults), quiet_(quiet) {}

    Stats run(int signal_fd);

private:
    void log(const Session& s, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
    void accept_all();
    void on_connected(Session& s);
    void read_into(Session& s, Pipe& p, int from);
    void pump(Session& s, Pipe& p, int to, Clock::time_point now);
    void reset(Session& s, const char* why);
    void truncate(Session& s, Pipe& p);
    void drain(Session& s, int fd, bool& eof);
    void finish(Session& s);

    Fd listener_;
    engine::SockAddr upstream_;
    Faults faults_;
    bool quiet_;
    std::list<Session> sessions_;
    Stats stats_;
    unsigned next_id_ = 1;
};

void Proxy::log(const Session& s, const char* fmt, ...) {
    if (quiet_) return;
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "faultproxy: #%u %s: %s\n", s.id, s.peer.c_str(), line);
}

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

/// close() with SO_LINGER {1, 0}: the peer gets an RST, not a FIN.
void close_with_rst(Fd& fd) {
    if (!fd) return;
    linger l{1, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &l, sizeof l);
    fd.reset();
}

void Proxy::accept_all() {
    for (;;) {
        int c = ::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                std::fprintf(stderr, "faultproxy: accept: %s\n", std::strerror(errno));
            return;
        }
        Session& s = sessions_.emplace_back();
        s.id = next_id_++;
        s.client = Fd(c);
        s.peer = engine::peer_name(c);
        s.up.faulty = faults_.up;
        s.down.faulty = faults_.down;
        stats_.sessions++;
        int u = ::socket(upstream_.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (u < 0 || (::connect(u, upstream_.get(), upstream_.len) != 0 && errno != EINPROGRESS)) {
            log(s, "cannot connect upstream: %s", std::strerror(errno));
            if (u >= 0) ::close(u);
            close_with_rst(s.client);
            s.done = true;
            continue;
        }
        s.upstream = Fd(u);
    }
}

void Proxy::on_connected(Session& s) {
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(s.upstream.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
        log(s, "cannot connect upstream: %s", std::strerror(err));
        close_with_rst(s.client);
        s.upstream.reset();
        s.done = true;
        return;
    }
    s.connecting = false;
    int one = 1;
    if (upstream_.family() != AF_UNIX)
        ::setsockopt(s.upstream.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(s.client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    log(s, "connected upstream");
}

void Proxy::read_into(Session& s, Pipe& p, int from) {
    if (s.done || !p.wants_read()) return;
    ssize_t n = ::read(from, p.buf.data() + p.end, p.buf.size() - p.end);
    if (n > 0) {
        p.end += static_cast<std::size_t>(n);
    } else if (n == 0) {
        p.eof = true;
    } else if (errno != EAGAIN && errno != EINTR) {
        char why[96];
        std::snprintf(why, sizeof why, "%s read failed: %s", p.name, std::strerror(errno));
        reset(s, why);
    }
}

/// Writes what is due in `p`, applying the faults; acts on reset/truncate
/// limits as soon as they are reached.
void Proxy::pump(Session& s, Pipe& p, int to, Clock::time_point now) {
    while (!s.done && !s.draining) {
        if (p.faulty && faults_.reset_after && p.relayed >= *faults_.reset_after) {
            char why[96];
            std::snprintf(why, sizeof why, "reset after %llu bytes %s (--reset-after)",
                          static_cast<unsigned long long>(p.relayed), p.name);
            stats_.resets++;
            return reset(s, why);
        }
        if (p.faulty && faults_.truncate_after && p.relayed >= *faults_.truncate_after)
            return truncate(s, p);
        if (p.pending() == 0) break;
        if (p.faulty && faults_.stall_after && !p.stalled && p.relayed >= *faults_.stall_after) {
            p.stalled = true;
            p.ready_at = std::max(p.ready_at, now + faults_.stall);
            log(s, "stalling %s after %llu bytes", p.name,
                static_cast<unsigned long long>(p.relayed));
        }
        if (now < p.ready_at) return;
        std::size_t n = p.pending();
        if (p.faulty) {
            if (faults_.split) n = std::min(n, faults_.split);
            for (const auto& limit : {faults_.reset_after, faults_.truncate_after,
                                      p.stalled ? std::nullopt : faults_.stall_after})
                if (limit && *limit > p.relayed) n = std::min<std::uint64_t>(n, *limit - p.relayed);
        }
        ssize_t w = ::send(to, p.buf.data() + p.begin, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                p.blocked = true;
                return;
            }
            char why[96];
            std::snprintf(why, sizeof why, "%s write failed: %s", p.name, std::strerror(errno));
            return reset(s, why);
        }
        p.blocked = false;
        stats_.writes++;
        p.consumed(static_cast<std::size_t>(w));
        p.relayed += static_cast<std::uint64_t>(w);
        (&p == &s.up ? stats_.up_bytes : stats_.down_bytes) += static_cast<std::uint64_t>(w);
        if (p.faulty && faults_.delay.count() > 0) p.ready_at = now + faults_.delay;
    }
    if (!s.done && !s.draining && p.eof && p.pending() == 0 && !p.shut) {
        p.shut = true;
        ::shutdown(to, SHUT_WR);  // relay the half-close
    }
}

void Proxy::reset(Session& s, const char* why) {
    log(s, "%s: resetting both sides", why);
    close_with_rst(s.client);
    close_with_rst(s.upstream);
    s.done = true;
}

/// Clean close (FIN) to both peers; whatever they still send is read and
/// dropped so the kernel does not turn our close into an RST.
void Proxy::truncate(Session& s, Pipe& p) {
    log(s, "truncated after %llu bytes %s (--truncate-after): closing both sides",
        static_cast<unsigned long long>(p.relayed), p.name);
    stats_.truncations++;
    ::shutdown(s.client.get(), SHUT_WR);
    ::shutdown(s.upstream.get(), SHUT_WR);
    s.draining = true;
    s.drain_deadline = Clock::now() + std::chrono::seconds(10);
    if (s.up.eof && s.down.eof) finish(s);
}

void Proxy::drain(Session& s, int fd, bool& eof) {
    std::byte scratch[16384];
    ssize_t n = ::read(fd, scratch, sizeof scratch);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) eof = true;
    if (s.up.eof && s.down.eof) finish(s);
}

void Proxy::finish(Session& s) {
    log(s, "closed (%llu bytes up, %llu down)", static_cast<unsigned long long>(s.up.relayed),
        static_cast<unsigned long long>(s.down.relayed));
    s.client.reset();
    s.upstream.reset();
    s.done = true;
}

Stats Proxy::run(int signal_fd) {
    std::vector<pollfd> fds;
    for (;;) {
        auto now = Clock::now();
        fds.clear();
        fds.push_back({signal_fd, POLLIN, 0});
        fds.push_back({listener_.get(), POLLIN, 0});
        Clock::time_point wake = Clock::time_point::max();
        for (auto& s : sessions_) {
            short ce = 0, ue = 0;
            if (s.connecting) {
                ue = POLLOUT;
            } else if (s.draining) {
                if (!s.up.eof) ce = POLLIN;
                if (!s.down.eof) ue = POLLIN;
                wake = std::min(wake, s.drain_deadline);
            } else {
                if (s.up.wants_read()) ce |= POLLIN;
                if (s.down.wants_read()) ue |= POLLIN;
                for (auto [p, ev] : {std::pair{&s.up, &ue}, std::pair{&s.down, &ce}}) {
                    if (p->pending() == 0) continue;
                    if (p->blocked) *ev |= POLLOUT;
                    else wake = std::min(wake, p->ready_at);
                }
            }
            // fd -1: poll ignores it (and its POLLHUP) while nothing is wanted.
            fds.push_back({ce ? s.client.get() : -1, ce, 0});
            fds.push_back({ue ? s.upstream.get() : -1, ue, 0});
        }
        int timeout = -1;
        if (wake != Clock::time_point::max())
            timeout = wake <= now ? 0
                                  : static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(
                                                         wake - now)
                                                         .count());
        if (::poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR)
            throw engine::Error(errno, engine::errno_message("poll failed", errno));
        if (fds[0].revents) break;  // SIGTERM/SIGINT
        if (fds[1].revents) accept_all();
        now = Clock::now();
        std::size_t i = 2;
        for (auto& s : sessions_) {
            if (i + 1 >= fds.size()) break;  // accepted in this round: next time
            short cr = fds[i++].revents, ur = fds[i++].revents;
            if (s.done) continue;
            if (s.connecting) {
                if (ur) on_connected(s);
                continue;
            }
            if (s.draining) {
                if (cr) drain(s, s.client.get(), s.up.eof);
                if (ur && !s.done) drain(s, s.upstream.get(), s.down.eof);
                if (!s.done && now >= s.drain_deadline) reset(s, "peers still open 10 s after the truncation");
                continue;
            }
            if (cr & (POLLIN | POLLHUP | POLLERR)) read_into(s, s.up, s.client.get());
            if (ur & (POLLIN | POLLHUP | POLLERR)) read_into(s, s.down, s.upstream.get());
            pump(s, s.up, s.upstream.get(), now);
            pump(s, s.down, s.client.get(), now);
            if (!s.done && !s.draining && s.up.shut && s.down.shut) finish(s);
        }
        sessions_.remove_if([](const Session& s) { return s.done; });
    }
    for (auto& s : sessions_) finish(s);
    sessions_.clear();
    return stats_;
}

std::optional<std::uint64_t> size_option(const std::string& text, const char* what) {
    if (text.empty()) return std::nullopt;
    auto v = tools::parse_size(text);
    if (!v) throw CLI::ValidationError(what, "'" + text + "' is not a size (e.g. 100, 64Ki, 1M)");
    return v;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"ringxfer-faultproxy: relays TCP connections to an upstream and injects faults "
                 "(tiny writes, delays, stalls, resets, truncations).\n\nPrints the bound port "
                 "on stdout; SIGTERM/SIGINT stop it.",
                 "ringxfer-faultproxy"};
    std::string listen = "127.0.0.1:0", upstream, split, stall_after, reset_after, truncate_after;
    double delay_ms = 0, stall_ms = 0;
    std::string dir = "both";
    bool quiet = false;
    app.add_option("--listen,-l", listen, "HOST:PORT to listen on (port 0: any free port)")
        ->capture_default_str();
    app.add_option("--upstream,-u", upstream, "HOST:PORT to relay to")->required();
    app.add_option("--split", split, "write at most this many bytes at a time");
    app.add_option("--delay", delay_ms, "milliseconds to wait between pieces")
        ->check(CLI::NonNegativeNumber);
    app.add_option("--stall-after", stall_after, "stall once after this many bytes");
    app.add_option("--stall", stall_ms, "milliseconds of that stall")->check(CLI::NonNegativeNumber);
    app.add_option("--reset-after", reset_after,
                   "after this many bytes, reset both sides (RST, SO_LINGER 0)");
    app.add_option("--truncate-after", truncate_after,
                   "after this many bytes, close both sides cleanly (FIN)");
    app.add_option("--dir", dir, "direction(s) the faults apply to: up (client to upstream), "
                                 "down, both")
        ->check(CLI::IsMember({"up", "down", "both"}))
        ->capture_default_str();
    app.add_flag("--quiet,-q", quiet, "no per-connection log lines");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 2;
    }

    try {
        Faults f;
        f.split = size_option(split, "--split").value_or(0);
        f.delay = std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double, std::milli>(delay_ms));
        f.stall_after = size_option(stall_after, "--stall-after");
        f.stall = std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double, std::milli>(stall_ms));
        f.reset_after = size_option(reset_after, "--reset-after");
        f.truncate_after = size_option(truncate_after, "--truncate-after");
        f.up = dir != "down";
        f.down = dir != "up";
        if (f.stall_after.has_value() != (stall_ms > 0))
            throw CLI::ValidationError("--stall", "--stall-after and --stall go together");

        engine::Endpoint up = engine::Endpoint::parse(upstream);
        engine::Endpoint ep = engine::Endpoint::parse(listen);
        if (ep.kind != engine::Endpoint::Kind::tcp || up.kind != engine::Endpoint::Kind::tcp)
            throw CLI::ValidationError("--listen/--upstream", "TCP addresses only");
        engine::SockAddr target = engine::resolve(up);
        Fd listener = engine::listen_on(ep);
        set_nonblocking(listener.get());

        // Signals arrive on a descriptor in the poll set: no race with poll().
        sigset_t mask;
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        ::sigprocmask(SIG_BLOCK, &mask, nullptr);
        Fd sigfd(::signalfd(-1, &mask, SFD_CLOEXEC));
        if (!sigfd) throw engine::Error(errno, engine::errno_message("signalfd failed", errno));

        std::printf("%u\n", engine::local_endpoint(listener.get(), ep.kind).port);
        std::fflush(stdout);
        Proxy proxy(std::move(listener), target, f, quiet);
        Stats s = proxy.run(sigfd.get());
        std::fprintf(stderr,
                     "faultproxy: %llu connections, %llu bytes up, %llu bytes down, %llu writes, "
                     "%llu resets, %llu truncations\n",
                     static_cast<unsigned long long>(s.sessions),
                     static_cast<unsigned long long>(s.up_bytes),
                     static_cast<unsigned long long>(s.down_bytes),
                     static_cast<unsigned long long>(s.writes),
                     static_cast<unsigned long long>(s.resets),
                     static_cast<unsigned long long>(s.truncations));
        return 0;
    } catch (const CLI::ValidationError& e) {
        std::fprintf(stderr, "ringxfer-faultproxy: %s\n", e.what());
        return 2;
    } catch (const engine::Error& e) {
        std::fprintf(stderr, "ringxfer-faultproxy: %s\n", e.what());
        return 1;
    }
}
