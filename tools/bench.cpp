#include "bench.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sched.h>

#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>
#include <thread>

#include "client.hpp"
#include "control.hpp"
#include "histogram.hpp"
#include "pattern.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/proto/errors.hpp"
#include "server.hpp"
#include "units.hpp"

namespace ringxfer::tools {
namespace {


std::string cpu_model() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
        if (line.rfind("model name", 0) == 0) {
            auto pos = line.find(':');
            return pos == std::string::npos ? line : line.substr(pos + 2);
        }
    }
    return "unknown";
}

std::string kernel_release() {
    utsname u{};
    ::uname(&u);
    return u.release;
}

/// Anonymous memory of this process backed by transparent huge pages
/// (AnonHugePages in /proc/self/smaps_rollup), 0 when unknown.
std::size_t anon_huge_page_bytes() {
    std::ifstream in("/proc/self/smaps_rollup");
    std::string line;
    while (std::getline(in, line)) {
        if (line.rfind("AnonHugePages:", 0) == 0)
            return std::strtoull(line.c_str() + 14, nullptr, 10) * 1024;  // kB
    }
    return 0;
}

std::size_t page_offset_for(const BenchOptions& o, engine::Endpoint::Kind kind) {
    return o.page_offset >= 0 ? static_cast<std::size_t>(o.page_offset)
                              : proto::payload_page_offset(kind == engine::Endpoint::Kind::tcp);
}

struct ServerChild {
    pid_t pid = -1;
    engine::Endpoint address;
    std::string unix_path;
};

/// Binds a free loopback port (or a fresh unix path) *before* forking, so
/// the client can connect at once with no race, then serves one connection
/// in the child on its own ring.
/// Pins the calling thread to `cpu` (modulo the CPUs this process may use).
void pin_to_cpu(unsigned cpu) {
    cpu_set_t allowed;
    if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    if (cpus.size() < 2) return;  // nothing to separate
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus[cpu % cpus.size()], &one);
    ::sched_setaffinity(0, sizeof one, &one);
}

/// --pin: the server gets the last CPU, client threads share the others.
unsigned server_cpu() { return std::max(2u, std::thread::hardware_concurrency()) - 1; }
unsigned client_cpu(std::size_t thread) {
    unsigned n = std::max(2u, std::thread::hardware_concurrency()) - 1;
    return static_cast<unsigned>(thread % n);
}

ServerChild start_server_child(const BenchOptions& o) {
    ServerChild child;
    engine::Endpoint ep;
    if (o.transport == "unix" || o.transport == "shm") {
        ep.kind = o.transport == "shm" ? engine::Endpoint::Kind::shm
                                       : engine::Endpoint::Kind::unix_socket;
        ep.path = "/tmp/ringxfer-bench-" + std::to_string(::getpid()) + ".sock";
        child.unix_path = ep.path;
    } else {
        ep = engine::Endpoint::parse("127.0.0.1:0");
    }
    engine::Fd listener = engine::listen_on(ep);
    child.address = engine::local_endpoint(listener.get(), ep.kind);
    std::fflush(nullptr);
    child.pid = ::fork();
    if (child.pid < 0) throw engine::Error(errno, engine::errno_message("fork failed", errno));
    if (child.pid == 0) {
        int code = kExitOk;
        if (o.pin) pin_to_cpu(server_cpu());
        try {
            auto driver = engine::make_driver(o.backend, o.ring);
            engine::PoolOptions po;
            po.budget_bytes = o.pool_budget;
            po.max_buffer_bytes = std::max<std::size_t>(o.reader.max_frame, 64 * 1024);
            po.register_buffers = o.register_buffers;
            po.huge_pages = o.huge_pages;
            po.page_offset = page_offset_for(o, ep.kind);
            po.shared_memory = ep.kind == engine::Endpoint::Kind::shm;
            engine::BufferPool pool(driver->ring(), po);
            ServeOptions so;
            so.one_off = true;
            so.quiet = o.quiet;
            so.store_and_forward = o.server_store_and_forward;
            so.auth_key = o.auth_key;
            so.reader = o.reader;
            so.writer = o.writer;
            so.stream = o.stream;
            so.tuning = o.tuning;
            std::atomic<bool> stop{false};
            Server server(*driver, pool, std::move(listener), so);
            ServeSummary s = server.run(stop);
            if (s.errors) code = kExitFailure;
        } catch (const engine::Error& e) {
            std::fprintf(stderr, "ringxfer bench (server): %s\n", e.what());
            code = e.code() == ENOSYS || e.code() == EPERM || e.code() == EOPNOTSUPP ? kExitNoUring
                                                                                   : kExitFailure;
        }
        std::fflush(nullptr);
        ::_exit(code);
    }
    return child;
}

