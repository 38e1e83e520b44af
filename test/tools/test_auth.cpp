// --auth-key-file: the key file checks and the proofs of the challenge-
// response (tools/auth.hpp). The proofs are checked against values computed
// independently (Python's hmac module over the layout in docs/protocol.md),
// so a change to the wire definition cannot pass unnoticed.
#define BOOST_TEST_MODULE tools_auth
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "auth.hpp"
#include "cli_runner.hpp"

using namespace ringxfer::tools;

namespace {

std::shared_ptr<const AuthKey> key_of(const std::string& bytes) {
    std::string path = rxtest::scratch_file("k", bytes, 0600);
    std::string error;
    auto key = AuthKey::load(path, error);
    ::unlink(path.c_str());
    BOOST_REQUIRE_MESSAGE(key, error);
    return key;
}

AuthNonce counting_nonce(std::uint8_t first) {
    AuthNonce n{};
    for (std::size_t i = 0; i < n.size(); ++i) n[i] = static_cast<std::uint8_t>(first + i);
    return n;
}

/// The error loading `path` gives; it must be refused.
std::string refusal(const std::string& path) {
    std::string error;
    BOOST_TEST(!AuthKey::load(path, error), path << " was accepted");
    BOOST_TEST(error.find(path) != std::string::npos, "the error names the file: " << error);
    return error;
}

}  // namespace

BOOST_AUTO_TEST_CASE(proofs_match_an_independent_hmac_sha256) {
    auto key = key_of("ringxfer test key");
    AuthNonce nc = counting_nonce(0), ns = counting_nonce(32);
    BOOST_TEST(to_hex(key->proof(AuthRole::client, nc, ns)) ==
               "9d6d0008d18f96eae5e8bb0a13902a0fd389464919412efcc4f7852094d096f0");
    BOOST_TEST(to_hex(key->proof(AuthRole::server, nc, ns)) ==
               "44ab30a8915ac16a7e80688bfacf07ecd3ff292c780613b92e2d1b7cc58151fc");
}

BOOST_AUTO_TEST_CASE(a_proof_holds_only_for_its_role_nonces_and_key) {
    auto key = key_of("ringxfer test key");
    auto other = key_of("ringxfer test kez");
    AuthNonce nc = counting_nonce(0), ns = counting_nonce(32);
    AuthProof p = key->proof(AuthRole::client, nc, ns);
    BOOST_TEST(key->check(AuthRole::client, nc, ns, p));
    BOOST_TEST(!key->check(AuthRole::server, nc, ns, p));  // reflected
    BOOST_TEST(!key->check(AuthRole::client, ns, nc, p));  // nonces swapped
    BOOST_TEST(!key->check(AuthRole::client, nc, counting_nonce(33), p));  // replayed
    BOOST_TEST(!other->check(AuthRole::client, nc, ns, p));  // another key
    for (std::size_t bit = 0; bit < p.size() * 8; bit += 37) {
        AuthProof flipped = p;
        flipped[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
        BOOST_TEST(!key->check(AuthRole::client, nc, ns, flipped), "bit " << bit);
    }
}

BOOST_AUTO_TEST_CASE(nonces_are_random) {
    AuthNonce a = random_nonce(), b = random_nonce();
    BOOST_TEST(to_hex(a) != to_hex(b));
    BOOST_TEST(to_hex(a) != std::string(64, '0'));
}

BOOST_AUTO_TEST_CASE(hex) {
    AuthNonce n = counting_nonce(0xf0);
    std::string text = to_hex(n);
    BOOST_TEST(text.substr(0, 6) == "f0f1f2");
    AuthNonce back{};
    BOOST_TEST(from_hex(text, back));
    BOOST_TEST(to_hex(back) == text);
    BOOST_TEST(from_hex("F0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFF000102030405060708090A0B0C0D0E0F", back));
    BOOST_TEST(!from_hex(text.substr(2), back));        // too short
    BOOST_TEST(!from_hex(text + "00", back));            // too long
    BOOST_TEST(!from_hex("g" + text.substr(1), back));   // not a digit
}

BOOST_AUTO_TEST_CASE(key_files_others_can_read_are_refused) {
    for (mode_t mode : {0644, 0640, 0604, 0660, 0606}) {
        std::string path = rxtest::scratch_file("open", "secret", mode);
        std::string error = refusal(path);
        BOOST_TEST(error.find("chmod 600 " + path) != std::string::npos, error);
        ::unlink(path.c_str());
    }
    for (mode_t mode : {0600, 0400}) {
        std::string path = rxtest::scratch_file("closed", "secret", mode);
        std::string error;
        BOOST_TEST(AuthKey::load(path, error), "mode " << mode << ": " << error);
        ::unlink(path.c_str());
    }
}

BOOST_AUTO_TEST_CASE(empty_missing_and_odd_key_files_are_refused) {
    std::string empty = rxtest::scratch_file("empty", "", 0600);
    BOOST_TEST(refusal(empty).find("is empty") != std::string::npos);
    ::unlink(empty.c_str());
    std::string missing = rxtest::scratch("missing");
    BOOST_TEST(refusal(missing).find("No such file") != std::string::npos);
    std::string dir = rxtest::scratch("dir");
    BOOST_REQUIRE(::mkdir(dir.c_str(), 0700) == 0);
    BOOST_TEST(refusal(dir).find("not a regular file") != std::string::npos);
    ::rmdir(dir.c_str());
}

BOOST_AUTO_TEST_CASE(the_key_is_the_file_s_bytes) {
    // A trailing newline is part of the key: "k" and "k\n" are two keys.
    auto a = key_of("k"), b = key_of("k\n");
    AuthNonce nc = counting_nonce(1), ns = counting_nonce(2);
    BOOST_TEST(!b->check(AuthRole::client, nc, ns, a->proof(AuthRole::client, nc, ns)));
}
