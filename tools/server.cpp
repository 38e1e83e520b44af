#include "server.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <optional>

#include <sys/resource.h>

#include "control.hpp"
#include "pattern.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/errors.hpp"

namespace ringxfer::tools {
namespace {

using Clock = std::chrono::steady_clock;

/// Clock::now() (steady_clock: CLOCK_MONOTONIC) from CLOCK_MONOTONIC_COARSE,
/// the same clock at jiffy resolution, read without touching the TSC.
Clock::time_point coarse_now() noexcept {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return Clock::time_point(std::chrono::duration_cast<Clock::duration>(
        std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec)));
}

}  // namespace

class TestConnection : public std::enable_shared_from_this<TestConnection> {
public:
    enum class Mode { unknown, plain_echo, echo, stream, reverse, bidir };

    TestConnection(Server& server, engine::Fd fd)
        : server_(server),
          own_pool_(own_pool_for(server, fd)),
          stream_(engine::make_stream_for(server.driver_, std::move(fd), pool(), false,
                                          server.options_.stream)),
          reader_(*stream_, pool(), server.options_.reader),
          writer_(*stream_, server.options_.writer),
          last_activity_(Clock::now()),
          accepted_at_(last_activity_),
          authenticated_(!server.options_.auth_key) {
        if (!authenticated_) reader_.set_max_frame(kPreAuthMaxFrame);
    }

    void start() { read_next(); }

    /// An shm client can read whole regions of the pool it is sent from
    /// (docs/security.md): each shm connection gets a pool of its own, so
    /// no client ever maps memory that held another client's bytes.
    static std::unique_ptr<engine::BufferPool> own_pool_for(Server& server, const engine::Fd& fd) {
        if (!server.pool_.options().shared_memory || !engine::is_shm_rendezvous(fd.get()))
            return nullptr;
        engine::PoolOptions po = server.pool_.options();
        po.register_buffers = false;  // the shm transport uses no fixed buffers (one table per ring)
        return std::make_unique<engine::BufferPool>(server.driver_.ring(), po);
    }
    engine::BufferPool& pool() { return own_pool_ ? *own_pool_ : server_.pool_; }
    /// Where reverse/bidir frames are built: over shm, outside the shared
    /// pool (each send copies its payload in once, like a socket's send)
    /// unless the client said --fill-in-place.
    engine::BufferPool& send_pool() {
        if (!own_pool_ || fill_in_place_) return pool();
        if (!plain_pool_) {
            engine::PoolOptions plain = own_pool_->options();
            plain.shared_memory = false;
            plain.register_buffers = false;
            plain_pool_ = std::make_unique<engine::BufferPool>(server_.driver_.ring(), plain);
        }
        return *plain_pool_;
    }
    void close() { stream_->close(); }
    /// No traffic for longer than `timeout`. Bytes that keep arriving in the
    /// socket count as traffic even while a recv waits for its low water mark.
    bool idle(Clock::time_point now, Clock::duration timeout) {
        if (now - last_activity_ <= timeout) return false;
        std::size_t queued = stream_->pending_input();
        if (queued == last_queued_) return true;
        last_queued_ = queued;
        touch();
        return false;
    }

    /// Minimum-rate check for the frame in progress, from the server's sweep:
    /// the rate is measured over windows of `window`; a window below `min`
    /// bytes/s drops the connection.
    void check_rate(Clock::time_point now, std::uint64_t min, Clock::duration window) {
        std::uint64_t length = reader_.pending_length();
        // Bytes still in the socket count as arrived: a large recv waits for
        // them to reach its low water mark (up to 1 MiB) before taking them.
        std::uint64_t got = reader_.pending_received();
        got += std::min<std::uint64_t>(stream_->pending_input(), length - got);
        if (min == 0 || length == 0) {
            rate_tracking_ = false;
            return;
        }
        if (!rate_tracking_) {
            rate_tracking_ = true;
            rate_since_ = now;
            rate_bytes_ = got;
            return;
        }
        auto elapsed = now - rate_since_;
        if (elapsed < window) return;
        double secs = std::chrono::duration<double>(elapsed).count();
        double rate = static_cast<double>(got - rate_bytes_) / secs;
        if (rate < static_cast<double>(min)) {
            char why[160];
            std::snprintf(why, sizeof why,
                          "sent a %llu-byte frame at %.0f B/s for %.1f s, below the minimum "
                          "%llu B/s",
                          static_cast<unsigned long long>(length), rate, secs,
                          static_cast<unsigned long long>(min));
            return abort(why);
        }
        rate_since_ = now;
        rate_bytes_ = got;
    }
    std::string peer() const { return stream_->peer(); }
    /// Connected for longer than `timeout` without passing authentication.
    bool auth_overdue(Clock::time_point now, Clock::duration timeout) const {
        return !authenticated_ && now - accepted_at_ > timeout;
    }

