// Addresses and socket set-up (blocking calls made once per listener or
// connection; the data path is in stream.hpp).
#pragma once

#include <cstddef>

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

namespace ringxfer::engine {

/// Owning file descriptor.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) noexcept : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    ~Fd() { reset(); }
    int get() const noexcept { return fd_; }
    int release() noexcept { return std::exchange(fd_, -1); }
    void reset() noexcept;
    explicit operator bool() const noexcept { return fd_ >= 0; }

private:
    int fd_ = -1;
};

/// "HOST:PORT", "[V6ADDR]:PORT" or "unix:PATH" ("unix:@NAME" is the abstract
/// namespace).
struct Endpoint {
    enum class Kind { tcp, unix_socket };
    Kind kind = Kind::tcp;
    std::string host;  ///< tcp
    std::uint16_t port = 0;  ///< tcp
    std::string path;  ///< unix

    /// Throws engine::Error (EINVAL) with a message showing the accepted forms.
    static Endpoint parse(std::string_view text);
    std::string to_string() const;
};

/// A resolved socket address, owned (safe to hand to the kernel).
struct SockAddr {
    sockaddr_storage storage{};
    socklen_t len = 0;
    int family() const noexcept { return storage.ss_family; }
    const sockaddr* get() const noexcept { return reinterpret_cast<const sockaddr*>(&storage); }
};

/// Resolves an endpoint (getaddrinfo for names). Throws engine::Error.
SockAddr resolve(const Endpoint& ep);

/// Creates, binds and listens (SO_REUSEADDR; a stale unix socket path is
/// replaced only when nobody listens on it; the backlog defaults to the
/// kernel maximum, net.core.somaxconn). Throws engine::Error with the
/// address and the reason ("address in use: is another server running?").
Fd listen_on(const Endpoint& ep, int backlog = SOMAXCONN);

/// The address a socket is bound to (port 0 resolved to the real port).
Endpoint local_endpoint(int fd, Endpoint::Kind kind);

/// Peer address as text for log lines ("127.0.0.1:53122", "unix").
std::string peer_name(int fd);

/// Bytes received by the kernel and not yet read from socket `fd` (FIONREAD);
/// 0 when it cannot tell.
std::size_t pending_input(int fd);

/// Per-connection options applied after accept/connect: TCP_NODELAY for TCP,
/// optional buffer sizes (0 keeps the kernel's autotuning).
struct SocketTuning {
    int send_buffer = 0;
    int recv_buffer = 0;
};
void tune_socket(int fd, const SocketTuning& tuning);

}  // namespace ringxfer::engine
