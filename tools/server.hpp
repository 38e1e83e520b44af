// `ringxfer serve`: accepts connections and serves bench tests on one event
// loop (io_uring, or the epoll fallback).
//
// A connection whose first frame is a control "hello" runs the test it names
// (echo, stream, reverse, bidir; see control.hpp); one whose first frame is a
// data frame gets plain echo. Echo sends each frame back from the very buffer
// it was received into: cut-through by default (each chunk as soon as it
// lands, as Lease::share views), or store-and-forward. Reverse/bidir send one
// pooled pattern buffer over and over as shared views: no per-frame fill, no
// copy. Every limit is enforced per connection: a misbehaving peer is
// dropped with a log line naming it; everyone else is served on.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "access.hpp"
#include "auth.hpp"
#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"

namespace ringxfer::tools {

struct ServeOptions {
    /// Serve one test (all the connections its hello announced, or one plain
    /// echo connection), then return.
    bool one_off = false;
    bool quiet = false;
    /// Receive each whole frame (and verify its checksum) before echoing it;
    /// default is cut-through (echo bytes as they arrive).
    bool store_and_forward = false;
    /// Close connections with no traffic for this long (0: never).
    std::chrono::milliseconds idle_timeout{0};
    /// A frame in progress must arrive at least this fast (bytes/s, averaged
    /// over `rate_window`), so a peer that sends a header and then trickles
    /// is cut off; 0: no minimum.
    std::uint64_t min_rate = 64 * 1024;
    std::chrono::milliseconds rate_window{10'000};
    /// Connections served at once; more are accepted and closed at once with
    /// a log line (0: no limit).
    std::uint64_t max_connections = 1024;
    /// TCP peers outside every range are closed at accept, before anything
    /// is read from them, with a log line (empty: everyone may connect).
    AllowList allow;
    /// With a key, every connection must first pass the challenge-response
    /// of auth.hpp; until then the server reads only the handshake's frames
    /// (at most kPreAuthMaxFrame each) and processes no hello or data frame.
    std::shared_ptr<const AuthKey> auth_key;
    /// A peer that has not authenticated by then is closed (bench's connect
    /// timeout: 10 s).
    std::chrono::milliseconds auth_timeout{10'000};
    /// An idle connection holds a 4 KiB staging buffer, not 64 KiB: hundreds
    /// of them stay cheap (full size once data arrives).
    proto::ReaderOptions reader{.initial_staging_bytes = proto::kSmallStagingBytes};
    proto::WriterOptions writer;
    engine::SocketStreamOptions stream;
    engine::SocketTuning tuning;
};

struct ServeSummary {
    std::uint64_t connections = 0;
    std::uint64_t frames = 0;  ///< data frames received
    std::uint64_t bytes = 0;   ///< payload bytes received
    std::uint64_t frames_sent = 0;
    std::uint64_t bytes_sent = 0;
    std::uint64_t errors = 0;  ///< connections dropped for an error
    std::uint64_t refused = 0;  ///< closed at accept: outside --allow
};

/// The largest frame read from a peer that has not authenticated yet: the
/// handshake's frames are ~200 bytes; nothing bigger is leased for a
/// stranger.
inline constexpr std::uint64_t kPreAuthMaxFrame = 4096;

class TestConnection;

class Server {
public:
    Server(engine::Driver& driver, engine::BufferPool& pool, engine::Fd listener,
           ServeOptions options);
    ~Server();

    /// Runs until `stop` becomes true or (one-off) the test ended. Whenever
    /// `status` is set (SIGUSR1 in `ringxfer serve`) it is cleared and one
    /// status line goes to stderr: open connections and leased pool buffers.
    ServeSummary run(const std::atomic<bool>& stop, std::atomic<bool>* status = nullptr);

private:
    friend class TestConnection;
    void arm_accept();
    void on_hello(std::uint64_t connections);
    void on_closed(TestConnection* c, const std::string& why, bool error);
    void sweep();  // idle timeouts and minimum frame rates

    engine::Driver& driver_;
    engine::BufferPool& pool_;
    engine::Fd listener_;
    ServeOptions options_;
    ServeSummary summary_;
    void* accept_op_ = nullptr;
    bool accepting_ = true;
    bool accept_paused_ = false;  // out of descriptors: retried at each sweep
    bool told_out_of_fds_ = false;
    bool finished_ = false;
    std::uint64_t accepted_ = 0;
    std::uint64_t expected_ = 0;  // one-off: connections the test announced
    std::chrono::steady_clock::time_point next_sweep_{};
    std::unordered_set<std::shared_ptr<TestConnection>> live_;
    std::vector<std::shared_ptr<TestConnection>> closing_;  // dropped after the batch
};

}  // namespace ringxfer::tools
