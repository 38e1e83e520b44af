#include "ringxfer/engine/socket.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

#include "ringxfer/engine/error.hpp"

namespace ringxfer::engine {

void Fd::reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

Endpoint Endpoint::parse(std::string_view text) {
    auto bad = [&](const std::string& why) {
        return Error(EINVAL, "invalid address '" + std::string(text) + "': " + why +
                                 " (expected HOST:PORT, [IPV6]:PORT, unix:PATH or shm:PATH)");
    };
    Endpoint ep;
    if (text.starts_with("unix:") || text.starts_with("shm:")) {
        ep.kind = text.starts_with("shm:") ? Kind::shm : Kind::unix_socket;
        ep.path = std::string(text.substr(text.find(':') + 1));
        if (ep.path.empty()) throw bad("empty path");
        if (ep.path.size() >= sizeof(sockaddr_un::sun_path)) throw bad("path too long");
        return ep;
    }
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) throw bad("no port");
    std::string_view host = text.substr(0, colon);
    std::string_view port = text.substr(colon + 1);
    if (host.starts_with('[') && host.ends_with(']')) host = host.substr(1, host.size() - 2);
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc{} || end != port.data() + port.size() || value > 65535)
        throw bad("port must be a number from 0 to 65535");
    ep.host = host.empty() ? "0.0.0.0" : std::string(host);
    ep.port = static_cast<std::uint16_t>(value);
    return ep;
}

int Endpoint::socket_type() const noexcept {
    return kind == Kind::shm ? SOCK_SEQPACKET : SOCK_STREAM;
}

std::string Endpoint::to_string() const {
    if (kind == Kind::unix_socket) return "unix:" + path;
    if (kind == Kind::shm) return "shm:" + path;
    if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
    return host + ":" + std::to_string(port);
}

SockAddr resolve(const Endpoint& ep) {
    SockAddr out;
    if (ep.is_local_socket()) {
        auto* un = reinterpret_cast<sockaddr_un*>(&out.storage);
        un->sun_family = AF_UNIX;
        std::memcpy(un->sun_path, ep.path.data(), ep.path.size());
        if (ep.path[0] == '@') un->sun_path[0] = '\0';  // abstract namespace
        out.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + ep.path.size() +
                                         (ep.path[0] == '@' ? 0 : 1));
        return out;
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    std::string port = std::to_string(ep.port);
    int rc = ::getaddrinfo(ep.host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0 || res == nullptr) {
        throw Error(EHOSTUNREACH, "cannot resolve host '" + ep.host + "': " + gai_strerror(rc));
    }
    std::memcpy(&out.storage, res->ai_addr, res->ai_addrlen);
    out.len = res->ai_addrlen;
    ::freeaddrinfo(res);
    return out;
}

Fd listen_on(const Endpoint& ep, int backlog) {
    SockAddr addr = resolve(ep);
    Fd fd(::socket(addr.family(), ep.socket_type() | SOCK_CLOEXEC, 0));
    if (!fd) throw Error(errno, errno_message("cannot create socket", errno));
    if (ep.kind == Endpoint::Kind::tcp) {
        int one = 1;
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    } else if (ep.path[0] != '@') {
        // Replace a stale socket file, but never steal a live server's path.
        Fd probe(::socket(AF_UNIX, ep.socket_type() | SOCK_CLOEXEC, 0));
        if (probe && ::connect(probe.get(), addr.get(), addr.len) == 0)
            throw Error(EADDRINUSE, "cannot listen on " + ep.to_string() +
                                        ": another server is listening there");
        ::unlink(ep.path.c_str());
    }
    if (::bind(fd.get(), addr.get(), addr.len) < 0) {
        int err = errno;
        std::string hint = err == EADDRINUSE ? " (is another server running? pick another port)"
                           : err == EACCES   ? " (ports below 1024 need privileges)"
                                             : "";
        throw Error(err, errno_message("cannot bind " + ep.to_string(), err) + hint);
    }
    if (::listen(fd.get(), backlog) < 0)
        throw Error(errno, errno_message("cannot listen on " + ep.to_string(), errno));
    return fd;
}

Endpoint local_endpoint(int fd, Endpoint::Kind kind) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    Endpoint ep;
    ep.kind = kind;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return ep;
    if (kind != Endpoint::Kind::tcp) {
        auto* un = reinterpret_cast<sockaddr_un*>(&ss);
        std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path)
                                                              : 0;
        if (n > 0 && un->sun_path[0] == '\0')
            ep.path = "@" + std::string(un->sun_path + 1, n - 1);
        else
            ep.path = std::string(un->sun_path, ::strnlen(un->sun_path, n));
        return ep;
    }
    char host[INET6_ADDRSTRLEN] = {};
    if (ss.ss_family == AF_INET) {
        auto* in = reinterpret_cast<sockaddr_in*>(&ss);
        ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        ep.port = ntohs(in->sin_port);
    } else {
        auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
        ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        ep.port = ntohs(in6->sin6_port);
    }
    ep.host = host;
    return ep;
}

std::size_t pending_input(int fd) {
    int n = 0;
    return ::ioctl(fd, FIONREAD, &n) == 0 && n > 0 ? static_cast<std::size_t>(n) : 0;
}

std::string peer_name(int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return "?";
    char host[INET6_ADDRSTRLEN] = {};
    if (ss.ss_family == AF_INET) {
        auto* in = reinterpret_cast<sockaddr_in*>(&ss);
        ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
    }
    if (ss.ss_family == AF_INET6) {
        auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
        ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
    }
    return "unix";
}

bool same_host(const SockAddr& local, const SockAddr& peer) {
    if (local.family() != peer.family()) return false;
    if (peer.family() == AF_INET) {
        auto l = reinterpret_cast<const sockaddr_in*>(&local.storage)->sin_addr.s_addr;
        auto p = reinterpret_cast<const sockaddr_in*>(&peer.storage)->sin_addr.s_addr;
        return (ntohl(p) >> 24) == 127 || l == p;
    }
    if (peer.family() == AF_INET6) {
        const in6_addr& l = reinterpret_cast<const sockaddr_in6*>(&local.storage)->sin6_addr;
        const in6_addr& p = reinterpret_cast<const sockaddr_in6*>(&peer.storage)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(&p) || (IN6_IS_ADDR_V4MAPPED(&p) && p.s6_addr[12] == 127) ||
               std::memcmp(&l, &p, sizeof l) == 0;
    }
    return false;
}

void tune_socket(int fd, const SocketTuning& tuning) {
    SockAddr local, peer;
    local.len = peer.len = sizeof(sockaddr_storage);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&local.storage), &local.len);
    bool tcp = local.family() == AF_INET || local.family() == AF_INET6;
    if (tcp) {
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int send_buffer = tuning.send_buffer;
    if (send_buffer == 0 && tuning.local_send_buffer > 0 &&
        (local.family() == AF_UNIX ||
         (tcp && ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer.storage), &peer.len) == 0 &&
          same_host(local, peer))))
        send_buffer = tuning.local_send_buffer;
    if (send_buffer > 0) {
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &send_buffer, sizeof send_buffer);
        // The kernel caps SO_SNDBUF at net.core.wmem_max (Debian: 208 KiB);
        // a privileged process may go past it (the kernel doubles both).
        int got = 0;
        socklen_t glen = sizeof got;
        if (::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &glen) == 0 && got / 2 < send_buffer)
            ::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &send_buffer, sizeof send_buffer);
    }
    if (tuning.recv_buffer > 0)
        ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &tuning.recv_buffer, sizeof tuning.recv_buffer);
}

}  // namespace ringxfer::engine
