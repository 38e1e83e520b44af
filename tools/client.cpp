#include "client.hpp"

#include <algorithm>
#include <cstring>

#include "control.hpp"
#include "pattern.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/proto/errors.hpp"

namespace ringxfer::tools {

void RunState::maybe_start() {
    if (measuring.load()) return;
    std::lock_guard lock(mu_);
    if (measuring.load() || ready.load() < total) return;
    auto now = Clock::now();
    if (now - launch < warmup) return;
    start_ns.store(std::chrono::duration_cast<std::chrono::nanoseconds>(now - launch).count());
    measuring.store(true);
    notify();
}

void RunState::notify() {
    {
        std::lock_guard lock(wake_mu_);
        ++events_;
    }
    wake_.notify_all();
}

std::uint64_t RunState::events() {
    std::lock_guard lock(wake_mu_);
    return events_;
}

void RunState::wait(std::uint64_t seen, Clock::time_point deadline) {
    std::unique_lock lock(wake_mu_);
    wake_.wait_until(lock, deadline, [&] { return events_ != seen; });
}

ClientConnection::ClientConnection(engine::Driver& driver, engine::BufferPool& pool, engine::Fd fd,
                                   const TestSpec& spec, std::size_t idx, RunState& run,
                                   const proto::ReaderOptions& ro, const proto::WriterOptions& wo,
                                   const engine::SocketStreamOptions& so,
                                   Histogram& latency_ns, LatencyLog& latency_log,
                                   proto::Frame pattern)
    : index(idx),
      driver_(driver),
      pool_(pool),
      stream_(engine::make_stream_for(driver, std::move(fd), pool, true, so)),
      reader_(*stream_, pool, ro),
      writer_(*stream_, wo),
      spec_(spec),
      run_(run),
      latency_ns_(latency_ns),
      latency_log_(latency_log),
      pattern_(std::move(pattern)) {}

void ClientConnection::start() {
    authenticated_ = !spec_.auth_key;
    if (authenticated_) {
        send_hello();
    } else {
        // The hello waits for auth-ok: a server holding a key reads nothing
        // else before, and a client must not describe its test to a server
        // that has not proved it holds the key.
        client_nonce_ = random_nonce();
        auth_started_ = Clock::now();
        send_control({{"type", "auth"},
                      {"protocol", kControlProtocol},
                      {"nonce", to_hex(client_nonce_)}});
    }
    read_next();
}

void ClientConnection::check_auth_deadline(Clock::time_point now) {
    if (done_ || authenticated_ || now - auth_started_ <= spec_.auth_timeout) return;
    fail("the server did not complete authentication within " +
         std::to_string(spec_.auth_timeout.count() / 1000) +
         " s: is it a ringxfer serve, and is it overloaded?");
}

void ClientConnection::on_auth_message(const nlohmann::json& msg, const std::string& type) {
    if (type == "error") return fail("server refused the connection: " + msg.value("message", "?"));
    if (type == "auth-challenge" && !challenged_) {
        AuthNonce server_nonce{};
        AuthProof proof{};
        if (!from_hex(msg.value("nonce", ""), server_nonce) ||
            !from_hex(msg.value("proof", ""), proof))
            return fail("server sent a malformed auth-challenge (nonce and proof must be 64 hex "
                        "digits each)");
        if (!spec_.auth_key->check(AuthRole::server, client_nonce_, server_nonce, proof))
            return fail("the server could not prove it holds the key of --auth-key-file: its "
                        "key differs from this one (give both sides the same file), or this is "
                        "not the server you meant");
        challenged_ = true;
        send_control({{"type", "auth-proof"},
                      {"proof", to_hex(spec_.auth_key->proof(AuthRole::client, client_nonce_,
                                                             server_nonce))}});
        return read_next();
    }
    if (type == "auth-ok" && challenged_) {
        authenticated_ = true;
        send_hello();
        return read_next();
    }
    if (type == "hello-ok")
        return fail("the server accepted a test without authenticating it: it does not check "
                    "keys (a ringxfer older than --auth-key-file?); refusing to go on");
    fail("server sent '" + type + "' during authentication");
}

void ClientConnection::send_hello() {
    send_control({{"type", "hello"},
                  {"protocol", kControlProtocol},
                  {"mode", test_mode_name(spec_.mode)},
                  {"frame_bytes", spec_.frame_bytes},
                  {"window", spec_.window},
                  {"connections", spec_.connections},
                  {"connection_index", index},
                  {"fill_in_place", spec_.fill_in_place}});
}

void ClientConnection::send_control(const nlohmann::json& j) {
    engine::SendBuffers b;
    if (int ret = make_control_send(pool_, j, b); ret < 0)
        return fail(engine::errno_message("cannot lease a control frame", ret));
    stream_->send(std::move(b), [self = shared_from_this()](engine::SendBuffers, engine::IoResult r) {
        if (r.err) self->fail(self->lost_before_accepted("send failed: " +
                                                         engine::errno_code(r.err).message()));
    });
}

void ClientConnection::read_next() {
    if (done_) return;
    reader_.read([self = shared_from_this()](proto::Frame f, std::error_code ec) {
        self->on_frame(std::move(f), ec);
    });
}

void ClientConnection::on_control(const proto::Frame& f) {
    std::string err;
    auto msg = parse_control(f, err);
    if (!msg) return fail("server sent a bad control frame: " + err);
    const std::string type = (*msg)["type"];
    if (!authenticated_) return on_auth_message(*msg, type);
    if (type == "error") return fail("server refused the test: " + msg->value("message", "?"));
    if (type == "hello-ok") {
        if (msg->value("protocol", 0) != kControlProtocol)
            return fail("control protocol mismatch: server speaks " +
                        std::to_string(msg->value("protocol", 0)) + ", this client " +
                        std::to_string(kControlProtocol) + "; use the same ringxfer version");
        hello_ok_ = true;
        if (stamps_echoes()) {
            for (std::uint64_t i = 0; i < spec_.window; ++i) {
                proto::Frame b;
                if (int ret = proto::Frame::allocate(pool_, spec_.frame_bytes, b); ret < 0)
                    return fail(engine::errno_message("cannot lease a send buffer (raise --pool-budget?)", ret));
                fill_pattern(b.mutable_payload(), kPatternSeed);
                echo_bufs_.push_back(std::move(b));
            }
            echo_reference_ = echo_bufs_.front().payload().data();
        }
        progress();
        pump_sends();
        return read_next();
    }
    if (type == "results") {
        server_results = *msg;
        done_ = true;
        stream_counters = stream_->counters();
        receive_copied_bytes = reader_.stats().copied_bytes;
        stream_->close();
        return;
    }
    fail("server sent unknown control message '" + type + "'");
}

bool ClientConnection::verify_payload(const proto::Frame& f, std::uint64_t seq) {
    if (f.size() != spec_.frame_bytes) return false;
    const std::byte* want = spec_.mode == TestMode::echo ? echo_reference_ : pattern_.payload().data();
    std::size_t stamp = spec_.mode == TestMode::echo ? std::min<std::size_t>(8, f.size()) : 0;
    if (stamp && std::memcmp(f.payload().data(), &seq, stamp) != 0) return false;
    return std::memcmp(f.payload().data() + stamp, want + stamp, f.size() - stamp) == 0;
}

void ClientConnection::on_frame(proto::Frame f, std::error_code ec) {
    if (ec) {
        if (ec == proto::Errc::closed)
            return fail(lost_before_accepted("server closed the connection before sending results"));
        return fail(lost_before_accepted("receive failed: " + ec.message()));
    }
    if (f.is_control()) return on_control(f);
    if (!hello_ok_) return fail("server sent data before accepting the test");
    std::uint64_t seq = 0;
    auto now = Clock::now();
    if (spec_.mode == TestMode::echo) {
        if (echo_in_flight_.empty()) return fail("server sent a frame that was not asked for");
        auto [s, t0] = echo_in_flight_.front();
        echo_in_flight_.pop_front();
        seq = s;
        if (count_rx()) {
            auto rtt = static_cast<std::uint64_t>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(now - t0).count());
            latency_ns_.record(rtt);
            latency_log_.add(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                 now.time_since_epoch()).count(),
                             rtt, index);
        }
    } else if (spec_.mode == TestMode::stream) {
        return fail("server sent data in a stream test");
    }
    if (spec_.verify && !verify_payload(f, seq))
        return fail("verification failed: frame " + std::to_string(rx_done_) +
                    " received differs from the frame sent");
    rx_done_++;
    if (count_rx()) {
        rx_counted_++;
        counters.frames_rx.fetch_add(1, std::memory_order_relaxed);
        counters.bytes_rx.fetch_add(f.size(), std::memory_order_relaxed);
    }
    f.reset();
    progress();
    pump_sends();
    read_next();
}

