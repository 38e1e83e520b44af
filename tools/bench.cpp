#include "bench.hpp"

#include <signal.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "histogram.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/proto/errors.hpp"
#include "server.hpp"
#include "units.hpp"

namespace ringxfer::tools {
namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t peak_rss_bytes(int who) {
    rusage ru{};
    ::getrusage(who, &ru);
    return static_cast<std::uint64_t>(ru.ru_maxrss) * 1024;
}

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

/// Pseudo-random fill, so verification catches misplaced bytes.
void fill_pattern(std::span<std::byte> p, std::uint64_t seed) {
    std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    std::size_t i = 0;
    for (; i + 8 <= p.size(); i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::memcpy(p.data() + i, &x, 8);
    }
    for (; i < p.size(); ++i) p[i] = static_cast<std::byte>(i);
}

struct ServerChild {
    pid_t pid = -1;
    engine::Endpoint address;
    std::string unix_path;
};

/// Binds a free loopback port (or a fresh unix path) *before* forking, so
/// the client can connect at once with no race, then serves one connection
/// in the child on its own ring.
ServerChild start_server_child(const BenchOptions& o) {
    ServerChild child;
    engine::Endpoint ep;
    if (o.transport == "unix") {
        ep.kind = engine::Endpoint::Kind::unix_socket;
        ep.path = "/tmp/ringxfer-bench-" + std::to_string(::getpid()) + ".sock";
        child.unix_path = ep.path;
    } else {
        ep = engine::Endpoint::parse("127.0.0.1:0");
    }
    engine::Fd listener = engine::listen_on(ep, 16);
    child.address = engine::local_endpoint(listener.get(), ep.kind);
    std::fflush(nullptr);
    child.pid = ::fork();
    if (child.pid < 0) throw engine::Error(errno, engine::errno_message("fork failed", errno));
    if (child.pid == 0) {
        int code = kExitOk;
        try {
            auto driver = engine::make_driver(o.backend);
            engine::PoolOptions po;
            po.budget_bytes = o.pool_budget;
            po.max_buffer_bytes = std::max<std::size_t>(o.reader.max_frame, 64 * 1024);
            po.register_buffers = o.register_buffers;
            engine::BufferPool pool(driver->ring(), po);
            ServeOptions so;
            so.one_off = true;
            so.store_and_forward = o.server_store_and_forward;
            so.quiet = false;
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

struct EchoRun {
    std::uint64_t frames = 0;
    std::uint64_t bytes = 0;
    double seconds = 0;
    double verify_seconds = 0;
    std::uint64_t errors = 0;
    std::uint64_t mismatches = 0;
    Histogram latency_us;
    std::string error;
};

/// One connection, one frame in flight: send, receive the echo, (verify),
/// repeat. The payload buffer is leased once and reused for every frame.
EchoRun run_echo(engine::Driver& driver, engine::BufferPool& pool, engine::Fd fd,
                 const BenchOptions& o, engine::StreamCounters& counters,
                 proto::ReaderStats& rstats) {
    EchoRun run;
    std::unique_ptr<engine::Stream> stream_owner = driver.make_stream(std::move(fd), o.stream);
    engine::Stream& stream = *stream_owner;
    proto::FrameReader reader(stream, pool, o.reader);
    proto::FrameWriter writer(stream, o.writer);

    std::optional<proto::Frame> outgoing(std::in_place);
    if (int ret = proto::Frame::allocate(pool, o.frame_size, *outgoing); ret < 0) {
        run.error = engine::errno_message("cannot lease a " + format_bytes(o.frame_size) +
                                              " send buffer (raise --pool-budget?)",
                                          ret);
        run.errors++;
        return run;
    }
    fill_pattern(outgoing->mutable_payload(), 42);

    Clock::time_point measured_start;
    const std::uint64_t total = o.warmup_frames + o.frames;
    for (std::uint64_t i = 0; i < total && run.error.empty(); ++i) {
        if (i == o.warmup_frames) measured_start = Clock::now();
        if (outgoing->size() >= 8) std::memcpy(outgoing->mutable_payload().data(), &i, 8);
        bool sent = false, echoed = false;
        std::error_code send_ec, recv_ec;
        proto::Frame echo;
        auto t0 = Clock::now();
        bool queued = writer.try_write(*outgoing, [&](proto::Frame f, std::error_code ec) {
            outgoing = std::move(f);
            send_ec = ec;
            sent = true;
        });
        if (!queued) {
            run.error = "internal: writer refused a frame with an empty queue";
            break;
        }
        outgoing.reset();
        reader.read([&](proto::Frame f, std::error_code ec) {
            echo = std::move(f);
            recv_ec = ec;
            echoed = true;
        });
        while (!(sent && echoed)) {
            int ret = driver.run_once(1, std::chrono::seconds(1));
            if (ret < 0) {
                run.error = engine::errno_message("event loop wait failed", ret);
                break;
            }
            if (recv_ec && !sent) break;  // the peer is gone; the send may never complete
        }
        auto t1 = Clock::now();
        if (send_ec || recv_ec) {
            std::error_code ec = send_ec ? send_ec : recv_ec;
            run.error = (send_ec ? "send failed: " : "receive failed: ") + ec.message();
            run.errors++;
            break;
        }
        if (!run.error.empty()) break;
        if (i >= o.warmup_frames) {
            run.frames++;
            run.bytes += echo.size();
            run.latency_us.record(static_cast<std::uint64_t>(
                std::chrono::duration_cast<std::chrono::microseconds>(t1 - t0).count()));
        }
        if (o.verify) {
            auto v0 = Clock::now();
            bool same = echo.size() == outgoing->size() &&
                        std::memcmp(echo.payload().data(), outgoing->payload().data(),
                                    echo.size()) == 0;
            if (i >= o.warmup_frames) run.verify_seconds += std::chrono::duration<double>(Clock::now() - v0).count();
            if (!same) {
                run.mismatches++;
                run.errors++;
                run.error = "verification failed: echoed frame " + std::to_string(i) +
                            " differs from the frame sent";
            }
        } else if (echo.size() != o.frame_size) {
            run.errors++;
            run.error = "echoed frame has " + std::to_string(echo.size()) + " bytes, sent " +
                        std::to_string(o.frame_size);
        }
    }
    if (run.frames > 0)
        run.seconds =
            std::chrono::duration<double>(Clock::now() - measured_start).count() - run.verify_seconds;
    counters = stream.counters();
    rstats = reader.stats();
    stream.close();
    while (driver.in_flight() > 0) driver.run_once(1, std::chrono::milliseconds(100));
    return run;
}

double finite(double v) { return std::isfinite(v) ? v : 0.0; }

}  // namespace

int run_bench(const BenchOptions& o) {
    if (o.mode != "echo") {
        std::fprintf(stderr, "ringxfer bench: mode '%s' is not available yet (echo only)\n",
                     o.mode.c_str());
        return kExitUsage;
    }
    ::signal(SIGPIPE, SIG_IGN);

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
    auto cleanup_child = [&](rusage& ru) -> int {
        if (child.pid <= 0) return 0;
        int code = reap_child(child.pid, ru);
        if (!child.unix_path.empty()) ::unlink(child.unix_path.c_str());
        child.pid = -1;
        return code;
    };

    EchoRun run;
    engine::StreamCounters counters;
    proto::ReaderStats rstats;
    engine::PoolStats pool_stats;
    std::string setup_flags = "none";
    std::string backend;
    bool send_zc_available = false;
    int exit_code = kExitOk;
    rusage child_ru{};
    int child_code = 0;
    try {
        auto driver = engine::make_driver(o.backend);
        backend = driver->backend_name();
        if (engine::Ring* ring = driver->ring()) {
            setup_flags = ring->features().setup_flags_string();
            send_zc_available = ring->features().op_send_zc;
        }
        engine::PoolOptions po;
        po.budget_bytes = o.pool_budget;
        po.max_buffer_bytes = std::max<std::size_t>({o.reader.max_frame, o.frame_size, 64 * 1024});
        po.register_buffers = o.register_buffers;
        engine::BufferPool pool(driver->ring(), po);

        engine::Fd fd;
        int cerr = 0;
        bool connected = false;
        driver->async_connect(target, [&](engine::Fd f, int err) {
            fd = std::move(f);
            cerr = err;
            connected = true;
        });
        auto deadline = Clock::now() + std::chrono::seconds(10);
        while (!connected && Clock::now() < deadline)
            driver->run_once(1, std::chrono::milliseconds(200));
        if (!connected || cerr < 0) {
            std::string why = connected ? std::strerror(-cerr) : "timed out after 10 s";
            throw engine::Error(connected ? -cerr : ETIMEDOUT,
                                "cannot connect to " + target.to_string() + ": " + why);
        }
        engine::tune_socket(fd.get(), o.tuning);
        if (!o.quiet)
            std::fprintf(stderr, "ringxfer bench: echo %llu x %s frames (+%llu warm-up) to %s%s\n",
                         static_cast<unsigned long long>(o.frames),
                         format_bytes(o.frame_size).c_str(),
                         static_cast<unsigned long long>(o.warmup_frames),
                         target.to_string().c_str(), o.address ? "" : " (self-started server)");
        run = run_echo(*driver, pool, std::move(fd), o, counters, rstats);
        pool_stats = pool.stats();
    } catch (const engine::Error& e) {
        std::fprintf(stderr, "ringxfer bench: %s\n", e.what());
        if (child.pid > 0) ::kill(child.pid, SIGTERM);
        cleanup_child(child_ru);
        return e.code() == ENOSYS || e.code() == EPERM || e.code() == EOPNOTSUPP ? kExitNoUring
                                                                               : kExitFailure;
    }
    child_code = cleanup_child(child_ru);
    if (!run.error.empty()) {
        std::fprintf(stderr, "ringxfer bench: %s\n", run.error.c_str());
        exit_code = kExitFailure;
    } else if (child_code != 0) {
        std::fprintf(stderr, "ringxfer bench: the self-started server exited with code %d\n",
                     child_code);
        exit_code = kExitFailure;
    }

    double mbps = run.seconds > 0 ? static_cast<double>(run.bytes) / 1e6 / run.seconds : 0;
    std::uint64_t rss_client = peak_rss_bytes(RUSAGE_SELF);
    std::uint64_t rss_server = static_cast<std::uint64_t>(child_ru.ru_maxrss) * 1024;
    bool registered = pool_stats.registered_bytes > 0;

    std::printf("ringxfer bench: echo %llu frames x %llu B in %.3f s = %.1f MB/s\n",
                static_cast<unsigned long long>(run.frames),
                static_cast<unsigned long long>(o.frame_size), run.seconds, mbps);
    std::printf("  round trip   p50 %.3f ms  p99 %.3f ms  max %.3f ms\n",
                run.latency_us.percentile(0.5) / 1e3, run.latency_us.percentile(0.99) / 1e3,
                run.latency_us.max() / 1e3);
    if (child.address.port || !child.unix_path.empty() || !o.address)
        std::printf("  peak rss     client %.1f MiB  server %.1f MiB\n", rss_client / 1048576.0,
                    rss_server / 1048576.0);
    else
        std::printf("  peak rss     client %.1f MiB\n", rss_client / 1048576.0);
    std::printf("  backend      %s%s; buffers %s; payload bytes copied on receive: %llu\n",
                backend.c_str(), backend == "io_uring" ? (" " + setup_flags).c_str() : "", registered ? "registered" : "not registered",
                static_cast<unsigned long long>(rstats.copied_bytes));
    std::fflush(stdout);

    if (!o.json_path.empty()) {
        using nlohmann::json;
        json j;
        j["schema_version"] = 1;
        j["tool"] = {{"name", "ringxfer"}, {"version", RINGXFER_VERSION}};
        j["params"] = {{"mode", o.mode},
                       {"frame_bytes", o.frame_size},
                       {"frames", o.frames},
                       {"warmup_frames", o.warmup_frames},
                       {"connections", 1},
                       {"window", 1},
                       {"transport", target.kind == engine::Endpoint::Kind::unix_socket ? "unix" : "tcp"},
                       {"address", target.to_string()},
                       {"self_started_server", !o.address},
                       {"verify", o.verify},
                       {"server_echo", o.address ? json(nullptr) : json(o.server_store_and_forward ? "store-and-forward" : "cut-through")},
                       {"max_frame_bytes", o.reader.max_frame},
                       {"zerocopy_threshold_bytes", o.stream.zerocopy_threshold}};
        j["system"] = {{"kernel", kernel_release()},
                       {"cpu_model", cpu_model()},
                       {"cores", std::thread::hardware_concurrency()},
                       {"backend", backend},
                       {"io_uring_setup_flags", setup_flags},
                       {"buffers_registered", registered},
                       {"registered_bytes", pool_stats.registered_bytes},
                       {"send_zc_available", send_zc_available},
                       {"send_zc_used", counters.zc_sends > 0},
                       {"send_zc_copied_notifications", counters.zc_copied}};
        json lat = {{"p50", run.latency_us.percentile(0.50)},
                    {"p90", run.latency_us.percentile(0.90)},
                    {"p99", run.latency_us.percentile(0.99)},
                    {"p999", run.latency_us.percentile(0.999)},
                    {"max", run.latency_us.max()}};
        j["results"] = {
            {"frames", run.frames},
            {"bytes", run.bytes},
            {"seconds", finite(run.seconds)},
            {"throughput_mbps", finite(mbps)},
            {"frames_per_s", finite(run.seconds > 0 ? run.frames / run.seconds : 0)},
            {"errors", run.errors + (child_code != 0 ? 1 : 0)},
            {"error", run.error.empty() ? json(nullptr) : json(run.error)},
            {"latency_us", lat},
            {"rss_peak_bytes", {{"client", rss_client}, {"server", o.address ? json(nullptr) : json(rss_server)}}},
            {"receive_copied_bytes", rstats.copied_bytes},
            {"recv_ops", counters.recv_ops},
            {"send_ops", counters.send_ops},
        };
        std::ofstream out(o.json_path);
        out << j.dump(2) << "\n";
        if (!out) {
            std::fprintf(stderr, "ringxfer bench: cannot write %s: %s\n", o.json_path.c_str(),
                         std::strerror(errno));
            return kExitFailure;
        }
    }
    return exit_code;
}

}  // namespace ringxfer::tools
