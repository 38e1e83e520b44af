// serve --allow: CIDR parsing and peer matching (tools/access.hpp), without
// sockets: peers are built as sockaddr values.
#define BOOST_TEST_MODULE tools_access
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <string>

#include "access.hpp"

using ringxfer::tools::AllowList;
using ringxfer::tools::CidrRange;

namespace {

/// A peer address as the kernel reports it (AF_INET or AF_INET6).
struct Peer {
    sockaddr_storage ss{};
    explicit Peer(const char* text) {
        auto* in = reinterpret_cast<sockaddr_in*>(&ss);
        auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
        if (::inet_pton(AF_INET, text, &in->sin_addr) == 1) {
            in->sin_family = AF_INET;
        } else {
            BOOST_REQUIRE_MESSAGE(::inet_pton(AF_INET6, text, &in6->sin6_addr) == 1, text);
            in6->sin6_family = AF_INET6;
        }
    }
    const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&ss); }
};

CidrRange range(const char* text) {
    CidrRange r;
    std::string error;
    BOOST_REQUIRE_MESSAGE(CidrRange::parse(text, r, error), text << ": " << error);
    return r;
}

/// The error for `text`, which must be refused.
std::string refusal(const char* text) {
    CidrRange r;
    std::string error;
    BOOST_TEST(!CidrRange::parse(text, r, error), text << " was accepted");
    BOOST_TEST(error.find(std::string("'") + text + "'") != std::string::npos,
               "the error names the entry: " << error);
    return error;
}

bool allowed(const char* list, const char* peer) {
    AllowList a;
    std::string error;
    BOOST_REQUIRE_MESSAGE(a.add(list, error), error);
    return a.allows(Peer(peer).get());
}

}  // namespace

BOOST_AUTO_TEST_CASE(ipv4_ranges_and_prefix_edges) {
    BOOST_TEST(range("10.0.0.0/8").to_string() == "10.0.0.0/8");
    BOOST_TEST(range("0.0.0.0/0").to_string() == "0.0.0.0/0");
    BOOST_TEST(range("192.0.2.7/32").to_string() == "192.0.2.7/32");
    BOOST_TEST(range("192.0.2.7").to_string() == "192.0.2.7/32");  // plain address: /32
    BOOST_TEST(range("10.1.0.0/16").contains(Peer("10.1.255.3").get()));
    BOOST_TEST(!range("10.1.0.0/16").contains(Peer("10.2.0.1").get()));
    BOOST_TEST(range("0.0.0.0/0").contains(Peer("203.0.113.9").get()));
    BOOST_TEST(range("192.0.2.7").contains(Peer("192.0.2.7").get()));
    BOOST_TEST(!range("192.0.2.7").contains(Peer("192.0.2.6").get()));
    // A prefix that ends inside a byte.
    BOOST_TEST(range("172.16.0.0/12").contains(Peer("172.31.255.255").get()));
    BOOST_TEST(!range("172.16.0.0/12").contains(Peer("172.32.0.0").get()));
    BOOST_TEST(!range("172.16.0.0/12").contains(Peer("172.15.255.255").get()));
}

BOOST_AUTO_TEST_CASE(ipv6_ranges) {
    BOOST_TEST(range("::1").to_string() == "::1/128");
    BOOST_TEST(range("::1/128").contains(Peer("::1").get()));
    BOOST_TEST(!range("::1/128").contains(Peer("::2").get()));
    BOOST_TEST(range("2001:db8::/32").contains(Peer("2001:db8:ffff::1").get()));
    BOOST_TEST(!range("2001:db8::/32").contains(Peer("2001:db9::1").get()));
    BOOST_TEST(range("::/0").contains(Peer("fe80::1").get()));
    BOOST_TEST(range("fc00::/7").contains(Peer("fdff::1").get()));  // inside a byte
    BOOST_TEST(!range("fc00::/7").contains(Peer("fe00::1").get()));
    // Families never match each other (except through mapped addresses).
    BOOST_TEST(!range("::/0").contains(Peer("127.0.0.1").get()));
    BOOST_TEST(!range("0.0.0.0/0").contains(Peer("::1").get()));
}

BOOST_AUTO_TEST_CASE(ipv4_mapped_peers_match_ipv4_rules) {
    // A dual-stack listener ([::]:PORT) sees an IPv4 client as ::ffff:a.b.c.d.
    BOOST_TEST(range("127.0.0.0/8").contains(Peer("::ffff:127.0.0.1").get()));
    BOOST_TEST(!range("10.0.0.0/8").contains(Peer("::ffff:127.0.0.1").get()));
    // A rule written in the mapped form is the IPv4 rule it stands for.
    BOOST_TEST(range("::ffff:10.0.0.0/104").to_string() == "10.0.0.0/8");
    BOOST_TEST(range("::ffff:10.0.0.0/104").contains(Peer("10.9.8.7").get()));
    BOOST_TEST(range("::ffff:192.0.2.1").contains(Peer("::ffff:192.0.2.1").get()));
    // ::/0 is an IPv6 rule: it does not open the door to every IPv4 peer.
    BOOST_TEST(!range("::/0").contains(Peer("::ffff:10.0.0.1").get()));
}

BOOST_AUTO_TEST_CASE(bad_entries_are_refused_with_a_message_naming_them) {
    BOOST_TEST(refusal("10.0.0.0/33").find("above 32") != std::string::npos);
    BOOST_TEST(refusal("::/129").find("above 128") != std::string::npos);
    BOOST_TEST(refusal("10.0.0.0/").find("not a number") != std::string::npos);
    BOOST_TEST(refusal("10.0.0.0/-1").find("not a number") != std::string::npos);
    BOOST_TEST(refusal("10.0.0.0/8x").find("not a number") != std::string::npos);
    BOOST_TEST(refusal("10.0.0/8").find("not an IPv4 or IPv6 address") != std::string::npos);
    BOOST_TEST(refusal("256.0.0.1").find("not an IPv4 or IPv6 address") != std::string::npos);
    BOOST_TEST(refusal("localhost").find("not resolved") != std::string::npos);
    BOOST_TEST(refusal("10.1.2.3/8").find("did you mean 10.0.0.0/8?") != std::string::npos);
    BOOST_TEST(refusal("2001:db8::1/32").find("did you mean 2001:db8::/32?") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(lists) {
    BOOST_TEST(allowed("10.0.0.0/8,127.0.0.0/8", "127.0.0.1"));
    BOOST_TEST(allowed("10.0.0.0/8,::1", "::1"));
    BOOST_TEST(!allowed("10.0.0.0/8,::1", "127.0.0.1"));
    AllowList empty;
    BOOST_TEST(empty.allows(Peer("198.51.100.1").get()));  // no --allow: everyone
    // A bad entry anywhere refuses the whole list and adds nothing.
    AllowList a;
    std::string error;
    BOOST_TEST(!a.add("10.0.0.0/8,10.0.0.0/40", error));
    BOOST_TEST(error.find("'10.0.0.0/40'") != std::string::npos, error);
    BOOST_TEST(a.empty());
    BOOST_TEST(!a.add("10.0.0.0/8,", error));
    BOOST_TEST(error.find("empty") != std::string::npos, error);
    // Non-IP peers never pass a non-empty list.
    BOOST_REQUIRE(a.add("0.0.0.0/0,::/0", error));
    sockaddr_storage un{};
    un.ss_family = AF_UNIX;
    BOOST_TEST(!a.allows(reinterpret_cast<const sockaddr*>(&un)));
    BOOST_TEST(a.to_string() == "0.0.0.0/0,::/0");
}