void ClientConnection::pump_sends() {
    if (!hello_ok_ || done_) return;
    if (stopping()) return maybe_finish_data();
    if (!sends()) return;
    const bool echo = spec_.mode == TestMode::echo;
    // Echo: a frame is in flight from its send until its echo is back, so
    // the window bounds round trips, not just sends.
    auto in_flight = [&] { return echo ? echo_in_flight_.size() : sends_in_flight_; };
    while (in_flight() < spec_.window && !done_) {
        proto::Frame f;
        std::uint64_t seq = next_seq_;
        if (stamps_echoes()) {
            if (echo_bufs_.empty()) break;
            f = std::move(echo_bufs_.back());
            echo_bufs_.pop_back();
            std::memcpy(f.mutable_payload().data(), &seq,
                        std::min<std::size_t>(8, f.size()));
        } else {
            f = proto::Frame(pattern_.lease().share());
        }
        // Only echo needs the send time (round-trip latency); a clock read
        // per frame is measurable on small one-way frames.
        auto t0 = echo ? Clock::now() : Clock::time_point{};
        if (!writer_.try_write(f, [self = shared_from_this()](proto::Frame sent,
                                                              std::error_code ec) {
                self->on_sent(std::move(sent), ec);
            })) {
            if (stamps_echoes()) echo_bufs_.push_back(std::move(f));
            break;
        }
        if (echo) echo_in_flight_.emplace_back(seq, t0);
        next_seq_++;
        sends_in_flight_++;
    }
}

