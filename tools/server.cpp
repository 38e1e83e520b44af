#include "server.hpp"

#include <cstdio>
#include <cstring>
#include <optional>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/errors.hpp"

namespace ringxfer::tools {

// Echoes frames back. Default: cut-through — each frame's bytes are sent back
// as they land (Lease::share views of the one receive buffer, so no copy),
// overlapping the two directions. With store_and_forward the whole frame is
// received (and its checksum verified) before it is written back.
class EchoConnection : public std::enable_shared_from_this<EchoConnection> {
public:
    EchoConnection(Server& server, engine::Fd fd)
        : server_(server),
          stream_(server.driver_.make_stream(std::move(fd), server.options_.stream)),
          reader_(*stream_, server.pool_, server.options_.reader),
          writer_(*stream_, server.options_.writer) {}

    void start() { read_next(); }

    void close() { stream_->close(); }

private:
    void read_next() {
        auto self = shared_from_this();
        auto on_frame = [self](proto::Frame f, std::error_code ec) {
            self->on_frame(std::move(f), ec);
        };
        if (server_.options_.store_and_forward) return reader_.read(on_frame);
        forwarded_ = 0;
        header_sent_ = false;
        reader_.read(on_frame, [self](const proto::FrameHeader& h, const engine::Lease& payload,
                                      std::size_t ready) { self->forward(h, payload, ready); });
    }

    /// Cut-through: sends the header (first call) and the newly landed bytes.
    void forward(const proto::FrameHeader& h, const engine::Lease& payload, std::size_t ready) {
        engine::SendBuffers b;
        if (!header_sent_) {
            proto::encode_header(h, std::span<std::byte, proto::kHeaderSize>(b.prefix.data(),
                                                                             proto::kHeaderSize));
            b.prefix_len = proto::kHeaderSize;
            header_sent_ = true;
        }
        if (ready > forwarded_) {
            b.body = payload.share(forwarded_, ready - forwarded_);
            b.body_len = ready - forwarded_;
            forwarded_ = ready;
        }
        if (b.prefix_len + b.body_len == 0) return;
        queued_ += b.prefix_len + b.body_len;
        stream_->send(std::move(b), [self = shared_from_this()](engine::SendBuffers sent,
                                                               engine::IoResult r) {
            self->queued_ -= sent.prefix_len + sent.body_len;
            if (r.err) return self->finish(engine::errno_code(r.err));
            self->on_drained();
        });
    }

    void on_frame(proto::Frame frame, std::error_code ec) {
        if (ec) return finish(ec);
        server_.summary_.frames++;
        server_.summary_.bytes += frame.size();
        if (!server_.options_.store_and_forward) {
            frame.reset();  // the queued sends hold their own views of the buffer
            if (queued_ <= server_.options_.writer.max_bytes_in_flight)
                read_next();
            else
                waiting_for_drain_ = true;
            return;
        }
        if (!write(frame)) {
            stalled_ = std::move(frame);  // back-pressure: resume on a write completion
            return;
        }
        read_next();
    }

    bool write(proto::Frame& frame) {
        return writer_.try_write(frame, [self = shared_from_this()](proto::Frame, std::error_code ec) {
            if (ec) return self->finish(ec);
            self->on_drained();
        });
    }

    void on_drained() {
        if (stalled_ && write(*stalled_)) {
            stalled_.reset();
            read_next();
        }
        if (waiting_for_drain_ && queued_ <= server_.options_.writer.max_bytes_in_flight) {
            waiting_for_drain_ = false;
            read_next();
        }
        if (reading_done_ && in_flight() == 0) finish(proto::Errc::closed);
    }

    std::size_t in_flight() const { return queued_ + writer_.bytes_in_flight(); }

    void finish(std::error_code ec) {
        if (ec == proto::Errc::closed && in_flight() > 0) {
            reading_done_ = true;  // clean close: let the echoes drain first
            return;
        }
        if (done_) return;
        done_ = true;
        bool error = ec != proto::Errc::closed;
        stream_->close();
        server_.on_closed(this, ec.message(), error);
    }

    Server& server_;
    std::unique_ptr<engine::Stream> stream_;
    proto::FrameReader reader_;
    proto::FrameWriter writer_;
    std::optional<proto::Frame> stalled_;
    std::size_t queued_ = 0;     // cut-through bytes handed to the stream, not yet sent
    std::size_t forwarded_ = 0;  // payload bytes of the current frame already queued
    bool header_sent_ = false;
    bool waiting_for_drain_ = false;
    bool reading_done_ = false;
    bool done_ = false;
    friend class Server;
};

Server::Server(engine::Driver& driver, engine::BufferPool& pool, engine::Fd listener,
               ServeOptions options)
    : driver_(driver), pool_(pool), listener_(std::move(listener)), options_(std::move(options)) {}

Server::~Server() {
    for (auto& c : live_) c->close();
    live_.clear();
    // Drain: cancelled operations still deliver their final completions.
    while (driver_.in_flight() > 0) driver_.run_once(1, std::chrono::milliseconds(100));
}

void Server::arm_accept() {
    accept_op_ = driver_.async_accept(listener_.get(), [this](engine::Fd fd, int err) {
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
                         c->stream_->peer().c_str(), why.c_str());
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
        int ret = driver_.run_once(1, std::chrono::milliseconds(200));
        if (ret < 0 && ret != -EINTR)
            throw engine::Error(-ret, engine::errno_message("event loop wait failed", ret));
    }
    if (accept_op_) {
        driver_.cancel(accept_op_);
        accepting_ = false;
    }
    return summary_;
}

}  // namespace ringxfer::tools
