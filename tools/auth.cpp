#include "auth.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "ringxfer/engine/error.hpp"

namespace ringxfer::tools {
namespace {

constexpr std::size_t kMaxKeyBytes = 64 * 1024;  // a key, not a data file

std::string_view label(AuthRole role) {
    // The terminating NUL is part of the label: no label is a prefix of
    // another's bytes followed by nonce bytes.
    return role == AuthRole::client ? std::string_view("ringxfer-auth-v1 client\0", 24)
                                    : std::string_view("ringxfer-auth-v1 server\0", 24);
}

std::string mode_string(mode_t m) {
    char text[8];
    std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(m & 07777));
    return text;
}

}  // namespace

AuthKey::~AuthKey() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }

std::shared_ptr<const AuthKey> AuthKey::load(const std::string& path, std::string& error) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        error = "cannot read --auth-key-file " + path + ": " + std::strerror(errno);
        return nullptr;
    }
    struct stat st {};
    // fstat of the opened file: what is checked is what is read.
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        error = "--auth-key-file " + path + " is not a regular file";
        ::close(fd);
        return nullptr;
    }
    if (st.st_mode & 077) {
        error = "--auth-key-file " + path + " is accessible by group or others (mode " +
                mode_string(st.st_mode) + "); a shared secret must be readable by its owner " +
                "only: chmod 600 " + path;
        ::close(fd);
        return nullptr;
    }
    std::vector<std::uint8_t> bytes(kMaxKeyBytes + 1);
    std::size_t got = 0;
    while (got < bytes.size()) {
        ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            error = "cannot read --auth-key-file " + path + ": " + std::strerror(errno);
            OPENSSL_cleanse(bytes.data(), bytes.size());
            ::close(fd);
            return nullptr;
        }
        if (n == 0) break;
        got += static_cast<std::size_t>(n);
    }
    ::close(fd);
    if (got == 0) {
        error = "--auth-key-file " + path + " is empty; put a secret in it, e.g. head -c 32 " +
                "/dev/urandom > " + path + " && chmod 600 " + path;
        return nullptr;
    }
    if (got > kMaxKeyBytes) {
        error = "--auth-key-file " + path + " is larger than " + std::to_string(kMaxKeyBytes) +
                " bytes: is it the right file?";
        OPENSSL_cleanse(bytes.data(), bytes.size());
        return nullptr;
    }
    std::vector<std::uint8_t> key(bytes.begin(), bytes.begin() + static_cast<long>(got));
    OPENSSL_cleanse(bytes.data(), bytes.size());
    return std::make_shared<const AuthKey>(std::move(key));
}

AuthProof AuthKey::proof(AuthRole role, const AuthNonce& client_nonce,
                         const AuthNonce& server_nonce) const {
    std::string_view l = label(role);
    std::array<std::uint8_t, 24 + 2 * kAuthNonceBytes> msg{};
    std::memcpy(msg.data(), l.data(), l.size());
    std::memcpy(msg.data() + l.size(), client_nonce.data(), kAuthNonceBytes);
    std::memcpy(msg.data() + l.size() + kAuthNonceBytes, server_nonce.data(), kAuthNonceBytes);
    AuthProof out{};
    unsigned len = 0;
    if (!HMAC(EVP_sha256(), bytes_.data(), static_cast<int>(bytes_.size()), msg.data(),
              msg.size(), out.data(), &len) ||
        len != out.size())
        throw engine::Error(EIO, "HMAC-SHA256 failed in libcrypto");
    return out;
}

bool AuthKey::check(AuthRole role, const AuthNonce& client_nonce, const AuthNonce& server_nonce,
                    const AuthProof& claimed) const {
    AuthProof want = proof(role, client_nonce, server_nonce);
    return CRYPTO_memcmp(want.data(), claimed.data(), want.size()) == 0;
}

AuthNonce random_nonce() {
    AuthNonce n{};
    std::size_t got = 0;
    while (got < n.size()) {
        ssize_t r = ::getrandom(n.data() + got, n.size() - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int err = errno;
            throw engine::Error(err, engine::errno_message("getrandom failed", err));
        }
        got += static_cast<std::size_t>(r);
    }
    return n;
}

std::string to_hex(const std::uint8_t* bytes, std::size_t size) {
    static constexpr char kDigits[] = "0123456789abcdef";
    std::string out(2 * size, '0');
    for (std::size_t i = 0; i < size; ++i) {
        out[2 * i] = kDigits[bytes[i] >> 4];
        out[2 * i + 1] = kDigits[bytes[i] & 15];
    }
    return out;
}

bool from_hex(std::string_view text, std::uint8_t* out, std::size_t size) {
    if (text.size() != 2 * size) return false;
    auto digit = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    for (std::size_t i = 0; i < size; ++i) {
        int hi = digit(text[2 * i]), lo = digit(text[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        out[i] = static_cast<std::uint8_t>(hi << 4 | lo);
    }
    return true;
}

}  // namespace ringxfer::tools
