#include "server.hpp"

#include <cstdio>
#include <cstring>
#include <optional>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/errors.hpp"

namespace ringxfer::tools {

class EchoConnection : public std::enable_shared_from_this<EchoConnection> {
public:
    EchoConnection(Server& server, engine::Fd fd)
        : server_(server),
          stream_(server.ring_, std::move(fd), server.options_.stream),
          reader_(stream_, server.pool_, server.options_.reader),
          writer_(stream_, server.options_.writer) {}

    void start() { read_next(); }

    void close() { stream_.close(); }

private:
    void read_next() {
        reader_.read([self = shared_from_this()](proto::Frame f, std::error_code ec) {
            self->on_frame(std::move(f), ec);
        });
    }

    void on_frame(proto::Frame frame, std::error_code ec) {
        if (ec) return finish(ec);
        server_.summary_.frames++;
        server_.summary_.bytes += frame.size();
        if (!write(frame)) {
            stalled_ = std::move(frame);  // back-pressure: resume on a write completion
            return;
        }
        read_next();
    }

    bool write(proto::Frame& frame) {
        return writer_.try_write(frame, [self = shared_from_this()](proto::Frame, std::error_code ec) {
            self->on_written(ec);
        });
    }

    void on_written(std::error_code ec) {
        if (ec) return finish(ec);
        if (stalled_ && write(*stalled_)) {
            stalled_.reset();
            read_next();
        }
        if (reading_done_ && writer_.bytes_in_flight() == 0) finish(proto::Errc::closed);
    }

    void finish(std::error_code ec) {
        if (ec == proto::Errc::closed && writer_.bytes_in_flight() > 0) {
            reading_done_ = true;  // clean close: let the echoes drain first
            return;
        }
        if (done_) return;
        done_ = true;
        bool error = ec != proto::Errc::closed;
        stream_.close();
        server_.on_closed(this, ec.message(), error);
    }

    Server& server_;
    engine::SocketStream stream_;
    proto::FrameReader reader_;
    proto::FrameWriter writer_;
    std::optional<proto::Frame> stalled_;
    bool reading_done_ = false;
    bool done_ = false;
    friend class Server;
};

Server::Server(engine::Ring& ring, engine::BufferPool& pool, engine::Fd listener,
               ServeOptions options)
    : ring_(ring), pool_(pool), listener_(std::move(listener)), options_(std::move(options)) {}

Server::~Server() {
    for (auto& c : live_) c->close();
    live_.clear();
    // Drain: cancelled operations still deliver their final completions.
    while (ring_.in_flight() > 0) ring_.run_once(1, std::chrono::milliseconds(100));
}

void Server::arm_accept() {
    accept_op_ = engine::async_accept(ring_, listener_.get(), [this](engine::Fd fd, int err) {
        accept_op_ = nullptr;
        if (err < 0) {
            if (err != -ECANCELED && !options_.quiet)
                std::fprintf(stderr, "ringxfer serve: accept failed: %s\n",
                             std::strerror(-err));
            if (accepting_ && err != -ECANCELED) arm_accept();
            return;
        }
        engine::tune_socket(fd.get(), options_.tuning);
        summary_.connections++;
        auto conn = std::make_shared<EchoConnection>(*this, std::move(fd));
        live_.insert(conn);
        if (options_.one_off) {
            accepting_ = false;
            listener_.reset();
        } else {
            arm_accept();
        }
        conn->start();
    });
}

void Server::on_closed(EchoConnection* c, const std::string& why, bool error) {
    if (error) {
        summary_.errors++;
        if (!options_.quiet)
            std::fprintf(stderr, "ringxfer serve: connection from %s dropped: %s\n",
                         c->stream_.peer().c_str(), why.c_str());
    }
    for (auto it = live_.begin(); it != live_.end(); ++it) {
        if (it->get() == c) {
            live_.erase(it);  // in-flight handlers keep it alive until they ran
            break;
        }
    }
    if (options_.one_off && live_.empty()) finished_ = true;
}

ServeSummary Server::run(const std::atomic<bool>& stop) {
    arm_accept();
    while (!finished_ && !stop.load(std::memory_order_relaxed)) {
        int ret = ring_.run_once(1, std::chrono::milliseconds(200));
        if (ret < 0 && ret != -EINTR)
            throw engine::Error(-ret, engine::errno_message("io_uring wait failed", ret));
    }
    if (accept_op_) {
        ring_.cancel(accept_op_);
        accepting_ = false;
    }
    return summary_;
}

}  // namespace ringxfer::tools
