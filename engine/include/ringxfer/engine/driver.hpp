// Driver: the event loop a thread runs, behind one interface so that callers
// (the CLI, the future Python module) never depend on io_uring directly.
// Today's implementation is io_uring (UringDriver); an epoll fallback for
// places where io_uring is blocked plugs in here without changing callers.
//
// A Driver belongs to the thread that created it (SINGLE_ISSUER rings), has
// no global state, and can be driven from a foreign event loop: poll
// completion_fd() for readability, then call run_once(0).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/shm_stream.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"

namespace ringxfer::engine {

using AcceptHandler = std::function<void(Fd, int err)>;
using ConnectHandler = std::function<void(Fd, int err)>;

class Driver {
public:
    virtual ~Driver() = default;

    /// Dispatches completions; blocks up to `timeout` for at least
    /// `min_complete` of them (0 or a zero timeout: never blocks).
    /// Returns the number dispatched or -errno.
    virtual int run_once(unsigned min_complete = 1,
                         std::chrono::nanoseconds timeout = std::chrono::nanoseconds::max()) = 0;

    /// Never blocks; for a caller that is running anyway (not woken through
    /// completion_fd()): submits and dispatches what is ready at the least
    /// cost (Ring::advance). Returns the number dispatched or -errno.
    virtual int advance() { return run_once(0, std::chrono::nanoseconds(0)); }

    /// Operations whose final completion has not been dispatched yet.
    virtual std::size_t in_flight() const = 0;

    /// Readable when completions are ready (for foreign event loops), or -errno.
    virtual int completion_fd() = 0;

    /// Wraps a connected socket.
    virtual std::unique_ptr<Stream> make_stream(Fd fd, const SocketStreamOptions& options) = 0;

    /// Wraps a connected rendezvous socket of the shm transport
    /// (make_shm_stream: `pool` shared_memory, outliving the stream). Throws
    /// engine::Error (EOPNOTSUPP) on backends without io_uring.
    virtual std::unique_ptr<Stream> make_shm_stream(Fd fd, BufferPool& pool, bool connector,
                                                    const ShmStreamOptions& options = {}) {
        (void)fd;
        (void)pool;
        (void)connector;
        (void)options;
        throw Error(EOPNOTSUPP, std::string("the shm transport needs the io_uring backend (this is ") +
                                    backend_name() + ")");
    }

    /// Accepts one connection; returns a token for cancel().
    virtual void* async_accept(int listen_fd, AcceptHandler handler) = 0;
    virtual void async_connect(const Endpoint& ep, ConnectHandler handler) = 0;
    virtual void cancel(void* token) = 0;

    /// The ring, for registering buffers; null for backends without one.
    virtual Ring* ring() = 0;

    /// "io_uring (SUBMIT_ALL|SINGLE_ISSUER|DEFER_TASKRUN)" etc.
    virtual std::string describe() const = 0;
    virtual const char* backend_name() const = 0;
};

/// io_uring driver. Throws engine::Error when io_uring cannot be set up.
std::unique_ptr<Driver> make_uring_driver(const RingOptions& options = {});

/// epoll driver: same contract, no io_uring (no registered buffers, no
/// zero-copy sends). `busy_poll`: as RingOptions::busy_poll, run_once() that
/// would block first polls epoll without blocking this long.
std::unique_ptr<Driver> make_epoll_driver(std::chrono::microseconds busy_poll = {});

enum class Backend { automatic, uring, epoll };

/// Parses "auto", "uring", "epoll"; throws engine::Error (EINVAL) otherwise.
Backend parse_backend(std::string_view name);

/// The driver for `backend`. automatic: io_uring, or, when io_uring is
/// unavailable (ENOSYS, EPERM, EOPNOTSUPP), epoll after one line to `warn`
/// saying why. uring: io_uring or engine::Error naming the cause.
std::unique_ptr<Driver> make_driver(Backend backend, const RingOptions& options = {},
                                    const std::function<void(std::string_view)>& warn = {});

/// True when `fd` is an AF_UNIX SOCK_SEQPACKET socket: an shm rendezvous.
bool is_shm_rendezvous(int fd) noexcept;

/// The stream for a connected socket, whatever its transport: an AF_UNIX
/// SOCK_SEQPACKET socket is an shm rendezvous (make_shm_stream with `pool`,
/// which must then be shared_memory), anything else a socket stream.
std::unique_ptr<Stream> make_stream_for(Driver& driver, Fd fd, BufferPool& pool, bool connector,
                                        const SocketStreamOptions& options);

/// Runs `driver` until `done()` is true, or `timeout` passes (returns false).
bool run_until(Driver& driver, const std::function<bool()>& done,
               std::chrono::nanoseconds timeout = std::chrono::nanoseconds::max());

}  // namespace ringxfer::engine
