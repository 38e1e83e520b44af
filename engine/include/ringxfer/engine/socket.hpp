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

/// "HOST:PORT", "[V6ADDR]:PORT", "unix:PATH" or "shm:PATH" ("unix:@NAME",
/// "shm:@NAME": the abstract namespace). shm is the same-host shared-memory
/// transport; PATH is its rendezvous socket (AF_UNIX, SOCK_SEQPACKET).
struct Endpoint {
    enum class Kind { tcp, unix_socket, shm };
    Kind kind = Kind::tcp;
    std::string host;  ///< tcp
    std::uint16_t port = 0;  ///< tcp
    std::string path;  ///< unix, shm
    bool is_local_socket() const noexcept { return kind != Kind::tcp; }
    /// SOCK_STREAM, or SOCK_SEQPACKET for shm's rendezvous.
    int socket_type() const noexcept;

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

/// True when a TCP connection between `local` and `peer` stays on this host:
/// the peer is on a loopback address (127/8, ::1, ::ffff:127/104) or at the
/// connection's own local address. Unix sockets: false (not TCP).
bool same_host(const SockAddr& local, const SockAddr& peer);

/// Per-connection options applied after accept/connect: TCP_NODELAY for TCP,
/// buffer sizes (0 keeps the kernel's autotuning).
struct SocketTuning {
    int send_buffer = 0;  ///< SO_SNDBUF for every socket (0: see local_send_buffer)
    int recv_buffer = 0;  ///< SO_RCVBUF (0: autotuning)
    /// SO_SNDBUF for connections that stay on this host: Unix sockets and
    /// TCP connections for which same_host() holds, when send_buffer is 0;
    /// 0: the kernel's default there too. Over TCP loopback a send buffer
    /// smaller than autotuning's is faster: the sender fills it and sleeps,
    /// so the receiver's acknowledgements push the queued data from the
    /// receiver's CPU (100 MB echo 1.40x, stream 1.59x). On a Unix socket it is
    /// larger than the default (net.core.wmem_default, 208 KiB), which caps
    /// the bytes in flight between the two processes (100 MB stream
    /// 1.36x). docs/performance.md has the sweeps. TCP connections that
    /// leave the host keep autotuning (up to net.ipv4.tcp_wmem's maximum):
    /// there the buffer must cover the bandwidth-delay product.
    int local_send_buffer = 512 * 1024;
};
void tune_socket(int fd, const SocketTuning& tuning);

}  // namespace ringxfer::engine