    /// Drops the connection with a reason (idle sweep, limits).
    void abort(const std::string& why) {
        if (done_) return;
        done_ = true;
        stream_->close();
        server_.on_closed(this, why, true);
    }

private:
    bool echoes() const { return mode_ == Mode::echo || mode_ == Mode::plain_echo; }
    bool cut_through() const { return !server_.options_.store_and_forward; }
    // Per frame: a coarse clock (a few ms of resolution, no clock read from
    // the hardware) is plenty for an idle timeout measured in seconds.
    void touch() { last_activity_ = coarse_now(); }

    void read_next() {
        if (done_ || refusing_) return;
        auto self = shared_from_this();
        auto on_frame = [self](proto::Frame f, std::error_code ec) {
            self->on_frame(std::move(f), ec);
        };
        // Before authentication, whole frames only: nothing is echoed.
        if (!authenticated_ || !cut_through() || !(echoes() || mode_ == Mode::unknown))
            return reader_.read(on_frame);
        forwarded_ = 0;
        header_sent_ = false;
        reader_.read(on_frame, [self](const proto::FrameHeader& h, const engine::Lease& payload,
                                      std::size_t ready) { self->forward(h, payload, ready); });
    }

    /// Cut-through echo: sends the header (first call) and the newly landed
    /// bytes of a data frame. Control frames are handled whole in on_frame.
    void forward(const proto::FrameHeader& h, const engine::Lease& payload, std::size_t ready) {
        touch();
        if (h.flags & proto::kFlagControl) return;
        if (mode_ == Mode::unknown) mode_ = Mode::plain_echo;
        // The header travels with the first payload bytes: one send, not two.
        if (!header_sent_ && ready == 0 && h.length > 0) return;
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
            self->touch();
            self->on_drained();
        });
    }

    void on_frame(proto::Frame frame, std::error_code ec) {
        if (!authenticated_) return on_auth_frame(frame, ec);
        if (ec) return finish(ec);
        touch();
        if (frame.is_control()) return on_control(frame);
        if (mode_ == Mode::unknown) mode_ = Mode::plain_echo;
        frames_in_++;
        bytes_in_ += frame.size();
        server_.summary_.frames++;
        server_.summary_.bytes += frame.size();
        switch (mode_) {
            case Mode::stream:
            case Mode::bidir:
                frame.reset();  // consumed: the buffer goes back to the pool
                return read_next();
            case Mode::reverse:
                return fail("sent a data frame in a reverse test");
            default:
                break;
        }
        // Echo.
        if (cut_through()) {
            frames_out_++;
            bytes_out_ += frame.size();
            frame.reset();  // the queued sends hold their own views of the buffer
            if (queued_ <= server_.options_.writer.max_bytes_in_flight)
                read_next();
            else
                waiting_for_drain_ = true;
            return;
        }
        if (!write_echo(frame)) {
            stalled_ = std::move(frame);  // back-pressure: resume on a write completion
            return;
        }
        read_next();
    }

    /// The challenge-response of auth.hpp, one frame at a time. Anything
    /// else before it succeeds is refused with an error frame that says
    /// what to do, and nothing more is read.
    void on_auth_frame(const proto::Frame& frame, std::error_code ec) {
        if (ec) {
            if (ec == proto::Errc::closed) return fail("closed the connection while authenticating");
            if (ec == proto::Errc::too_large)
                return fail("sent a frame above " + std::to_string(kPreAuthMaxFrame) +
                            " bytes before authenticating");
            return fail("while authenticating: " + ec.message());
        }
        static const std::string kNeedKey =
            "this server requires authentication: run bench with --auth-key-file FILE, FILE "
            "holding the same key as the server's --auth-key-file";
        if (!frame.is_control())
            return refuse(kNeedKey, "sent a data frame before authenticating (no key?)");
        std::string error;
        auto msg = parse_control(frame, error);
        if (!msg) return fail(error);
        const std::string type = (*msg)["type"];
        const AuthKey& key = *server_.options_.auth_key;
        if (!challenged_) {
            if (type != "auth")
                return refuse(kNeedKey, "sent '" + type + "' before authenticating (no key?)");
            if (msg->value("protocol", 0) != kControlProtocol)
                return refuse_protocol(msg->value("protocol", 0));
            if (!from_hex(msg->value("nonce", ""), client_nonce_))
                return refuse("malformed auth message: \"nonce\" must be 64 hex digits",
                              "sent a malformed auth nonce");
            server_nonce_ = random_nonce();
            challenged_ = true;
            reply({{"type", "auth-challenge"},
                   {"nonce", to_hex(server_nonce_)},
                   {"proof", to_hex(key.proof(AuthRole::server, client_nonce_, server_nonce_))}});
            return read_next();
        }
        AuthProof claimed{};
        if (type != "auth-proof" || !from_hex(msg->value("proof", ""), claimed))
            return refuse("expected an auth-proof with 64 hex digits, got '" + type + "'",
                          "sent '" + type + "' instead of its auth-proof");
        if (!key.check(AuthRole::client, client_nonce_, server_nonce_, claimed))
            return refuse("authentication failed: this client's key differs from the server's; "
                          "give both the same --auth-key-file",
                          "authentication failed (wrong key)");
        authenticated_ = true;
        reader_.set_max_frame(server_.options_.reader.max_frame);
        reply({{"type", "auth-ok"}});
        read_next();
    }

    void on_control(const proto::Frame& frame) {
        std::string error;
        auto msg = parse_control(frame, error);
        if (!msg) return fail(error);
        const std::string type = (*msg)["type"];
        if (type == "hello") {
            if (mode_ != Mode::unknown) return fail("sent a second hello");
            if (msg->value("protocol", 0) != kControlProtocol)
                return refuse_protocol(msg->value("protocol", 0));
            std::string mode = msg->value("mode", "echo");
            TestMode asked;
            if (!parse_test_mode(mode, asked))
                return refuse("unknown test mode '" + mode + "'",
                              "asked for unknown mode '" + mode + "'");
            switch (asked) {
                case TestMode::echo: mode_ = Mode::echo; break;
                case TestMode::stream: mode_ = Mode::stream; break;
                case TestMode::reverse: mode_ = Mode::reverse; break;
                case TestMode::bidir: mode_ = Mode::bidir; break;
            }
            frame_bytes_ = msg->value("frame_bytes", std::uint64_t{0});
            fill_in_place_ = msg->value("fill_in_place", false);
            window_ = std::max<std::uint64_t>(1, msg->value("window", std::uint64_t{1}));
            if (frame_bytes_ > server_.options_.reader.max_frame)
                return refuse("frame size " + std::to_string(frame_bytes_) +
                                  " is above the server's --max-frame " +
                                  std::to_string(server_.options_.reader.max_frame),
                              "asked for frames above --max-frame");
            server_.on_hello(msg->value("connections", std::uint64_t{1}));
            mark_ = ProcessUsage::now();
            reply({{"type", "hello-ok"}, {"protocol", kControlProtocol}});
            if (mode_ == Mode::reverse || mode_ == Mode::bidir) {
                if (int ret = proto::Frame::allocate(send_pool(), frame_bytes_, pattern_);
                    ret < 0)
                    return fail(engine::errno_message("cannot lease the send buffer", ret));
                fill_pattern(pattern_.mutable_payload(), kPatternSeed);
                generating_ = true;
                generate();
            }
        } else if (type == "auth") {
            // Only a server with a key can prove it has one; the client
            // refuses to go on without that proof, so say so plainly.
            return refuse("the client asked for authentication, but this server has no "
                          "--auth-key-file: start serve with the same --auth-key-file, or run "
                          "bench without it",
                          "asked for authentication, but serve has no --auth-key-file");
        } else if (type == "mark") {
            mark_ = ProcessUsage::now();
            frames_in_ = bytes_in_ = frames_out_ = bytes_out_ = 0;
        } else if (type == "end") {
            end_received_ = true;
        } else if (type == "stop") {
            end_received_ = true;
            generating_ = false;
        } else {
            return fail("sent unknown control message '" + type + "'");
        }
        maybe_send_results();
        read_next();
    }

    /// Reverse/bidir: keeps `window` frames queued, each a shared view of
    /// the one pattern buffer.
    void generate() {
        const std::size_t cost = frame_bytes_ + proto::kHeaderSize;
        while (generating_ && !done_ && writer_.bytes_in_flight() + cost <= window_ * cost) {
            proto::Frame f(pattern_.lease().share(), 0);
            if (!writer_.try_write(f, [self = shared_from_this()](proto::Frame sent,
                                                                  std::error_code ec) {
                    if (ec) return self->finish(ec);
                    self->touch();
                    self->frames_out_++;
                    self->bytes_out_ += sent.size();
                    self->server_.summary_.frames_sent++;
                    self->server_.summary_.bytes_sent += sent.size();
                    self->generate();
                    self->maybe_send_results();
                }))
                break;
        }
    }

    bool write_echo(proto::Frame& frame) {
        std::size_t size = frame.size();
        return writer_.try_write(frame, [self = shared_from_this(), size](proto::Frame,
                                                                          std::error_code ec) {
            if (ec) return self->finish(ec);
            self->frames_out_++;
            self->bytes_out_ += size;
            self->on_drained();
        });
    }

    void on_drained() {
        if (stalled_ && write_echo(*stalled_)) {
            stalled_.reset();
            read_next();
        }
        if (waiting_for_drain_ && queued_ <= server_.options_.writer.max_bytes_in_flight) {
            waiting_for_drain_ = false;
            read_next();
        }
        maybe_send_results();
        if (reading_done_ && in_flight() == 0) finish(proto::Errc::closed);
    }

    std::size_t in_flight() const { return queued_ + writer_.bytes_in_flight(); }

    /// After "end"/"stop" and once everything owed has been sent: the
    /// server's view of the test, for the client's report.
    void maybe_send_results() {
        if (results_sent_ || !end_received_ || in_flight() > 0 || stalled_) return;
        results_sent_ = true;
        ProcessUsage u = ProcessUsage::now();
        reply({{"type", "results"},
               {"frames_received", frames_in_},
               {"bytes_received", bytes_in_},
               {"frames_sent", frames_out_},
               {"bytes_sent", bytes_out_},
               {"cpu", {{"user_s", u.user_s - mark_.user_s}, {"sys_s", u.sys_s - mark_.sys_s}}},
               {"rss_peak_bytes", u.rss_peak_bytes}});
    }

    void refuse_protocol(int theirs) {
        refuse("control protocol mismatch: client speaks " + std::to_string(theirs) +
                   ", server speaks " + std::to_string(kControlProtocol) +
                   "; use the same ringxfer version on both sides",
               "control protocol mismatch");
    }

    /// Tells the client why its test is refused, then drops the connection
    /// once the reply is out (closing first would cancel the reply).
    void refuse(const std::string& message, const std::string& log_reason) {
        refusing_ = true;
        reply({{"type", "error"}, {"message", message}},
              [self = shared_from_this(), log_reason] { self->fail(log_reason); });
    }

    void reply(const nlohmann::json& j, std::function<void()> after = nullptr) {
        engine::SendBuffers b;
        if (make_control_send(pool(), j, b) < 0) return fail("cannot lease a control frame");
        stream_->send(std::move(b), [self = shared_from_this(), after = std::move(after)](
                                        engine::SendBuffers, engine::IoResult r) {
            if (r.err) return self->finish(engine::errno_code(r.err));
            if (after) after();
        });
    }

    void fail(const std::string& what) { abort(what); }

    void finish(std::error_code ec) {
        if (ec == proto::Errc::closed && in_flight() > 0) {
            reading_done_ = true;  // clean close: let the echoes drain first
            return;
        }
        if (done_) return;
        done_ = true;
        generating_ = false;
        bool error = ec != proto::Errc::closed;
        stream_->close();
        server_.on_closed(this, ec.message(), error);
    }

    Server& server_;
    std::unique_ptr<engine::BufferPool> own_pool_;  // shm connections: see own_pool_for()
    std::unique_ptr<engine::BufferPool> plain_pool_;  // send_pool()
    bool fill_in_place_ = false;
    std::unique_ptr<engine::Stream> stream_;
    proto::FrameReader reader_;
    proto::FrameWriter writer_;
    Mode mode_ = Mode::unknown;
    std::uint64_t frame_bytes_ = 0;
    std::uint64_t window_ = 1;
    proto::Frame pattern_;
    ProcessUsage mark_ = ProcessUsage::now();
    std::uint64_t frames_in_ = 0, bytes_in_ = 0, frames_out_ = 0, bytes_out_ = 0;
    std::optional<proto::Frame> stalled_;
    std::size_t queued_ = 0;     // cut-through bytes handed to the stream, not yet sent
    std::size_t forwarded_ = 0;  // payload bytes of the current frame already queued
    Clock::time_point last_activity_;
    std::size_t last_queued_ = 0;  // pending_input() when last found idle
    Clock::time_point rate_since_;
    std::uint64_t rate_bytes_ = 0;
    bool rate_tracking_ = false;
    bool header_sent_ = false;
    bool waiting_for_drain_ = false;
    bool reading_done_ = false;
    bool generating_ = false;
    bool end_received_ = false;
    bool results_sent_ = false;
    bool refusing_ = false;  // an error reply is on its way; then we close
    Clock::time_point accepted_at_;
    bool authenticated_;      // true from the start when the server has no key
    bool challenged_ = false;  // the client's nonce came and our challenge went
    AuthNonce client_nonce_{}, server_nonce_{};
    bool done_ = false;
};