void ClientConnection::on_sent(proto::Frame f, std::error_code ec) {
    sends_in_flight_--;
    if (ec) return fail("send failed: " + ec.message());
    std::size_t size = f.size();
    if (stamps_echoes()) echo_bufs_.push_back(std::move(f));
    tx_done_++;
    if (count_tx()) {
        tx_counted_++;
        counters.frames_tx.fetch_add(1, std::memory_order_relaxed);
        counters.bytes_tx.fetch_add(size, std::memory_order_relaxed);
    }
    progress();
    pump_sends();
}

void ClientConnection::progress() {
    const std::uint64_t w = spec_.warmup_frames;
    bool warm;
    if (spec_.mode == TestMode::stream) warm = tx_done_ >= w;
    else if (spec_.mode == TestMode::bidir) warm = tx_done_ >= w && rx_done_ >= w;
    else warm = rx_done_ >= w;
    if (warm && !ready_noted_) {
        ready_noted_ = true;
        run_.ready.fetch_add(1);
    }
    run_.maybe_start();
    if (counting() && !marked_) {
        marked_ = true;  // the server snapshots its CPU here
        send_control({{"type", "mark"}});
    }
    if (spec_.frames == 0 || limit_reached_) return;
    bool reached;
    if (spec_.mode == TestMode::stream) reached = tx_counted_ >= spec_.frames;
    else if (spec_.mode == TestMode::bidir) reached = tx_counted_ >= spec_.frames && rx_counted_ >= spec_.frames;
    else reached = rx_counted_ >= spec_.frames;
    if (reached) {
        limit_reached_ = true;
        run_.last_done_ns.store(std::max(
            run_.last_done_ns.load(),
            std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - run_.launch)
                .count()));
        run_.finished.fetch_add(1);
        run_.notify();
    }
}

/// Once this connection stops sending: "end" (echo after the last echo,
/// stream after the last send) or "stop" (reverse, bidir), then read until
/// the server's results.
void ClientConnection::maybe_finish_data() {
    if (stop_sent_ || done_ || sends_in_flight_ > 0) return;
    if (spec_.mode == TestMode::echo && !echo_in_flight_.empty()) return;
    stop_sent_ = true;
    bool server_sends = spec_.mode == TestMode::reverse || spec_.mode == TestMode::bidir;
    send_control({{"type", server_sends ? "stop" : "end"}});
}

std::string ClientConnection::lost_before_accepted(const std::string& what) const {
    if (hello_ok_) return what;
    if (!authenticated_)
        return "the server closed the connection during authentication, without saying why: it "
               "may refuse this client's address (serve --allow), have too many connections "
               "(--max-connections), or not know --auth-key-file (an older ringxfer); its log "
               "names the reason (" + what + ")";
    // A server that refuses a test says why in an error frame; one that
    // closes without a word refused the connection itself.
    return "the server closed the connection before accepting the test, without saying why: "
           "it may refuse this client's address (serve --allow) or have too many connections "
           "(--max-connections); its log names the reason (" + what + ")";
}

void ClientConnection::fail(const std::string& what) {
    if (done_) return;
    error = what;
    counters.errors.fetch_add(1);
    done_ = true;
    stream_counters = stream_->counters();
    stream_->close();
}

}  // namespace ringxfer::tools
