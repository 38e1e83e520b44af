#include "access.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <charconv>
#include <cstring>

namespace ringxfer::tools {
namespace {

constexpr std::array<std::uint8_t, 12> kMappedPrefix = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

bool is_mapped(const std::uint8_t* b) {
    return std::memcmp(b, kMappedPrefix.data(), kMappedPrefix.size()) == 0;
}

/// True if the first `prefix` bits of `a` and `b` are equal.
bool same_prefix(const std::uint8_t* a, const std::uint8_t* b, unsigned prefix) {
    unsigned whole = prefix / 8, rest = prefix % 8;
    if (std::memcmp(a, b, whole) != 0) return false;
    if (rest == 0) return true;
    auto mask = static_cast<std::uint8_t>(0xff << (8 - rest));
    return (a[whole] & mask) == (b[whole] & mask);
}

/// True if any bit past `prefix` in the first `size` bytes of `b` is set.
bool host_bits_set(const std::uint8_t* b, std::size_t size, unsigned prefix) {
    for (std::size_t bit = prefix; bit < size * 8; ++bit)
        if (b[bit / 8] & (0x80 >> (bit % 8))) return true;
    return false;
}

}  // namespace

bool CidrRange::parse(std::string_view text, CidrRange& out, std::string& error) {
    auto bad = [&](const std::string& why) {
        error = "--allow entry '" + std::string(text) + "': " + why;
        return false;
    };
    if (text.empty()) return bad("empty (expected an address or ADDRESS/PREFIX, e.g. 10.0.0.0/8)");
    std::string_view addr = text, len;
    bool has_len = false;
    if (auto slash = text.find('/'); slash != std::string_view::npos) {
        addr = text.substr(0, slash);
        len = text.substr(slash + 1);
        has_len = true;
    }
    CidrRange r;
    std::string host(addr);
    if (::inet_pton(AF_INET, host.c_str(), r.bytes.data()) == 1) {
        r.v4 = true;
    } else if (::inet_pton(AF_INET6, host.c_str(), r.bytes.data()) == 1) {
        r.v4 = false;
    } else {
        return bad("'" + host + "' is not an IPv4 or IPv6 address (names are not resolved)");
    }
    const unsigned max = r.v4 ? 32 : 128;
    r.prefix = max;
    if (has_len) {
        unsigned v = 0;
        auto [end, ec] = std::from_chars(len.data(), len.data() + len.size(), v);
        if (len.empty() || ec != std::errc{} || end != len.data() + len.size())
            return bad("prefix length '" + std::string(len) + "' is not a number");
        if (v > max)
            return bad("prefix length " + std::string(len) + " is above " + std::to_string(max) +
                       " for " + (r.v4 ? "IPv4" : "IPv6"));
        r.prefix = v;
    }
    if (host_bits_set(r.bytes.data(), r.v4 ? 4 : 16, r.prefix)) {
        // The range the user most likely meant, with the host bits cleared.
        CidrRange meant = r;
        for (std::size_t bit = r.prefix; bit < max; ++bit)
            meant.bytes[bit / 8] &= static_cast<std::uint8_t>(~(0x80 >> (bit % 8)));
        return bad("address bits are set past the /" + std::to_string(r.prefix) +
                   " prefix (did you mean " + meant.to_string() + "?)");
    }
    // ::ffff:a.b.c.d/96..128 is the IPv4 range a.b.c.d/0..32: store it so,
    // since IPv4-mapped peers are matched as IPv4.
    if (!r.v4 && r.prefix >= 96 && is_mapped(r.bytes.data())) {
        std::memmove(r.bytes.data(), r.bytes.data() + 12, 4);
        std::memset(r.bytes.data() + 4, 0, 12);
        r.v4 = true;
        r.prefix -= 96;
    }
    out = r;
    return true;
}

bool CidrRange::contains(const sockaddr* addr) const noexcept {
    const std::uint8_t* peer = nullptr;
    bool peer_v4 = false;
    if (addr->sa_family == AF_INET) {
        peer = reinterpret_cast<const std::uint8_t*>(
            &reinterpret_cast<const sockaddr_in*>(addr)->sin_addr);
        peer_v4 = true;
    } else if (addr->sa_family == AF_INET6) {
        peer = reinterpret_cast<const std::uint8_t*>(
            &reinterpret_cast<const sockaddr_in6*>(addr)->sin6_addr);
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
        if (is_mapped(peer)) {
            peer += 12;
            peer_v4 = true;
        }
    } else {
        return false;
    }
    return peer_v4 == v4 && same_prefix(peer, bytes.data(), prefix);
}

std::string CidrRange::to_string() const {
    char text[INET6_ADDRSTRLEN] = {};
    ::inet_ntop(v4 ? AF_INET : AF_INET6, bytes.data(), text, sizeof text);
    return std::string(text) + "/" + std::to_string(prefix);
}

bool AllowList::add(std::string_view list, std::string& error) {
    std::vector<CidrRange> added;
    for (;;) {
        auto comma = list.find(',');
        CidrRange r;
        if (!CidrRange::parse(list.substr(0, comma), r, error)) return false;
        added.push_back(r);
        if (comma == std::string_view::npos) break;
        list.remove_prefix(comma + 1);
    }
    ranges_.insert(ranges_.end(), added.begin(), added.end());
    return true;
}

bool AllowList::allows(const sockaddr* addr) const noexcept {
    if (ranges_.empty()) return true;
    for (const auto& r : ranges_)
        if (r.contains(addr)) return true;
    return false;
}

bool AllowList::allows_peer_of(int fd) const noexcept {
    if (ranges_.empty()) return true;
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return false;
    return allows(reinterpret_cast<const sockaddr*>(&ss));
}

std::string AllowList::to_string() const {
    std::string out;
    for (const auto& r : ranges_) {
        if (!out.empty()) out += ',';
        out += r.to_string();
    }
    return out;
}

}  // namespace ringxfer::tools