/// Waits for the server child (bounded), returns its exit code and rusage.
int reap_child(pid_t pid, rusage& ru) {
    int status = 0;
    for (int i = 0; i < 100; ++i) {
        pid_t r = ::wait4(pid, &status, WNOHANG, &ru);
        if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ::kill(pid, SIGKILL);
    ::wait4(pid, &status, 0, &ru);
    return 128 + SIGKILL;
}

double finite(double v) { return std::isfinite(v) ? v : 0.0; }

double mbps(std::uint64_t bytes, double seconds) {
    return seconds > 0 ? finite(static_cast<double>(bytes) / 1e6 / seconds) : 0.0;
}

/// Raises RLIMIT_NOFILE to what `connections` need (two fds each for a
/// self-started server, plus slack), up to the hard limit. Returns an error
/// message when the hard limit is too low.
std::string raise_nofile(std::uint64_t connections, bool self_started) {
    rlimit lim{};
    if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return {};
    rlim_t need = connections * (self_started ? 2 : 1) + 64;
    if (lim.rlim_cur >= need) return {};
    if (lim.rlim_max != RLIM_INFINITY && lim.rlim_max < need) {
        return "--connections " + std::to_string(connections) + " needs " + std::to_string(need) +
               " file descriptors but the hard limit (ulimit -Hn) is " +
               std::to_string(lim.rlim_max) +
               "; raise it (ulimit -n, LimitNOFILE= in systemd) or use fewer connections";
    }
    lim.rlim_cur = need;
    if (::setrlimit(RLIMIT_NOFILE, &lim) != 0)
        return std::string("cannot raise RLIMIT_NOFILE: ") + std::strerror(errno);
    return {};
}

/// Everything one worker thread owns: its driver, pool and connections.
struct Worker {
    std::vector<std::shared_ptr<ClientConnection>> conns;
    std::string error;  // set-up failure (connect, io_uring)
    int error_code = 0;  // its errno
    std::string backend = "none";
    std::string setup_flags = "none";
    bool restricted = false;
    bool send_zc_available = false;
    engine::PoolStats pool;
    std::size_t huge_page_bytes = 0;  // the process's, with this worker's pool alive
    int socket_sndbuf = 0;  // SO_SNDBUF of its first connection as the kernel reports it
    Histogram latency_ns;   // echo round trips of its connections
    LatencyLog latency_log;  // the same, one by one (--latency-log)
    std::atomic<bool> conns_ready{false};  // conns is complete and may be read
    std::atomic<bool> exited{false};
};

void run_worker(Worker& w, const BenchOptions& o, const engine::Endpoint& target,
                const TestSpec& spec, RunState& run, std::vector<std::size_t> indexes,
                std::atomic<bool>& abort) {
    // Thread t serves connections t, t + T, ...: its first index is t.
    if (o.pin && !indexes.empty()) pin_to_cpu(client_cpu(indexes.front()));
    try {
        auto driver = engine::make_driver(o.backend, o.ring, [&](std::string_view msg) {
            if (indexes.empty() || indexes.front() == 0)  // say it once, not per thread
                std::fprintf(stderr, "ringxfer: warning: %.*s\n", static_cast<int>(msg.size()),
                             msg.data());
        });
        w.backend = driver->backend_name();
        if (engine::Ring* ring = driver->ring()) {
            w.setup_flags = ring->features().setup_flags_string();
            w.restricted = ring->features().restricted;
            w.send_zc_available = ring->features().op_send_zc;
        }
        engine::PoolOptions po;
        po.budget_bytes = o.pool_budget;
        po.max_buffer_bytes =
            std::max<std::size_t>({o.reader.max_frame, o.frame_size, 64 * 1024});
        po.register_buffers = o.register_buffers;
        po.huge_pages = o.huge_pages;
        po.page_offset = page_offset_for(o, target.kind);
        const bool shm = target.kind == engine::Endpoint::Kind::shm;
        po.shared_memory = shm;
        {
            engine::BufferPool pool(driver->ring(), po);
            // Over shm a payload in the shared pool is sent by reference
            // (zero copies); one from other memory is copied in once, as
            // every other transport's send copies it. --fill-in-place says
            // the application builds its frames in the shared pool.
            std::optional<engine::BufferPool> source;
            if (shm && !o.fill_in_place) {
                engine::PoolOptions plain = po;
                plain.shared_memory = false;
                plain.register_buffers = false;
                source.emplace(driver->ring(), plain);
            }
            // What this thread's connections send (views of it), filled once.
            proto::Frame pattern;
            if (!spec.stamps_echoes()) {
                if (int ret = proto::Frame::allocate(source ? *source : pool, spec.frame_bytes, pattern);
                    ret < 0)
                    throw engine::Error(-ret, engine::errno_message(
                                                  "cannot lease the send buffer (raise --pool-budget?)", ret));
                fill_pattern(pattern.mutable_payload(), kPatternSeed);
            }
            // Connect all of this thread's connections, then start them.
            std::size_t pending = indexes.size();
            std::string connect_error;
            std::vector<engine::Fd> fds(indexes.size());
            for (std::size_t k = 0; k < indexes.size(); ++k) {
                driver->async_connect(target, [&, k](engine::Fd f, int err) {
                    if (err < 0 && connect_error.empty())
                        connect_error = "cannot connect to " + target.to_string() + ": " +
                                        std::strerror(-err);
                    fds[k] = std::move(f);
                    --pending;
                });
            }
            if (!engine::run_until(*driver, [&] { return pending == 0 || abort.load(); },
                                   std::chrono::seconds(10)))
                throw engine::Error(ETIMEDOUT, "cannot connect to " + target.to_string() +
                                                   ": timed out after 10 s");
            if (!connect_error.empty()) throw engine::Error(ECONNREFUSED, connect_error);
            for (std::size_t k = 0; k < indexes.size(); ++k) {
                engine::tune_socket(fds[k].get(), o.tuning);
                if (k == 0) {
                    socklen_t len = sizeof w.socket_sndbuf;
                    ::getsockopt(fds[k].get(), SOL_SOCKET, SO_SNDBUF, &w.socket_sndbuf, &len);
                }
                w.conns.push_back(std::make_shared<ClientConnection>(
                    *driver, pool, std::move(fds[k]), spec, indexes[k], run, o.reader, o.writer,
                    o.stream, w.latency_ns, w.latency_log, proto::Frame(pattern.lease().share())));
            }
            w.conns_ready.store(true, std::memory_order_release);
            for (auto& c : w.conns) c->start();
            engine::run_until(*driver, [&] {
                if (abort.load())
                    for (auto& c : w.conns) c->abort_if_running("aborted: another connection failed");
                if (o.auth_key)  // run_until looks at least every 200 ms
                    for (auto& c : w.conns) c->check_auth_deadline(Clock::now());
                return std::all_of(w.conns.begin(), w.conns.end(),
                                   [](auto& c) { return c->done(); });
            });
            while (driver->in_flight() > 0) driver->run_once(1, std::chrono::milliseconds(100));
            for (auto& c : w.conns) c->release_resources();
            w.pool = pool.stats();
            w.huge_page_bytes = anon_huge_page_bytes();
        }
    } catch (const engine::Error& e) {
        w.error = e.what();
        w.error_code = e.code();
    }
    w.exited.store(true);
    run.notify();
}

std::string bar(double fraction) {
    int n = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * 30);
    return "[" + std::string(static_cast<std::size_t>(n), '#') +
           std::string(static_cast<std::size_t>(30 - n), ' ') + "]";
}

}  // namespace