Server::Server(engine::Driver& driver, engine::BufferPool& pool, engine::Fd listener,
               ServeOptions options)
    : driver_(driver), pool_(pool), listener_(std::move(listener)), options_(std::move(options)) {}

Server::~Server() {
    for (auto& c : live_) c->close();
    live_.clear();
    if (accept_op_) {
        driver_.cancel(accept_op_);
        accepting_ = false;
    }
    // Drain: cancelled operations still deliver their final completions.
    while (driver_.in_flight() > 0) {
        driver_.run_once(1, std::chrono::milliseconds(100));
        closing_.clear();
    }
    closing_.clear();
}

void Server::arm_accept() {
    accept_op_ = driver_.async_accept(listener_.get(), [this](engine::Fd fd, int err) {
        accept_op_ = nullptr;
        if (err < 0) {
            if (err == -ECANCELED) return;
            if (err == -EMFILE || err == -ENFILE) {
                // Out of descriptors. Accepting again at once would fail at
                // once, forever: the connection waits in the backlog, and
                // accept is retried at each sweep (every 100-200 ms) while
                // the connections already open are served.
                if (!options_.quiet && !told_out_of_fds_) {
                    rlimit lim{};
                    ::getrlimit(RLIMIT_NOFILE, &lim);
                    std::fprintf(stderr,
                                 "ringxfer serve: out of file descriptors (%s; RLIMIT_NOFILE "
                                 "%llu, %zu connections open): new connections wait until "
                                 "some close; raise the limit (ulimit -Hn, LimitNOFILE= in "
                                 "systemd)\n",
                                 std::strerror(-err), static_cast<unsigned long long>(lim.rlim_cur),
                                 live_.size());
                    told_out_of_fds_ = true;
                }
                accept_paused_ = true;
                return;
            }
            if (!options_.quiet)
                std::fprintf(stderr, "ringxfer serve: accept failed: %s\n", std::strerror(-err));
            if (accepting_) arm_accept();
            return;
        }
        // Before anything is read: a peer outside --allow gets no byte of
        // our attention, not even a header parsed.
        if (!options_.allow.allows_peer_of(fd.get())) {
            summary_.refused++;
            if (!options_.quiet)
                std::fprintf(stderr, "ringxfer serve: connection from %s refused: not in --allow\n",
                             engine::peer_name(fd.get()).c_str());
            fd.reset();
            if (accepting_) arm_accept();
            return;
        }
        if (options_.max_connections && live_.size() >= options_.max_connections) {
            summary_.errors++;
            if (!options_.quiet)
                std::fprintf(stderr,
                             "ringxfer serve: refusing connection from %s: %llu connections "
                             "already (--max-connections)\n",
                             engine::peer_name(fd.get()).c_str(),
                             static_cast<unsigned long long>(live_.size()));
            fd.reset();
            if (accepting_) arm_accept();
            return;
        }
        engine::tune_socket(fd.get(), options_.tuning);
        summary_.connections++;
        accepted_++;
        auto conn = std::make_shared<TestConnection>(*this, std::move(fd));
        live_.insert(conn);
        if (options_.one_off && expected_ != 0 && accepted_ >= expected_) {
            accepting_ = false;
            listener_.reset();
        }
        if (accepting_) arm_accept();
        conn->start();
    });
}

