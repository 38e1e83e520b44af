// One bench connection: negotiates the test over the control channel, then
// drives its mode (echo, stream, reverse, bidir) on the thread's Driver,
// counting only what completes inside the measured span.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "auth.hpp"
#include "control.hpp"
#include "histogram.hpp"
#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"

namespace ringxfer::tools {

using Clock = std::chrono::steady_clock;

struct TestSpec {
    /// An enum, not the --mode string: connections test it several times
    /// per frame (string compares were 8% of a 64-byte echo client's
    /// instructions).
    TestMode mode = TestMode::echo;
    std::uint64_t frame_bytes = 0;
    std::uint64_t frames = 0;  ///< per connection; 0: time-limited
    std::uint64_t window = 1;  ///< frames in flight per connection and direction
    std::uint64_t warmup_frames = 0;  ///< per connection, excluded
    bool verify = false;
    std::uint64_t connections = 1;
    /// shm: frames are built in the shared pool and go by reference (no
    /// copy in), on both sides (the server's reverse/bidir frames too).
    bool fill_in_place = false;
    /// --auth-key-file: each connection first proves it holds this key and
    /// checks that the server does (auth.hpp); none: no authentication.
    std::shared_ptr<const AuthKey> auth_key;
    /// How long the server may take to complete authentication.
    std::chrono::milliseconds auth_timeout{10'000};
    /// echo --verify: each frame carries its sequence number, so it needs a
    /// buffer of its own; everything else sends views of one pattern.
    bool stamps_echoes() const { return mode == TestMode::echo && verify; }
};

/// Shared by every connection and the reporting thread. The measured span
/// starts once every connection finished its warm-up frames and the warm-up
/// time has passed (whoever notices first flips it); completions are counted
/// only while `measuring` and not `stopped`.
struct RunState {
    explicit RunState(std::uint64_t connections, Clock::duration warmup)
        : total(connections), warmup(warmup), launch(Clock::now()) {}

    const std::uint64_t total;
    const Clock::duration warmup;
    const Clock::time_point launch;
    std::atomic<std::uint64_t> ready{0};     // connections past their warm-up frames
    std::atomic<std::uint64_t> finished{0};  // connections that reached --frames
    std::atomic<bool> measuring{false};
    std::atomic<bool> stopped{false};  // time limit reached: count nothing more
    std::atomic<std::int64_t> start_ns{0};  // measured span start (since launch)
    std::atomic<std::int64_t> last_done_ns{0};  // last --frames completion (since launch)

    void maybe_start();  // flips `measuring` when the conditions hold
    Clock::time_point measure_start() const {
        return launch + std::chrono::nanoseconds(start_ns.load());
    }

    /// The reporting thread sleeps until its next deadline (a tick, the time
    /// limit) or until a worker has news: measuring began, a connection
    /// reached --frames, a worker exited. It does not wake on a fixed short
    /// period: on two CPUs shared with busy-polling rings, every wake-up
    /// takes a CPU from one of them (a 2 ms period cost the 64-byte
    /// ping-pong's p99, docs/performance.md).
    void notify();
    std::uint64_t events();  ///< read before checking state, passed to wait()
    void wait(std::uint64_t seen, Clock::time_point deadline);

private:
    std::mutex mu_;
    std::mutex wake_mu_;
    std::condition_variable wake_;
    std::uint64_t events_ = 0;  // guarded by wake_mu_
};

/// Counters of one connection, written by its thread, sampled by the
/// reporting thread (relaxed atomics: totals, no ordering needed).
struct ConnCounters {
    std::atomic<std::uint64_t> bytes_tx{0}, frames_tx{0};
    std::atomic<std::uint64_t> bytes_rx{0}, frames_rx{0};
    std::atomic<std::uint64_t> errors{0};
};

class ClientConnection : public std::enable_shared_from_this<ClientConnection> {
public:
    ClientConnection(engine::Driver& driver, engine::BufferPool& pool, engine::Fd fd,
                     const TestSpec& spec, std::size_t index, RunState& run,
                     const proto::ReaderOptions& ro, const proto::WriterOptions& wo,
                     const engine::SocketStreamOptions& so, Histogram& latency_ns,
                     LatencyLog& latency_log, proto::Frame pattern);

