// `ringxfer serve`: accepts connections and echoes every frame back, on one
// ring. Each frame is received into one pooled buffer and sent back from that
// same buffer (no copy): by default cut-through, i.e. each chunk is echoed as
// soon as it lands; with store_and_forward after the whole frame arrived. The
// next frame is read while echoes are in flight, within a bytes-in-flight
// bound.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"

namespace ringxfer::tools {

struct ServeOptions {
    bool one_off = false;  ///< serve one connection, then return
    bool quiet = false;
    /// Receive each whole frame (and verify its checksum) before echoing it;
    /// default is cut-through (echo bytes as they arrive).
    bool store_and_forward = false;
    proto::ReaderOptions reader;
    proto::WriterOptions writer;
    engine::SocketStreamOptions stream;
    engine::SocketTuning tuning;
};

struct ServeSummary {
    std::uint64_t connections = 0;
    std::uint64_t frames = 0;
    std::uint64_t bytes = 0;
    std::uint64_t errors = 0;
};

class EchoConnection;

class Server {
public:
    Server(engine::Driver& driver, engine::BufferPool& pool, engine::Fd listener,
           ServeOptions options);
    ~Server();

    /// Runs until `stop` becomes true or (one-off) the connection ended.
    /// Returns the summary.
    ServeSummary run(const std::atomic<bool>& stop);

private:
    friend class EchoConnection;
    void arm_accept();
    void on_closed(EchoConnection* c, const std::string& why, bool error);

    engine::Driver& driver_;
    engine::BufferPool& pool_;
    engine::Fd listener_;
    ServeOptions options_;
    ServeSummary summary_;
    void* accept_op_ = nullptr;
    bool accepting_ = true;
    bool finished_ = false;
    std::unordered_set<std::shared_ptr<EchoConnection>> live_;
};

}  // namespace ringxfer::tools