std::uint64_t effective_window(const std::string& mode, std::uint64_t frame_size,
                               std::uint64_t window) {
    if (window != 0) return window;
    if (mode == "echo") return 1;
    constexpr std::uint64_t kQueued = 8 << 20;
    std::uint64_t w = (kQueued + std::max<std::uint64_t>(frame_size, 1) - 1) /
                      std::max<std::uint64_t>(frame_size, 1);
    return std::clamp<std::uint64_t>(w, 2, 4096);
}

std::chrono::microseconds busy_poll_for(std::size_t client_threads, bool self_started_server,
                                        unsigned cpus) {
    std::size_t pollers = client_threads + (self_started_server ? 1 : 0);
    return pollers <= cpus ? std::chrono::microseconds(50) : std::chrono::microseconds(0);
}

int run_bench(const BenchOptions& opts) {
    BenchOptions o = opts;
    o.window = effective_window(o.mode, o.frame_size, o.window);
    TestMode mode;
    if (!parse_test_mode(o.mode, mode)) {
        std::fprintf(stderr, "ringxfer bench: unknown mode '%s' (echo, stream, reverse, bidir)\n",
                     o.mode.c_str());
        return kExitUsage;
    }
    if (o.connections == 0 || o.threads == 0 || (o.frames == 0 && o.seconds <= 0)) {
        std::fprintf(stderr, "ringxfer bench: --connections, --threads and --frames "
                             "(or --time) must be at least 1\n");
        return kExitUsage;
    }
    ::signal(SIGPIPE, SIG_IGN);
    if (std::string why = raise_nofile(o.connections, !o.address); !why.empty()) {
        std::fprintf(stderr, "ringxfer bench: %s\n", why.c_str());
        return kExitUsage;
    }
    const bool time_limited = o.seconds > 0;
    const std::size_t threads = std::min<std::size_t>(o.threads, o.connections);
    if (o.busy_poll_auto)
        o.ring.busy_poll = busy_poll_for(threads, !o.address, std::thread::hardware_concurrency());

    ServerChild child;
    engine::Endpoint target;
    try {
        if (o.address) {
            target = *o.address;
        } else {
            child = start_server_child(o);
            target = child.address;
        }
    } catch (const engine::Error& e) {
        std::fprintf(stderr, "ringxfer bench: %s\n", e.what());
        return kExitFailure;
    }

    TestSpec spec;
    spec.mode = mode;
    spec.frame_bytes = o.frame_size;
    spec.frames = time_limited ? 0 : o.frames;
    spec.window = o.window;
    spec.warmup_frames = o.warmup_frames;
    spec.verify = o.verify;
    spec.fill_in_place = o.fill_in_place;
    spec.auth_key = o.auth_key;
    spec.connections = o.connections;
    RunState run(o.connections, std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(o.warmup_seconds)));

    using nlohmann::json;
    const bool tty = ::isatty(STDERR_FILENO) && !o.quiet && !time_limited;
    auto emit = [&](const json& j) {
        if (o.json_stream) {
            std::printf("%s\n", j.dump().c_str());
            std::fflush(stdout);
        }
    };
    json params = {{"mode", o.mode},
                   {"frame_bytes", o.frame_size},
                   {"frames", time_limited ? json(nullptr) : json(o.frames)},
                   {"time_s", time_limited ? json(o.seconds) : json(nullptr)},
                   {"warmup_s", o.warmup_seconds},
                   {"warmup_frames", o.warmup_frames},
                   {"connections", o.connections},
                   {"threads", threads},
                   {"window", o.window},
                   {"pin", o.pin},
                   {"huge_pages", o.huge_pages},
                   {"page_offset_bytes", page_offset_for(o, target.kind)},
                   {"interval_s", o.interval_seconds},
                   {"transport", target.kind == engine::Endpoint::Kind::unix_socket ? "unix"
                                 : target.kind == engine::Endpoint::Kind::shm   ? "shm"
                                                                                : "tcp"},
                   {"address", target.to_string()},
                   {"self_started_server", !o.address},
                   {"server_echo", o.address ? json(nullptr)
                                             : json(o.server_store_and_forward ? "store-and-forward"
                                                                               : "cut-through")},
                   {"verify", o.verify},
                   {"backend_requested", o.backend == engine::Backend::automatic ? "auto"
                                         : o.backend == engine::Backend::uring   ? "uring"
                                                                                 : "epoll"},
                   {"max_frame_bytes", o.reader.max_frame},
                   {"zerocopy_threshold_bytes", o.stream.zerocopy_threshold},
                   {"ring", o.ring.sqpoll ? "sqpoll" : o.ring.defer_taskrun ? "defer" : "coop"},
                   {"rcvlowat_bytes", o.stream.rcvlowat_max},
                   {"inline_send_bytes", o.stream.inline_send_max},
                   {"sndbuf", o.tuning.send_buffer > 0          ? json(o.tuning.send_buffer)
                              : o.tuning.local_send_buffer > 0 ? json("auto")
                                                               : json(0)},
                   {"rcvbuf_bytes", o.tuning.recv_buffer},
                   {"busy_poll_us", o.ring.busy_poll.count()}};
    if (!o.quiet)
        std::fprintf(stderr,
                     "ringxfer bench: %s, %s frames, %llu connection%s on %zu thread%s, window %llu, "
                     "%s to %s%s\n",
                     o.mode.c_str(), format_bytes(o.frame_size).c_str(),
                     static_cast<unsigned long long>(o.connections), o.connections == 1 ? "" : "s",
                     threads, threads == 1 ? "" : "s", static_cast<unsigned long long>(o.window),
                     time_limited ? (std::to_string(o.seconds) + " s").c_str()
                                  : (std::to_string(o.frames) + " frames each").c_str(),
                     target.to_string().c_str(), o.address ? "" : " (self-started server)");
    emit({{"event", "start"}, {"params", params}});

    // Workers: connections spread round-robin over the threads.
    std::vector<std::unique_ptr<Worker>> workers;
    std::vector<std::thread> pool_threads;
    std::atomic<bool> abort{false};
    for (std::size_t t = 0; t < threads; ++t) {
        workers.push_back(std::make_unique<Worker>());
        if (!o.latency_log_path.empty()) workers.back()->latency_log.enable();
    }
    for (std::size_t t = 0; t < threads; ++t) {
        std::vector<std::size_t> idx;
        for (std::size_t c = t; c < o.connections; c += threads) idx.push_back(c);
        pool_threads.emplace_back(run_worker, std::ref(*workers[t]), std::cref(o),
                                  std::cref(target), std::cref(spec), std::ref(run), idx,
                                  std::ref(abort));
    }

    // Reporting loop: intervals, the time limit, progress.
    auto sum = [&](auto&& pick) {
        std::uint64_t total = 0;
        for (auto& w : workers)
            if (w->conns_ready.load(std::memory_order_acquire))
                for (auto& c : w->conns) total += pick(c->counters);
        return total;
    };
    const bool count_tx = o.mode == "stream" || o.mode == "bidir";
    const bool count_rx = o.mode != "stream";
    auto measured_bytes = [&] {
        return sum([&](ConnCounters& k) {
            return (count_tx ? k.bytes_tx.load() : 0) + (count_rx ? k.bytes_rx.load() : 0);
        });
    };
    auto measured_frames = [&] {
        return sum([&](ConnCounters& k) {
            return (count_tx ? k.frames_tx.load() : 0) + (count_rx ? k.frames_rx.load() : 0);
        });
    };
    json intervals = json::array();
    ProcessUsage cpu_start, cpu_end;
    bool started = false;
    Clock::time_point t_start, t_end;
    std::uint64_t last_bytes = 0, last_frames = 0;
    double last_edge = 0;
    // Tick k sits at t_start + k * interval, computed from k (not summed), so a
    // run of a whole number of intervals ends exactly on its last tick.
    const double interval_s = o.interval_seconds > 0 ? o.interval_seconds : 1e9;
    std::uint64_t tick = 1;
    auto tick_time = [&](std::uint64_t k) {
        return t_start + std::chrono::duration_cast<Clock::duration>(
                             std::chrono::duration<double>(static_cast<double>(k) * interval_s));
    };
    auto close_interval = [&](Clock::time_point edge) {
        double end_s = std::chrono::duration<double>(edge - t_start).count();
        std::uint64_t b = measured_bytes(), f = measured_frames();
        double span = end_s - last_edge;
        if (span <= 0) return;
        json iv = {{"start_s", last_edge},
                   {"end_s", end_s},
                   {"bytes", b - last_bytes},
                   {"frames", f - last_frames},
                   {"throughput_mbps", mbps(b - last_bytes, span)},
                   {"frames_per_s", finite(static_cast<double>(f - last_frames) / span)},
                   {"cumulative_bytes", b}};
        intervals.push_back(iv);
        emit({{"event", "interval"}, {"interval", iv}});
        if (!o.quiet && o.interval_seconds > 0)
            std::fprintf(stderr, "%s[%6.1f-%6.1f s] %10.1f MB/s %10.1f frames/s %12s total\n",
                         tty ? "\r\033[K" : "", last_edge, end_s, mbps(b - last_bytes, span),
                         static_cast<double>(f - last_frames) / span, format_bytes(b).c_str());
        last_bytes = b;
        last_frames = f;
        last_edge = end_s;
    };
    for (;;) {
        const std::uint64_t seen = run.events();
        bool all_exited = std::all_of(workers.begin(), workers.end(),
                                      [](auto& w) { return w->exited.load(); });
        for (auto& w : workers)
            if (w->exited.load() && !w->error.empty()) abort.store(true);
        run.maybe_start();
        auto now = Clock::now();
        if (!started && run.measuring.load()) {
            started = true;
            t_start = run.measure_start();
            cpu_start = ProcessUsage::now();
        }
        const auto t_limit = t_start + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(o.seconds));
        if (started && !t_end.time_since_epoch().count()) {
            if (time_limited && now >= t_limit) {
                run.stopped.store(true);
                t_end = t_limit;
            } else if (!time_limited && run.finished.load() >= o.connections) {
                t_end = run.launch + std::chrono::nanoseconds(run.last_done_ns.load());
            }
            const bool ended = t_end.time_since_epoch().count() != 0;
            // Ticks strictly before the end; the interval ending at t_end is
            // closed below, after the workers have exited.
            while (ended ? tick_time(tick) < t_end : tick_time(tick) <= now) {
                close_interval(tick_time(tick));
                ++tick;
            }
            if (ended) cpu_end = ProcessUsage::now();
            if (tty && !t_end.time_since_epoch().count()) {
                double done = static_cast<double>(measured_frames()) /
                              static_cast<double>(o.frames * o.connections * (count_tx && count_rx ? 2 : 1));
                std::fprintf(stderr, "\r\033[K%s %3.0f%%", bar(done).c_str(), done * 100);
            }
        }
        // A worker that saw `counting()` true just before `stopped` was set may
        // still add that frame after the reads above; the last interval is
        // closed once every worker has exited, so the intervals add up to the
        // totals (its edge stays t_end).
        if (all_exited) {
            if (t_end.time_since_epoch().count()) close_interval(t_end);
            break;
        }
        // Sleep to the next thing to do; workers wake this thread early
        // (RunState::notify) when measuring begins, a connection finishes or
        // a worker exits.
        auto wake = now + (tty ? std::chrono::milliseconds(100) : std::chrono::milliseconds(1000));
        if (!started && run.launch + run.warmup > now) wake = std::min(wake, run.launch + run.warmup);
        if (started && !t_end.time_since_epoch().count()) {
            wake = std::min(wake, tick_time(tick));
            if (time_limited) wake = std::min(wake, t_limit);
        }
        run.wait(seen, wake);
    }
    for (auto& t : pool_threads) t.join();
    if (tty) std::fprintf(stderr, "\r\033[K");
    if (!t_end.time_since_epoch().count() && started) {
        t_end = Clock::now();  // ended early (error): report what was measured
        close_interval(t_end);
        cpu_end = ProcessUsage::now();
    }

    rusage child_ru{};
    int child_code = 0;
    if (child.pid > 0) {
        if (abort.load()) ::kill(child.pid, SIGTERM);
        child_code = reap_child(child.pid, child_ru);
        if (!child.unix_path.empty()) ::unlink(child.unix_path.c_str());
    }

    // ---- results
    std::string first_error;
    std::uint64_t errors = 0;
    Histogram latency;
    json per_conn = json::array();
    engine::StreamCounters totals;
    std::uint64_t copied = 0;
    json server_results;
    std::string backend = "none", setup_flags = "none";
    bool send_zc_available = false, restricted = false;
    std::size_t registered_bytes = 0, huge_page_bytes = 0;
    int socket_sndbuf = 0;
    const double seconds = started ? std::chrono::duration<double>(t_end - t_start).count() : 0.0;
    std::uint64_t tx_bytes = 0, rx_bytes = 0, tx_frames = 0, rx_frames = 0;
    for (auto& w : workers) {
        if (!w->error.empty()) {
            errors++;
            if (first_error.empty()) first_error = w->error;
        }
        if (w->backend != "none") {
            backend = w->backend;
            setup_flags = w->setup_flags;
            restricted = w->restricted;
            send_zc_available = w->send_zc_available;
        }
        registered_bytes += w->pool.registered_bytes;
        huge_page_bytes = std::max(huge_page_bytes, w->huge_page_bytes);
        if (socket_sndbuf == 0) socket_sndbuf = w->socket_sndbuf;
        latency.merge(w->latency_ns);
        for (auto& c : w->conns) {
            auto& k = c->counters;
            errors += k.errors.load();
            if (!c->error.empty() && first_error.empty()) first_error = c->error;
            totals.zc_sends += c->stream_counters.zc_sends;
            totals.zc_copied += c->stream_counters.zc_copied;
            totals.zc_fallbacks += c->stream_counters.zc_fallbacks;
            totals.recv_ops += c->stream_counters.recv_ops;
            totals.send_copied_bytes += c->stream_counters.send_copied_bytes;
            totals.send_ops += c->stream_counters.send_ops;
            copied += c->receive_copied_bytes;
            tx_bytes += k.bytes_tx.load();
            rx_bytes += k.bytes_rx.load();
            tx_frames += k.frames_tx.load();
            rx_frames += k.frames_rx.load();
            if (c->index == 0) server_results = c->server_results;
            std::uint64_t cb = (count_tx ? k.bytes_tx.load() : 0) + (count_rx ? k.bytes_rx.load() : 0);
            per_conn.push_back({{"index", c->index},
                                {"bytes", cb},
                                {"frames", (count_tx ? k.frames_tx.load() : 0) +
                                               (count_rx ? k.frames_rx.load() : 0)},
                                {"throughput_mbps", mbps(cb, seconds)},
                                {"errors", k.errors.load()},
                                {"error", c->error.empty() ? json(nullptr) : json(c->error)}});
        }
    }
    if (child_code != 0 && first_error.empty() && !abort.load()) {
        first_error = "the self-started server exited with code " + std::to_string(child_code);
        errors++;
    }
    const std::uint64_t bytes = (count_tx ? tx_bytes : 0) + (count_rx ? rx_bytes : 0);
    const std::uint64_t frames = (count_tx ? tx_frames : 0) + (count_rx ? rx_frames : 0);
    const bool has_server = server_results.is_object();
    double server_user = has_server ? server_results["cpu"].value("user_s", 0.0) : 0.0;
    double server_sys = has_server ? server_results["cpu"].value("sys_s", 0.0) : 0.0;
    double client_user = cpu_end.user_s - cpu_start.user_s;
    double client_sys = cpu_end.sys_s - cpu_start.sys_s;
    std::uint64_t rss_client = ProcessUsage::now().rss_peak_bytes;
    json rss_server = has_server ? json(server_results.value("rss_peak_bytes", std::uint64_t{0}))
                                 : (child.address.port || !child.unix_path.empty()
                                        ? json(static_cast<std::uint64_t>(child_ru.ru_maxrss) * 1024)
                                        : json(nullptr));
    double cpu_total = client_user + client_sys + (has_server ? server_user + server_sys : 0.0);
    const bool echo = o.mode == "echo";
    // Echo moves every counted byte both ways; one-way modes count it once.
    std::uint64_t c2s = echo ? rx_bytes : tx_bytes, s2c = rx_bytes;
    std::uint64_t c2s_frames = echo ? rx_frames : tx_frames, s2c_frames = rx_frames;
    if (o.mode == "stream") s2c = s2c_frames = 0;
    if (o.mode == "reverse") c2s = c2s_frames = 0;

    // latency_ns is what the histogram holds; latency_us (the same values
    // rounded to the nearest microsecond) stays for readers of schema 1.
    json lat_ns = nullptr, lat_us = nullptr;
    if (echo) {
        const std::pair<const char*, std::uint64_t> pct[] = {
            {"p50", latency.percentile(0.50)},   {"p90", latency.percentile(0.90)},
            {"p99", latency.percentile(0.99)},   {"p999", latency.percentile(0.999)},
            {"max", latency.max()}};
        lat_ns = json::object();
        lat_us = json::object();
        for (auto [name, ns] : pct) {
            lat_ns[name] = ns;
            lat_us[name] = (ns + 500) / 1000;
        }
    }
    json system = {{"kernel", kernel_release()},
                   {"cpu_model", cpu_model()},
                   {"cores", std::thread::hardware_concurrency()},
                   {"backend", backend},
                   {"io_uring_setup_flags", setup_flags},
                   {"io_uring_restricted", restricted},
                   {"buffers_registered", registered_bytes > 0},
                   {"registered_bytes", registered_bytes},
                   {"huge_page_bytes", huge_page_bytes},
                   {"socket_sndbuf_bytes", socket_sndbuf},
                   {"send_zc_available", send_zc_available},
                   {"send_zc_used", totals.zc_sends > 0},
                   {"send_zc_copied_notifications", totals.zc_copied},
                   {"send_zc_fallbacks", totals.zc_fallbacks}};
    json results = {
        {"frames", frames},
        {"bytes", bytes},
        {"seconds", finite(seconds)},
        {"throughput_mbps", mbps(bytes, seconds)},
        {"frames_per_s", seconds > 0 ? finite(static_cast<double>(frames) / seconds) : 0.0},
        {"errors", errors},
        {"error", first_error.empty() ? json(nullptr) : json(first_error)},
        {"latency_us", lat_us},
        {"latency_ns", lat_ns},
        {"cpu",
         {{"client", {{"user_s", finite(client_user)}, {"sys_s", finite(client_sys)}}},
          {"server", has_server ? json({{"user_s", finite(server_user)}, {"sys_s", finite(server_sys)}})
                                : json(nullptr)}}},
        {"cpu_s_per_gb", bytes > 0 ? finite(cpu_total / (static_cast<double>(bytes) / 1e9)) : 0.0},
        {"rss_peak_bytes", {{"client", rss_client}, {"server", rss_server}}},
        {"directions",
         {{"client_to_server",
           {{"bytes", c2s}, {"frames", c2s_frames}, {"throughput_mbps", mbps(c2s, seconds)}}},
          {"server_to_client",
           {{"bytes", s2c}, {"frames", s2c_frames}, {"throughput_mbps", mbps(s2c, seconds)}}}}},
        {"server", has_server ? server_results : json(nullptr)},
        {"receive_copied_bytes", copied},
        {"send_copied_bytes", totals.send_copied_bytes},
        {"recv_ops", totals.recv_ops},
        {"send_ops", totals.send_ops},
        {"connections", per_conn}};
    json doc = {{"schema_version", 1},
                {"tool", {{"name", "ringxfer"}, {"version", RINGXFER_VERSION}}},
                {"params", params},
                {"system", system},
                {"results", results},
                {"intervals", intervals}};
    emit({{"event", "end"}, {"result", doc}});

    // ---- human summary (stderr)
    FILE* out = stderr;
    std::fprintf(out, "ringxfer bench: %s %llu frames x %llu B in %.3f s = %.1f MB/s\n",
                 o.mode.c_str(), static_cast<unsigned long long>(frames),
                 static_cast<unsigned long long>(o.frame_size), seconds, mbps(bytes, seconds));
    if (!o.quiet) {
        std::fprintf(out, "  %-18s %14s %12s %12s\n", "direction", "bytes", "MB/s", "frames/s");
        auto row = [&](const char* name, std::uint64_t b, std::uint64_t f) {
            std::fprintf(out, "  %-18s %14llu %12.1f %12.1f\n", name,
                         static_cast<unsigned long long>(b), mbps(b, seconds),
                         seconds > 0 ? static_cast<double>(f) / seconds : 0.0);
        };
        row("client->server", c2s, c2s_frames);
        row("server->client", s2c, s2c_frames);
        if (echo)
            std::fprintf(out, "  round trip (ms)    p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f\n",
                         latency.percentile(0.5) / 1e6, latency.percentile(0.9) / 1e6,
                         latency.percentile(0.99) / 1e6, latency.percentile(0.999) / 1e6,
                         latency.max() / 1e6);
        std::fprintf(out, "  cpu (s)            client user %.2f sys %.2f", client_user, client_sys);
        if (has_server) std::fprintf(out, "   server user %.2f sys %.2f", server_user, server_sys);
        std::fprintf(out, "   %.2f CPU-s/GB\n",
                     bytes > 0 ? cpu_total / (static_cast<double>(bytes) / 1e9) : 0.0);
        std::fprintf(out, "  peak rss (MiB)     client %.1f", rss_client / 1048576.0);
        if (rss_server.is_number())
            std::fprintf(out, "   server %.1f", rss_server.get<double>() / 1048576.0);
        std::fprintf(out, "\n  backend            %s%s%s; buffers %s; payload bytes copied on receive: %llu, on send: %llu\n",
                     backend.c_str(), backend == "io_uring" ? (" " + setup_flags).c_str() : "",
                     restricted ? " (restricted to its opcodes)" : "",
                     registered_bytes > 0 ? "registered" : "not registered",
                     static_cast<unsigned long long>(copied),
                     static_cast<unsigned long long>(totals.send_copied_bytes));
    }
    if (!first_error.empty()) std::fprintf(stderr, "ringxfer bench: %s\n", first_error.c_str());

    if (!o.latency_log_path.empty()) {
        std::vector<LatencyLog::Record> all;
        std::uint64_t dropped = 0;
        for (auto& w : workers) {
            all.insert(all.end(), w->latency_log.records.begin(), w->latency_log.records.end());
            dropped += w->latency_log.dropped;
            w->latency_log = {};
        }
        std::sort(all.begin(), all.end(),
                  [](const auto& a, const auto& b) { return a.end_ns < b.end_ns; });
        std::ofstream f(o.latency_log_path);
        f << "end_ns,rtt_ns,connection\n";
        for (const auto& r : all) f << r.end_ns << ',' << r.rtt_ns << ',' << r.connection << '\n';
        f.flush();
        if (!f) {
            std::fprintf(stderr, "ringxfer bench: cannot write %s: %s\n",
                         o.latency_log_path.c_str(), std::strerror(errno));
            return kExitFailure;
        }
        if (dropped)
            std::fprintf(stderr,
                         "ringxfer bench: --latency-log kept the first %zu round trips per "
                         "thread and dropped %llu; the percentiles cover them all\n",
                         LatencyLog::kMax, static_cast<unsigned long long>(dropped));
    }
    if (!o.json_path.empty()) {
        std::ofstream f(o.json_path);
        f << doc.dump(2) << "\n";
        if (!f) {
            std::fprintf(stderr, "ringxfer bench: cannot write %s: %s\n", o.json_path.c_str(),
                         std::strerror(errno));
            return kExitFailure;
        }
    }
    for (auto& w : workers)
        if (w->error_code == ENOSYS || w->error_code == EPERM || w->error_code == EOPNOTSUPP)
            return kExitNoUring;
    return errors ? kExitFailure : kExitOk;
}

}  // namespace ringxfer::tools
