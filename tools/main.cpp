// ringxfer: command-line entry point (serve, bench).
#include <signal.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "bench.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/driver.hpp"
#include "server.hpp"
#include "units.hpp"

namespace {

std::atomic<bool> g_stop{false};  // set by SIGINT/SIGTERM only (process-wide by nature)
std::atomic<bool> g_status{false};  // set by SIGUSR1: print a status line

void on_signal(int) { g_stop.store(true); }
void on_status(int) { g_status.store(true); }

/// CLI11 validator/transformer for sizes with K/M/G and Ki/Mi/Gi suffixes.
std::uint64_t size_arg(const std::string& text, const char* what) {
    auto v = ringxfer::tools::parse_size(text);
    if (!v)
        throw CLI::ValidationError(what, "'" + text + "' is not a size (e.g. 100M, 64Ki, 4096)");
    return *v;
}

/// A socket buffer size: setsockopt takes an int, the kernel doubles it.
int buffer_arg(const std::string& text, const char* what) {
    std::uint64_t v = size_arg(text, what);
    if (v > (std::uint64_t{1} << 30))
        throw CLI::ValidationError(what, "'" + text + "' is above 1Gi, the most a socket buffer can be");
    return static_cast<int>(v);
}

/// The key of --auth-key-file, read once; nullptr after saying why not.
std::shared_ptr<const ringxfer::tools::AuthKey> load_key(const std::string& path,
                                                         const char* command) {
    std::string why;
    auto key = ringxfer::tools::AuthKey::load(path, why);
    if (!key) std::fprintf(stderr, "ringxfer %s: %s\n", command, why.c_str());
    return key;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace ringxfer;
    CLI::App app{"ringxfer: large framed messages over io_uring, received straight into pooled "
                 "registered buffers.\n\nExit codes: 0 ok, 1 transfer failed, 2 usage error, "
                 "3 io_uring unavailable.",
                 "ringxfer"};
    app.set_version_flag("--version", RINGXFER_VERSION);
    app.require_subcommand(1);

    // ---- serve
    auto* serve = app.add_subcommand("serve", "Echo every frame back to its sender");
    std::string listen = "0.0.0.0:7878";
    std::string serve_max_frame = "1Gi";
    bool one_off = false, serve_quiet = false;
    serve->add_option("--listen,-l", listen, "HOST:PORT, unix:PATH or shm:PATH (same-host shared memory) to listen on")
        ->capture_default_str();
    serve->add_option("--max-frame", serve_max_frame, "largest frame accepted (K/M/G, Ki/Mi/Gi)")
        ->capture_default_str();
    serve->add_flag("--one-off", one_off, "serve one connection, then exit");
    serve->add_flag("--quiet,-q", serve_quiet, "no per-connection log lines");
    double idle_timeout = 60;
    serve->add_option("--idle-timeout", idle_timeout,
                      "close connections idle for this many seconds (0: never)")
        ->capture_default_str();
    std::string min_rate = "64Ki";
    serve->add_option("--min-rate", min_rate,
                      "bytes per second a frame in progress must at least arrive at, measured "
                      "over 10 s (0: no minimum)")
        ->capture_default_str();
    std::uint64_t max_connections = 1024;
    serve->add_option("--max-connections", max_connections,
                      "connections served at once; more are refused (0: no limit)")
        ->capture_default_str();
    std::string serve_backend = "auto";
    serve->add_option("--backend", serve_backend,
                      "auto (io_uring, else epoll), uring (io_uring or fail), epoll")
        ->check(CLI::IsMember({"auto", "uring", "epoll"}))
        ->capture_default_str();
    unsigned serve_busy_poll = 0;
    serve->add_option("--busy-poll", serve_busy_poll,
                      "microseconds the ring polls before it sleeps (lower latency; costs a CPU "
                      "while waiting; 0: sleep at once)")
        ->check(CLI::Range(0u, 1'000'000u))
        ->capture_default_str();
    std::vector<std::string> allow;
    serve->add_option("--allow", allow,
                      "TCP only: accept connections only from these address ranges, "
                      "CIDR[,CIDR...] (IPv4 or IPv6, e.g. 10.0.0.0/8,::1; a plain address is "
                      "/32 or /128); others are closed before anything is read (default: "
                      "everyone)")
        ->type_name("CIDR[,CIDR...]");
    std::string serve_key_file;
    serve->add_option("--auth-key-file", serve_key_file,
                      "require every client to prove it holds the key in FILE (pre-shared; "
                      "mode 600) before anything else is read; no encryption")
        ->type_name("FILE");
    bool serve_saf = false;
    serve->add_flag("--store-and-forward", serve_saf,
                    "echo a frame only once all of it arrived (default: cut-through)");

    // ---- bench
    auto* bench = app.add_subcommand("bench", "Measure echo throughput against a server");
    tools::BenchOptions bo;
    std::string address, frame_size = "100M", max_frame = "1Gi", pool_budget = "4Gi";
    std::string zc_threshold = "0";
    bench->add_option("address", address,
                      "server HOST:PORT, unix:PATH or shm:PATH; none: start a loopback server");
    bench->add_option("--mode,-m", bo.mode,
                      "echo (round trips), stream (client to server), reverse (server to "
                      "client), bidir (both at once)")
        ->check(CLI::IsMember({"echo", "stream", "reverse", "bidir"}))
        ->capture_default_str();
    bench->add_option("--frame-size,-s", frame_size, "payload bytes per frame")
        ->capture_default_str();
    auto* frames_opt =
        bench->add_option("--frames,-n", bo.frames, "measured frames per connection")
            ->capture_default_str();
    bench->add_option("--time,-t", bo.seconds,
                      "run for this many seconds instead of a frame count")
        ->excludes(frames_opt);
    bench->add_option("--warmup", bo.warmup_seconds, "seconds excluded before measuring")
        ->capture_default_str();
    bench->add_option("--warmup-frames", bo.warmup_frames,
                      "frames per connection excluded before measuring")
        ->capture_default_str();
    bench->add_option("--connections,-P", bo.connections, "parallel connections")
        ->capture_default_str();
    bench->add_option("--threads,-T", bo.threads,
                      "client threads, each with its own ring; connections spread over them")
        ->capture_default_str();
    bench->add_option("--window,-w", bo.window,
                      "frames in flight per connection (default 0 = auto: 1 for echo; for the "
                      "one-way modes enough to keep 8 MiB queued, 2..4096)");
    bench->add_option("--interval,-i", bo.interval_seconds,
                      "seconds between interval reports (0: none)")
        ->capture_default_str();
    bench->add_flag("--json-stream", bo.json_stream,
                    "one JSON object per line on stdout while the test runs");
    bench->add_option("--transport", bo.transport, "self-started server: tcp, unix or shm (same-host shared memory)")
        ->check(CLI::IsMember({"tcp", "unix", "shm"}))
        ->capture_default_str();
    bench->add_flag("--fill-in-place", bo.fill_in_place,
                    "shm: build frames in the shared pool and send them by reference (no copy; "
                    "the server's reverse/bidir frames too); without it each payload is copied "
                    "in once");
    bench->add_option("--json", bo.json_path, "write the result as JSON to this file");
    bench->add_option("--latency-log", bo.latency_log_path,
                      "echo: write every measured round trip to this file as CSV (end_ns on "
                      "CLOCK_MONOTONIC, rtt_ns, connection)");
    std::string bench_key_file;
    bench->add_option("--auth-key-file", bench_key_file,
                      "authenticate with the key in FILE (the server's --auth-key-file; mode "
                      "600) and check that the server holds it too")
        ->type_name("FILE");
    bench->add_flag("--verify", bo.verify, "check every echoed byte");
    bench->add_flag("--quiet,-q", bo.quiet, "only the result line");
    bench->add_option("--max-frame", max_frame, "largest frame accepted")->capture_default_str();
    bench->add_option("--pool-budget", pool_budget, "cap on buffer memory per process")
        ->capture_default_str();
    bench->add_option("--zerocopy-threshold", zc_threshold,
                      "send payloads at least this big with SEND_ZC (0: never)")
        ->capture_default_str();
    std::string sndbuf = "auto", rcvbuf = "0";
    bench->add_option("--sndbuf", sndbuf,
                      "SO_SNDBUF for both sides (auto: 512Ki on unix sockets and TCP within this "
                      "host, else kernel autotuning; 0: the kernel's default everywhere)")
        ->capture_default_str();
    bench->add_option("--rcvbuf", rcvbuf, "SO_RCVBUF for both sides (0: kernel autotuning)")
        ->capture_default_str();
    bench->add_flag("--store-and-forward", bo.server_store_and_forward,
                    "self-started server echoes whole frames only (default: cut-through)");
    std::string bench_backend = "auto";
    bench->add_option("--backend", bench_backend,
                      "auto (io_uring, else epoll), uring (io_uring or fail), epoll")
        ->check(CLI::IsMember({"auto", "uring", "epoll"}))
        ->capture_default_str();
    bool no_register = false, read_fixed = false, no_poll_first = false;
    bench->add_flag("--no-register", no_register, "do not register buffers with io_uring");
    std::string page_offset = "auto";
    bench->add_option("--page-offset", page_offset,
                      "where pool buffers start past a 4 KiB page: auto (16, the header, on TCP; "
                      "0 on unix sockets) or 0..4095 bytes (lever)")
        ->capture_default_str();
    bool no_zc_fallback = false;
    bench->add_flag("--no-zerocopy-fallback", no_zc_fallback,
                    "keep using SEND_ZC when the kernel reports it copied anyway (lever)");
    bool no_huge_pages = false;
    bench->add_flag("--no-huge-pages", no_huge_pages,
                    "no MADV_HUGEPAGE on buffer regions, client and self-started server (lever)");
    bench->add_flag("--pin", bo.pin,
                    "pin the self-started server to the last CPU and client threads to the others");
    bench->add_flag("--no-poll-first", no_poll_first,
                    "always try a recv inline before arming its poll (lever)");
    // The engine's default, written the way users write sizes.
    std::string rcvlowat = std::to_string(engine::SocketStreamOptions{}.rcvlowat_max >> 10) + "Ki";
    bench->add_option("--rcvlowat", rcvlowat,
                      "TCP: large receives wake once this many bytes are queued "
                      "(SO_RCVLOWAT; 0: on every segment)")
        ->capture_default_str();
    std::string inline_send = std::to_string(engine::SocketStreamOptions{}.inline_send_max);
    bench->add_option("--inline-send", inline_send,
                      "sends of at most this many bytes (header + payload, up to 256) with nothing "
                      "queued behind go out of a copy with SEND instead of a SENDMSG (0: never "
                      "copy) (lever)")
        ->capture_default_str();
    std::string ring_mode = "defer";
    bench->add_option("--ring", ring_mode,
                      "ring set-up: defer (SINGLE_ISSUER|DEFER_TASKRUN, else coop), coop "
                      "(COOP_TASKRUN), sqpoll (a kernel thread polls the SQ; costs a CPU) (lever)")
        ->check(CLI::IsMember({"defer", "coop", "sqpoll"}))
        ->capture_default_str();
    std::string busy_poll = "auto";
    bench->add_option("--busy-poll", busy_poll,
                      "microseconds a waiting ring polls before it sleeps, client and "
                      "self-started server (costs a CPU while waiting; 0: sleep at once; auto: "
                      "50 when every client thread and the server can have a CPU, else 0)")
        ->capture_default_str();
    bench->add_flag("--read-fixed", read_fixed, "receive with READ_FIXED instead of RECV");

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : tools::kExitUsage;
    }