    void start();
    bool done() const { return done_; }
    /// After the driver drained: drops the stream and buffers (they belong
    /// to this thread's driver and pool), keeping the results.
    void release_resources() {
        echo_bufs_.clear();
        pattern_.reset();
        stream_.reset();
    }
    /// Ends the connection with `why` unless it already finished.
    void abort_if_running(const std::string& why) {
        if (!done_) fail(why);
    }
    /// Ends the connection if the server has not completed authentication
    /// within spec.auth_timeout of start(); bench checks it as it waits.
    void check_auth_deadline(Clock::time_point now);

    // Results, read after the connection's thread finished.
    std::string error;
    nlohmann::json server_results;  ///< the server's "results" message
    ConnCounters counters;
    engine::StreamCounters stream_counters;
    std::uint64_t receive_copied_bytes = 0;
    std::size_t index;

private:
    bool sends() const { return spec_.mode != TestMode::reverse; }
    bool counting() const { return run_.measuring.load() && !run_.stopped.load() && !stop_sent_; }
    bool count_tx() const { return counting() && (spec_.frames == 0 || tx_counted_ < spec_.frames); }
    bool count_rx() const { return counting() && (spec_.frames == 0 || rx_counted_ < spec_.frames); }
    bool stopping() const { return stop_sent_ || limit_reached_ || run_.stopped.load(); }

    void send_control(const nlohmann::json& j);
    void send_hello();
    void on_auth_message(const nlohmann::json& msg, const std::string& type);
    void on_control(const proto::Frame& f);
    void read_next();
    void on_frame(proto::Frame f, std::error_code ec);
    void pump_sends();
    void on_sent(proto::Frame f, std::error_code ec);
    void progress();  // warm-up and --frames bookkeeping after any completion
    void maybe_finish_data();
    void fail(const std::string& what);
    /// `what`, with the likely causes when the connection ended before the
    /// server accepted the test (--allow, --max-connections).
    std::string lost_before_accepted(const std::string& what) const;
    bool verify_payload(const proto::Frame& f, std::uint64_t seq);
    bool stamps_echoes() const { return spec_.stamps_echoes(); }

    engine::Driver& driver_;
    engine::BufferPool& pool_;
    std::unique_ptr<engine::Stream> stream_;
    proto::FrameReader reader_;
    proto::FrameWriter writer_;
    TestSpec spec_;
    RunState& run_;
    // Echo round trips in ns, shared by the connections of one thread (the
    // worker owns it; a histogram per connection would cost 30 KiB each).
    Histogram& latency_ns_;
    LatencyLog& latency_log_;  // the same round trips one by one, when asked for

    // What this connection sends, every frame a view of it: a share of one
    // pattern per client thread, instead of a buffer per connection (1000
    // connections of 64 KiB echoes took the client from 144 to 82 MiB).
    // Empty for echo --verify, which sends echo_bufs_.
    proto::Frame pattern_;
    // echo --verify only: one buffer per window slot, its first 8 bytes
    // stamped with the frame's sequence number (checked on the way back).
    std::vector<proto::Frame> echo_bufs_;
    std::deque<std::pair<std::uint64_t, Clock::time_point>> echo_in_flight_;
    std::uint64_t next_seq_ = 0;
    std::uint64_t sends_in_flight_ = 0;
    std::uint64_t tx_done_ = 0, rx_done_ = 0;  // completions, warm-up included
    std::uint64_t tx_counted_ = 0, rx_counted_ = 0;  // completions in the measured span
    const std::byte* echo_reference_ = nullptr;  // pattern bytes the echoes must carry
    bool hello_ok_ = false;
    bool authenticated_ = false;  // true from start() when there is no key
    bool challenged_ = false;     // the server proved the key; our proof went out
    AuthNonce client_nonce_{};
    Clock::time_point auth_started_{};
    bool ready_noted_ = false;
    bool marked_ = false;
    bool limit_reached_ = false;
    bool stop_sent_ = false;
    bool done_ = false;
};

}  // namespace ringxfer::tools
