// `--auth-key-file`: a pre-shared key and the challenge-response that opens
// every connection when one is given (docs/protocol.md, "Authentication").
//
//   client -> server  {"type":"auth","protocol":1,"nonce":Nc}           first frame
//   server -> client  {"type":"auth-challenge","nonce":Ns,"proof":Ps}   Ps = proof(server)
//   client -> server  {"type":"auth-proof","proof":Pc}                  Pc = proof(client)
//   server -> client  {"type":"auth-ok"}   (or {"type":"error","message":...}, then close)
//
// Nc, Ns: 32 random bytes each (getrandom), fresh per connection, as 64
// lowercase hex digits. proof(role) = HMAC-SHA256(key, label(role) || Nc ||
// Ns), as hex, with label "ringxfer-auth-v1 client\0" or "ringxfer-auth-v1
// server\0". Each side checks the other's proof in constant time. The role
// label keeps a server's proof from serving as a client's (reflection); the
// nonce of each side keeps an answer recorded from one connection from
// serving on another (replay).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ringxfer::tools {

inline constexpr std::size_t kAuthNonceBytes = 32;
inline constexpr std::size_t kAuthProofBytes = 32;  // SHA-256
using AuthNonce = std::array<std::uint8_t, kAuthNonceBytes>;
using AuthProof = std::array<std::uint8_t, kAuthProofBytes>;

enum class AuthRole { client, server };

/// The key's bytes, exactly as the file holds them (a trailing newline is
/// part of the key: both sides read the same file). Wiped when destroyed.
class AuthKey {
public:
    explicit AuthKey(std::vector<std::uint8_t> bytes) : bytes_(std::move(bytes)) {}
    ~AuthKey();
    AuthKey(const AuthKey&) = delete;
    AuthKey& operator=(const AuthKey&) = delete;

    /// Reads `path` once. Refuses (nullptr, `error` set, naming the file and
    /// the remedy) a file that cannot be read, is not a regular file, is
    /// empty, or that group or others may access ("chmod 600 FILE").
    static std::shared_ptr<const AuthKey> load(const std::string& path, std::string& error);

    /// HMAC-SHA256(key, label(role) || client_nonce || server_nonce).
    AuthProof proof(AuthRole role, const AuthNonce& client_nonce,
                    const AuthNonce& server_nonce) const;
    /// True if `claimed` equals proof(role, ...); compared in constant time.
    bool check(AuthRole role, const AuthNonce& client_nonce, const AuthNonce& server_nonce,
               const AuthProof& claimed) const;

private:
    std::vector<std::uint8_t> bytes_;
};

/// 32 bytes from getrandom(); throws engine::Error if the kernel cannot
/// give them.
AuthNonce random_nonce();

/// Lowercase hex of `bytes`.
std::string to_hex(const std::uint8_t* bytes, std::size_t size);
template <std::size_t N>
std::string to_hex(const std::array<std::uint8_t, N>& a) {
    return to_hex(a.data(), N);
}
/// Exactly 2*N hex digits (either case) into `out`; false otherwise.
bool from_hex(std::string_view text, std::uint8_t* out, std::size_t size);
template <std::size_t N>
bool from_hex(std::string_view text, std::array<std::uint8_t, N>& out) {
    return from_hex(text, out.data(), N);
}

}  // namespace ringxfer::tools