    try {
        if (*bench) {
            if (!bench_key_file.empty() && !(bo.auth_key = load_key(bench_key_file, "bench")))
                return tools::kExitUsage;
            if (!address.empty()) bo.address = engine::Endpoint::parse(address);
            bo.frame_size = size_arg(frame_size, "--frame-size");
            bo.reader.max_frame = size_arg(max_frame, "--max-frame");
            bo.pool_budget = size_arg(pool_budget, "--pool-budget");
            bo.stream.zerocopy_threshold = size_arg(zc_threshold, "--zerocopy-threshold");
            if (no_zc_fallback) bo.stream.zerocopy_fallback_after = 0;
            bo.register_buffers = !no_register;
            bo.huge_pages = !no_huge_pages;
            if (page_offset != "auto") {
                std::uint64_t v = size_arg(page_offset, "--page-offset");
                if (v >= 4096)
                    throw CLI::ValidationError("--page-offset",
                                               "'" + page_offset + "' is not auto or 0..4095");
                bo.page_offset = static_cast<long>(v);
            }
            bo.backend = engine::parse_backend(bench_backend);
            if (sndbuf != "auto") {
                bo.tuning.send_buffer = buffer_arg(sndbuf, "--sndbuf");
                if (bo.tuning.send_buffer == 0) bo.tuning.local_send_buffer = 0;
            }
            bo.tuning.recv_buffer = buffer_arg(rcvbuf, "--rcvbuf");
            bo.stream.read_fixed = read_fixed;
            bo.stream.poll_first = !no_poll_first;
            bo.stream.rcvlowat_max = size_arg(rcvlowat, "--rcvlowat");
            bo.stream.inline_send_max = size_arg(inline_send, "--inline-send");
            if (bo.stream.inline_send_max > engine::SocketStreamOptions::kInlineSendLimit) {
                std::fprintf(stderr, "ringxfer bench: --inline-send %s is above %zu bytes, the "
                                     "largest send copied inline\n", inline_send.c_str(),
                             engine::SocketStreamOptions::kInlineSendLimit);
                return tools::kExitUsage;
            }
            bo.ring.defer_taskrun = ring_mode == "defer";
            bo.ring.sqpoll = ring_mode == "sqpoll";
            if (busy_poll != "auto") {
                char* end = nullptr;
                double us = std::strtod(busy_poll.c_str(), &end);
                if (busy_poll.empty() || *end != '\0' || !(us >= 0 && us <= 1e6)) {
                    std::fprintf(stderr,
                                 "ringxfer bench: --busy-poll '%s' is not auto or a number of "
                                 "microseconds (0..1000000)\n",
                                 busy_poll.c_str());
                    return tools::kExitUsage;
                }
                bo.busy_poll_auto = false;
                bo.ring.busy_poll = std::chrono::microseconds(static_cast<long long>(us));
            }
            if (!bo.latency_log_path.empty() && bo.mode != "echo") {
                std::fprintf(stderr, "ringxfer bench: --latency-log records round trips, which "
                                     "only --mode echo has (this run: --mode %s)\n",
                             bo.mode.c_str());
                return tools::kExitUsage;
            }
            if (bo.frame_size > bo.reader.max_frame) {
                std::fprintf(stderr,
                             "ringxfer bench: --frame-size %llu is above --max-frame %llu\n",
                             static_cast<unsigned long long>(bo.frame_size),
                             static_cast<unsigned long long>(bo.reader.max_frame));
                return tools::kExitUsage;
            }
            return tools::run_bench(bo);
        }
        // serve
        ::signal(SIGPIPE, SIG_IGN);
        struct sigaction sa {};
        sa.sa_handler = on_signal;
        ::sigaction(SIGINT, &sa, nullptr);
        ::sigaction(SIGTERM, &sa, nullptr);
        sa.sa_handler = on_status;
        ::sigaction(SIGUSR1, &sa, nullptr);
        // Every connection is a descriptor: take all the hard limit allows
        // (a soft limit of 1024 is common). Beyond it, accepting pauses with
        // a message (tools/server.cpp) instead of failing connections.
        if (rlimit lim{}; ::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
            lim.rlim_cur = lim.rlim_max;
            ::setrlimit(RLIMIT_NOFILE, &lim);
        }
        engine::Endpoint ep = engine::Endpoint::parse(listen);
        tools::ServeOptions so;
        for (const auto& entry : allow) {
            std::string why;
            if (!so.allow.add(entry, why)) {
                std::fprintf(stderr, "ringxfer serve: %s\n", why.c_str());
                return tools::kExitUsage;
            }
        }
        if (!serve_key_file.empty() && !(so.auth_key = load_key(serve_key_file, "serve")))
            return tools::kExitUsage;
        if (!allow.empty() && ep.is_local_socket()) {
            // Not silently ignored: an operator who asked for an address
            // filter must not believe one is in force where none can be.
            std::fprintf(stderr,
                         "ringxfer serve: --allow filters TCP peers by address, and %s has no "
                         "peer addresses; on unix: and shm: sockets the file permissions decide "
                         "who connects (restrict the socket's directory with chmod/chown) — "
                         "drop --allow\n",
                         ep.to_string().c_str());
            return tools::kExitUsage;
        }
        engine::Fd listener = engine::listen_on(ep);
        engine::Endpoint bound = engine::local_endpoint(listener.get(), ep.kind);
        engine::RingOptions serve_ring;
        serve_ring.busy_poll = std::chrono::microseconds(serve_busy_poll);
        auto driver = engine::make_driver(engine::parse_backend(serve_backend), serve_ring);
        so.one_off = one_off;
        so.quiet = serve_quiet;
        so.store_and_forward = serve_saf;
        so.idle_timeout = std::chrono::milliseconds(static_cast<long long>(idle_timeout * 1000));
        so.min_rate = size_arg(min_rate, "--min-rate");
        so.max_connections = max_connections;
        so.reader.max_frame = size_arg(serve_max_frame, "--max-frame");
        engine::PoolOptions po;
        po.max_buffer_bytes = std::max<std::size_t>(so.reader.max_frame, 64 * 1024);
        po.page_offset = proto::payload_page_offset(bound.kind == engine::Endpoint::Kind::tcp);
        po.shared_memory = bound.kind == engine::Endpoint::Kind::shm;  // shm:PATH
        engine::BufferPool pool(driver->ring(), po);
        if (!serve_quiet) {
            std::fprintf(stderr, "ringxfer serve: listening on %s (%s)\n",
                         bound.to_string().c_str(), driver->describe().c_str());
            if (!so.allow.empty())
                std::fprintf(stderr, "ringxfer serve: accepting connections only from %s\n",
                             so.allow.to_string().c_str());
            if (so.auth_key)
                std::fprintf(stderr, "ringxfer serve: clients must authenticate with the key "
                                     "of %s\n", serve_key_file.c_str());
        }
        tools::ServeSummary s;
        {
            tools::Server server(*driver, pool, std::move(listener), so);
            s = server.run(g_stop, &g_status);
        }
        engine::PoolStats ps = pool.stats();  // every connection is gone: 0 unless a leak
        if (ep.is_local_socket() && ep.path[0] != '@')
            ::unlink(ep.path.c_str());
        if (!serve_quiet)
            std::fprintf(stderr,
                         "ringxfer serve: %llu connections, %llu frames, %s echoed, %llu errors, "
                         "%zu buffers leased, %llu refused\n",
                         static_cast<unsigned long long>(s.connections),
                         static_cast<unsigned long long>(s.frames),
                         tools::format_bytes(s.bytes).c_str(),
                         static_cast<unsigned long long>(s.errors), ps.leased_buffers,
                         static_cast<unsigned long long>(s.refused));
        return one_off && s.errors ? tools::kExitFailure : tools::kExitOk;
    } catch (const CLI::ValidationError& e) {
        std::fprintf(stderr, "ringxfer: %s\n", e.what());
        return tools::kExitUsage;
    } catch (const engine::Error& e) {
        std::fprintf(stderr, "ringxfer: %s\n", e.what());
        if (e.code() == ENOSYS || e.code() == EPERM || e.code() == EOPNOTSUPP)
            return tools::kExitNoUring;
        return e.code() == EINVAL ? tools::kExitUsage : tools::kExitFailure;
    }
}
