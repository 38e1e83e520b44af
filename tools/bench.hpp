// `ringxfer bench`: echo, stream, reverse and bidir tests against `serve`.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "auth.hpp"
#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"

namespace ringxfer::tools {

struct BenchOptions {
    std::optional<engine::Endpoint> address;  ///< none: start a loopback server
    std::string mode = "echo";
    std::string transport = "tcp";  ///< for the self-started server: tcp, unix or shm
    /// shm: frames are built in the shared pool and sent by reference (no
    /// copy); otherwise each payload is copied in once.
    bool fill_in_place = false;
    /// --auth-key-file, read once at start: every connection authenticates
    /// with it (the self-started server holds it too); none: no auth.
    std::shared_ptr<const AuthKey> auth_key;
    std::uint64_t frame_size = 100'000'000;
    std::uint64_t frames = 5;      ///< per connection (when seconds == 0)
    double seconds = 0;            ///< time-limited run when > 0
    double warmup_seconds = 0;
    std::uint64_t warmup_frames = 1;  ///< per connection
    std::uint64_t connections = 1;
    std::uint64_t threads = 1;
    /// Frames in flight per connection; 0: auto (effective_window()).
    std::uint64_t window = 0;
    double interval_seconds = 1;
    bool json_stream = false;
    bool verify = false;
    bool server_store_and_forward = false;  ///< self-started server mode
    bool quiet = false;
    std::string json_path;
    /// CSV of every measured echo round trip (end_ns,rtt_ns,connection).
    std::string latency_log_path;
    std::size_t pool_budget = std::size_t{4} << 30;
    bool register_buffers = true;
    /// MADV_HUGEPAGE on pool regions, client and self-started server.
    bool huge_pages = true;
    /// PoolOptions::page_offset of both sides; -1: auto
    /// (proto::payload_page_offset() for the transport).
    long page_offset = -1;
    /// Pin client threads and the self-started server to separate CPUs
    /// (server: the last CPU; clients: the others), so runs do not flip
    /// between "same core" and "different cores" from one run to the next.
    bool pin = false;
    engine::Backend backend = engine::Backend::automatic;
    /// Ring set-up for client threads and the self-started server (`--ring`).
    engine::RingOptions ring;
    /// `--busy-poll auto`: ring.busy_poll is chosen by busy_poll_for().
    bool busy_poll_auto = true;
    proto::ReaderOptions reader;
    proto::WriterOptions writer;
    engine::SocketStreamOptions stream;
    engine::SocketTuning tuning;
};

/// Exit codes of `ringxfer bench` / `serve` (docs/cli.md).
enum ExitCode : int {
    kExitOk = 0,
    kExitFailure = 1,      ///< transfer failed (connection, protocol, verify)
    kExitUsage = 2,        ///< bad command line
    kExitNoUring = 3,      ///< io_uring cannot be set up here
};

/// Runs the benchmark, prints the report, writes JSON. Returns an ExitCode.
/// The window a run uses: `window` when set; otherwise 1 for echo (the
/// seed's one-frame-in-flight round trips) and, for the one-way modes,
/// enough frames to keep 8 MiB queued (at least 2, at most 4096), so small
/// frames can leave many per syscall and large ones back to back.
std::uint64_t effective_window(const std::string& mode, std::uint64_t frame_size,
                               std::uint64_t window);

/// `--busy-poll auto`: 50 µs when every polling thread (the client threads,
/// plus the self-started server) can have a CPU of its own, else 0 (a spinning
/// thread would take the CPU its peer needs: measured in docs/performance.md).
std::chrono::microseconds busy_poll_for(std::size_t client_threads, bool self_started_server,
                                        unsigned cpus);

int run_bench(const BenchOptions& options);

}  // namespace ringxfer::tools
