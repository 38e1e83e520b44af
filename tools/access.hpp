// `serve --allow CIDR[,CIDR...]`: which peer addresses may connect over TCP.
// The check runs on the accepted socket's peer address, before anything is
// read from it (tools/server.cpp).
#pragma once

#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ringxfer::tools {

/// One address range: an IPv4 or IPv6 prefix. IPv4 ranges keep their 4
/// bytes in `bytes[0..3]`; an IPv4-mapped IPv6 range (::ffff:a.b.c.d/96+)
/// is stored as the IPv4 range it stands for, so both spellings match the
/// same peers.
struct CidrRange {
    bool v4 = true;
    std::array<std::uint8_t, 16> bytes{};  ///< network address, host bits zero
    unsigned prefix = 0;                   ///< 0..32 (IPv4) or 0..128 (IPv6)

    /// `text` is an address with an optional /prefix ("10.0.0.0/8",
    /// "::1/128", "192.0.2.7" = /32, "2001:db8::1" = /128). Host bits past
    /// the prefix must be zero ("10.1.2.3/8" is refused: it is most likely a
    /// typo for a narrower range). On failure `error` says what is wrong.
    static bool parse(std::string_view text, CidrRange& out, std::string& error);
    /// True if the peer at `addr` (AF_INET or AF_INET6; an IPv4-mapped IPv6
    /// peer counts as its IPv4 address) lies inside this range.
    bool contains(const sockaddr* addr) const noexcept;
    std::string to_string() const;
};

/// The ranges given to --allow; empty: everyone may connect.
class AllowList {
public:
    /// Adds every comma-separated entry of `list`. On the first bad entry,
    /// returns false with `error` naming it ("--allow entry '10.0.0.0/33':
    /// prefix length 33 is above 32 for IPv4").
    bool add(std::string_view list, std::string& error);
    bool empty() const noexcept { return ranges_.empty(); }
    /// True if the list is empty or some range contains `addr`. Non-IP
    /// peers (Unix sockets) are never allowed by a non-empty list.
    bool allows(const sockaddr* addr) const noexcept;
    /// True if the list is empty or the connected socket's peer is allowed
    /// (false when getpeername fails: the peer cannot be checked).
    bool allows_peer_of(int fd) const noexcept;
    std::string to_string() const;  ///< "10.0.0.0/8,::1/128"

private:
    std::vector<CidrRange> ranges_;
};

}  // namespace ringxfer::tools