void Server::on_hello(std::uint64_t connections) {
    if (!options_.one_off || expected_ != 0) return;
    expected_ = std::max<std::uint64_t>(1, connections);
    if (accepted_ >= expected_ && accepting_) {
        accepting_ = false;
        if (accept_op_) driver_.cancel(accept_op_);
    }
}

void Server::on_closed(TestConnection* c, const std::string& why, bool error) {
    if (error) {
        summary_.errors++;
        if (!options_.quiet)
            std::fprintf(stderr, "ringxfer serve: connection from %s dropped: %s\n",
                         c->peer().c_str(), why.c_str());
    }
    for (auto it = live_.begin(); it != live_.end(); ++it) {
        if (it->get() == c) {
            // We are inside the connection's own handler chain (reader,
            // stream): its last owner must not go here. run() drops it once
            // the current completion batch is done.
            closing_.push_back(*it);
            live_.erase(it);
            break;
        }
    }
    if (options_.one_off && live_.empty()) {
        // A plain echo connection (no hello) is a test of one connection.
        if (expected_ == 0) expected_ = 1;
        if (accepted_ >= expected_) finished_ = true;
    }
}

void Server::sweep() {
    auto now = Clock::now();
    if (now < next_sweep_) return;  // at most ten times a second, however busy
    next_sweep_ = now + std::chrono::milliseconds(100);
    if (accept_paused_ && accepting_ && !accept_op_) {
        accept_paused_ = false;
        arm_accept();
    }
    std::vector<std::shared_ptr<TestConnection>> snapshot(live_.begin(), live_.end());
    char why[96];
    std::snprintf(why, sizeof why, "idle for more than %.1f s (--idle-timeout)",
                  static_cast<double>(options_.idle_timeout.count()) / 1000.0);
    char auth_why[96];
    std::snprintf(auth_why, sizeof auth_why, "did not authenticate within %.1f s",
                  static_cast<double>(options_.auth_timeout.count()) / 1000.0);
    for (auto& c : snapshot) {
        if (c->auth_overdue(now, options_.auth_timeout))
            c->abort(auth_why);
        else if (options_.idle_timeout.count() > 0 && c->idle(now, options_.idle_timeout))
            c->abort(why);
        else
            c->check_rate(now, options_.min_rate, options_.rate_window);
    }
}

ServeSummary Server::run(const std::atomic<bool>& stop, std::atomic<bool>* status) {
    arm_accept();
    while (!finished_ && !stop.load(std::memory_order_relaxed)) {
        int ret = driver_.run_once(1, std::chrono::milliseconds(200));
        if (ret < 0 && ret != -EINTR)
            throw engine::Error(-ret, engine::errno_message("event loop wait failed", ret));
        sweep();
        closing_.clear();  // outside every handler now
        if (status && status->exchange(false)) {
            engine::PoolStats ps = pool_.stats();
            std::fprintf(stderr,
                         "ringxfer serve: status: %zu connections open, %zu buffers leased "
                         "(%zu bytes)\n",
                         live_.size(), ps.leased_buffers, ps.leased_bytes);
        }
    }
    if (accept_op_) {
        driver_.cancel(accept_op_);
        accepting_ = false;
    }
    return summary_;
}

}  // namespace ringxfer::tools
