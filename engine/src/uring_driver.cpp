#include <sys/socket.h>

#include <cerrno>
#include <cstdio>

#include "ringxfer/engine/error.hpp"

#include "ringxfer/engine/driver.hpp"

namespace ringxfer::engine {
namespace {

class UringDriver final : public Driver {
public:
    explicit UringDriver(const RingOptions& options) : ring_(options) {}

    int run_once(unsigned min_complete, std::chrono::nanoseconds timeout) override {
        return ring_.run_once(min_complete, timeout);
    }
    int advance() override { return ring_.advance(); }
    std::size_t in_flight() const override { return ring_.in_flight(); }
    int completion_fd() override { return ring_.completion_fd(); }
    std::unique_ptr<Stream> make_stream(Fd fd, const SocketStreamOptions& options) override {
        return std::make_unique<SocketStream>(ring_, std::move(fd), options);
    }
    std::unique_ptr<Stream> make_shm_stream(Fd fd, BufferPool& pool, bool connector,
                                            const ShmStreamOptions& options) override {
        return engine::make_shm_stream(ring_, std::move(fd), pool, connector, options);
    }
    void* async_accept(int listen_fd, AcceptHandler handler) override {
        return engine::async_accept(ring_, listen_fd, std::move(handler));
    }
    void async_connect(const Endpoint& ep, ConnectHandler handler) override {
        engine::async_connect(ring_, ep, std::move(handler));
    }
    void cancel(void* token) override {
        ring_.cancel(static_cast<Completion*>(token));
        ring_.submit();
    }
    Ring* ring() override { return &ring_; }
    std::string describe() const override {
        return "io_uring (" + ring_.features().setup_flags_string() +
               (ring_.features().restricted ? ", restricted" : "") + ")";
    }
    const char* backend_name() const override { return "io_uring"; }

private:
    Ring ring_;
};

}  // namespace

std::unique_ptr<Driver> make_uring_driver(const RingOptions& options) {
    return std::make_unique<UringDriver>(options);
}

Backend parse_backend(std::string_view name) {
    if (name == "auto") return Backend::automatic;
    if (name == "uring" || name == "io_uring") return Backend::uring;
    if (name == "epoll") return Backend::epoll;
    throw Error(EINVAL, "unknown backend '" + std::string(name) + "' (expected auto, uring or epoll)");
}

std::unique_ptr<Driver> make_driver(Backend backend, const RingOptions& options,
                                    const std::function<void(std::string_view)>& warn) {
    if (backend == Backend::epoll) return make_epoll_driver(options.busy_poll);
    try {
        return make_uring_driver(options);
    } catch (const Error& e) {
        bool unavailable = e.code() == ENOSYS || e.code() == EPERM || e.code() == EOPNOTSUPP;
        if (backend == Backend::uring || !unavailable) throw;
        std::string msg = std::string(e.what()) + "; falling back to the epoll backend";
        if (warn)
            warn(msg);
        else
            std::fprintf(stderr, "ringxfer: warning: %s\n", msg.c_str());
        return make_epoll_driver(options.busy_poll);
    }
}

bool is_shm_rendezvous(int fd) noexcept {
    int type = 0;
    socklen_t len = sizeof type;
    return ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_SEQPACKET;
}

std::unique_ptr<Stream> make_stream_for(Driver& driver, Fd fd, BufferPool& pool, bool connector,
                                        const SocketStreamOptions& options) {
    if (is_shm_rendezvous(fd.get())) return driver.make_shm_stream(std::move(fd), pool, connector);
    return driver.make_stream(std::move(fd), options);
}

bool run_until(Driver& driver, const std::function<bool()>& done,
               std::chrono::nanoseconds timeout) {
    using Clock = std::chrono::steady_clock;
    const bool bounded = timeout != std::chrono::nanoseconds::max();
    const auto deadline = bounded ? Clock::now() + timeout : Clock::time_point::max();
    while (!done()) {
        auto slice = std::chrono::nanoseconds(std::chrono::milliseconds(200));
        if (bounded) {
            auto left = deadline - Clock::now();
            if (left <= std::chrono::nanoseconds::zero()) return false;
            if (left < slice) slice = std::chrono::duration_cast<std::chrono::nanoseconds>(left);
        }
        int ret = driver.run_once(1, slice);
        if (ret < 0 && ret != -EINTR) return false;
    }
    return true;
}

}  // namespace ringxfer::engine
