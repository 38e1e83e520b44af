// Shared helpers for the ringxfer Boost.Test suite (test/ only).
//
// Include after <boost/test/unit_test.hpp>. Nothing here is timing-based:
// the deadlines below are safety nets that turn a hang into a failure with a
// message instead of a meson timeout; no assertion depends on how fast
// anything runs.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"

namespace rxtest {

using ringxfer::engine::Fd;
using ringxfer::engine::Ring;

/// Safety net for loops that wait on the kernel or on a peer thread.
inline constexpr std::chrono::seconds kHangLimit{20};

// ---------------------------------------------------------------------------
// Deterministic payload pattern: byte `pos` of stream `seed`. Any offset can
// be generated or checked independently, so a 100 MB frame never has to be
// held twice in memory.

inline std::uint64_t mix64(std::uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

inline std::byte pattern_byte(std::uint64_t seed, std::uint64_t pos) noexcept {
    std::uint64_t w = mix64(seed * 0x100000001b3ull + pos / 8);
    return static_cast<std::byte>((w >> (8 * (pos % 8))) & 0xff);
}

inline void fill_pattern(std::span<std::byte> out, std::uint64_t seed, std::uint64_t pos = 0) {
    std::size_t i = 0;
    while (i < out.size() && (pos + i) % 8 != 0) {
        out[i] = pattern_byte(seed, pos + i);
        ++i;
    }
    for (; i + 8 <= out.size(); i += 8) {
        std::uint64_t w = mix64(seed * 0x100000001b3ull + (pos + i) / 8);
        for (int k = 0; k < 8; ++k) out[i + k] = static_cast<std::byte>((w >> (8 * k)) & 0xff);
    }
    for (; i < out.size(); ++i) out[i] = pattern_byte(seed, pos + i);
}

/// Index of the first byte that differs from the pattern, or npos.
inline std::size_t pattern_mismatch(std::span<const std::byte> data, std::uint64_t seed,
                                    std::uint64_t pos = 0) {
    std::size_t i = 0;
    while (i < data.size() && (pos + i) % 8 != 0) {
        if (data[i] != pattern_byte(seed, pos + i)) return i;
        ++i;
    }
    for (; i + 8 <= data.size(); i += 8) {
        std::uint64_t w = mix64(seed * 0x100000001b3ull + (pos + i) / 8);
        for (int k = 0; k < 8; ++k)
            if (data[i + k] != static_cast<std::byte>((w >> (8 * k)) & 0xff)) return i + k;
    }
    for (; i < data.size(); ++i)
        if (data[i] != pattern_byte(seed, pos + i)) return i;
    return static_cast<std::size_t>(-1);
}

inline bool matches_pattern(std::span<const std::byte> data, std::uint64_t seed,
                            std::uint64_t pos = 0) {
    return pattern_mismatch(data, seed, pos) == static_cast<std::size_t>(-1);
}

inline std::vector<std::byte> pattern_vector(std::size_t n, std::uint64_t seed) {
    std::vector<std::byte> v(n);
    fill_pattern(v, seed);
    return v;
}

inline std::span<const std::byte> as_bytes(std::string_view s) {
    return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// ---------------------------------------------------------------------------
// Sockets

/// Blocking AF_UNIX stream pair.
inline std::pair<Fd, Fd> socket_pair() {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        throw std::runtime_error(std::string("socketpair: ") + std::strerror(errno));
    return {Fd(sv[0]), Fd(sv[1])};
}

/// write() every byte, `chunk` bytes per call. False on error (EPIPE when the
/// reader went away: SIGPIPE is ignored by IgnoreSigpipe).
inline bool write_all(int fd, std::span<const std::byte> data, std::size_t chunk = SIZE_MAX) {
    std::size_t off = 0;
    while (off < data.size()) {
        std::size_t n = std::min(chunk, data.size() - off);
        ssize_t r = ::write(fd, data.data() + off, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        off += static_cast<std::size_t>(r);
    }
    return true;
}

/// Reads until EOF (or error). Returns the bytes; `ok` false on a read error.
inline std::vector<std::byte> read_to_eof(int fd, bool* ok = nullptr) {
    std::vector<std::byte> out;
    std::vector<std::byte> buf(1 << 16);
    for (;;) {
        ssize_t r = ::read(fd, buf.data(), buf.size());
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            if (ok) *ok = false;
            return out;
        }
        if (r == 0) break;
        out.insert(out.end(), buf.begin(), buf.begin() + r);
    }
    if (ok) *ok = true;
    return out;
}

/// Reads exactly n bytes (fewer on EOF/error).
inline std::vector<std::byte> read_exact(int fd, std::size_t n) {
    std::vector<std::byte> out(n);
    std::size_t got = 0;
    while (got < n) {
        ssize_t r = ::read(fd, out.data() + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += static_cast<std::size_t>(r);
    }
    out.resize(got);
    return out;
}

/// Bytes readable right now without blocking (reads them).
inline std::vector<std::byte> read_available(int fd) {
    std::vector<std::byte> out;
    std::byte buf[4096];
    for (;;) {
        ssize_t r = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r <= 0) break;
        out.insert(out.end(), buf, buf + r);
    }
    return out;
}

/// A peer thread working on a blocking socket. It never outlives the test:
/// join() waits at most kHangLimit (a safety net: a peer left blocked by a
/// bug must not hang the suite) and otherwise shuts both sockets down, which
/// wakes a blocked read/write, and reports false. The destructor does the
/// same at once. Test code must not use Boost.Test macros inside the thread;
/// record results and check them after join().
class PeerThread {
public:
    PeerThread() = default;
    PeerThread(int peer_fd, int local_fd, std::function<void()> body)
        : peer_fd_(peer_fd), local_fd_(local_fd), done_(std::make_shared<std::atomic<bool>>(false)) {
        thread_ = std::thread([body = std::move(body), done = done_] {
            body();
            done->store(true);
        });
    }
    PeerThread(PeerThread&&) = default;
    PeerThread& operator=(PeerThread&& o) {
        abort_and_join();
        peer_fd_ = o.peer_fd_;
        local_fd_ = o.local_fd_;
        done_ = std::move(o.done_);
        thread_ = std::move(o.thread_);
        return *this;
    }
    ~PeerThread() { abort_and_join(); }

    /// Waits for the thread to finish its work. False if it had to be
    /// aborted (it was still blocked after kHangLimit).
    [[nodiscard]] bool join() {
        if (!thread_.joinable()) return true;
        auto deadline = std::chrono::steady_clock::now() + kHangLimit;
        while (!done_->load()) {
            if (std::chrono::steady_clock::now() > deadline) {
                abort_and_join();
                return false;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        thread_.join();
        return true;
    }
    void abort_and_join() {
        if (!thread_.joinable()) return;
        if (peer_fd_ >= 0) ::shutdown(peer_fd_, SHUT_RDWR);
        if (local_fd_ >= 0) ::shutdown(local_fd_, SHUT_RDWR);
        thread_.join();
    }

private:
    int peer_fd_ = -1;
    int local_fd_ = -1;
    std::shared_ptr<std::atomic<bool>> done_;
    std::thread thread_;
};

/// Process-wide: writes to a closed socket must fail with EPIPE, not kill the
/// test binary.
struct IgnoreSigpipe {
    IgnoreSigpipe() { ::signal(SIGPIPE, SIG_IGN); }
};

// ---------------------------------------------------------------------------
// Ring driving

/// Runs an event loop (a Ring or an engine::Driver) until `done()` is true.
/// Returns false (after kHangLimit) if it never happens, so a bug shows as a
/// failed check rather than a hang.
template <typename Loop, typename Pred>
bool drive(Loop& loop, Pred done, std::chrono::seconds limit = kHangLimit) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() > deadline) return false;
        int ret = loop.run_once(1, std::chrono::milliseconds(250));
        if (ret < 0 && ret != -EINTR) return false;
    }
    return true;
}

/// Runs until no operation is in flight (cancelled operations still deliver
/// their final completions; their buffers are released then).
template <typename Loop>
bool drain(Loop& loop) {
    return drive(loop, [&] { return loop.in_flight() == 0; });
}

// ---------------------------------------------------------------------------
// Stream operation results

/// A lease of `n` bytes, or a failed test.
inline ringxfer::engine::Lease lease_or_fail(ringxfer::engine::BufferPool& pool, std::size_t n) {
    ringxfer::engine::Lease l;
    BOOST_REQUIRE(pool.lease(n, l) == 0);
    return l;
}

/// Collects what a recv handler was given.
struct RecvResult {
    bool done = false;
    ringxfer::engine::Lease lease;
    ringxfer::engine::IoResult r;
    ringxfer::engine::RecvHandler handler() {
        return [this](ringxfer::engine::Lease l, ringxfer::engine::IoResult res) {
            lease = std::move(l);
            r = res;
            done = true;
        };
    }
};

/// Collects what a send handler was given.
struct SendResult {
    bool done = false;
    ringxfer::engine::SendBuffers back;
    ringxfer::engine::IoResult r;
    ringxfer::engine::SendHandler handler() {
        return [this](ringxfer::engine::SendBuffers b, ringxfer::engine::IoResult res) {
            back = std::move(b);
            r = res;
            done = true;
        };
    }
};

/// Two connected TCP sockets over loopback, made with async_accept and
/// async_connect on `ring`: {client, accepted}.
inline std::pair<Fd, Fd> tcp_pair(Ring& ring) {
    using namespace ringxfer::engine;
    Fd listener = listen_on(Endpoint::parse("127.0.0.1:0"), 4);
    Endpoint ep = local_endpoint(listener.get(), Endpoint::Kind::tcp);
    Fd accepted, connected;
    int aerr = 1, cerr = 1;
    async_accept(ring, listener.get(), [&](Fd f, int e) {
        accepted = std::move(f);
        aerr = e;
    });
    async_connect(ring, ep, [&](Fd f, int e) {
        connected = std::move(f);
        cerr = e;
    });
    if (!drive(ring, [&] { return aerr != 1 && cerr != 1; }) || aerr != 0 || cerr != 0)
        throw std::runtime_error("tcp_pair: accept/connect failed: " + std::to_string(aerr) +
                                 " / " + std::to_string(cerr));
    return {std::move(connected), std::move(accepted)};
}

/// Unique temporary directory, removed (with the files the test names)
/// on destruction.
class TempDir {
public:
    TempDir() {
        char tmpl[] = "/tmp/ringxfer-test-XXXXXX";
        if (!::mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
        path_ = tmpl;
    }
    ~TempDir() {
        for (auto& f : files_) ::unlink(f.c_str());
        ::rmdir(path_.c_str());
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    /// A path inside the directory, removed at the end.
    std::string file(const std::string& name) {
        files_.push_back(path_ + "/" + name);
        return files_.back();
    }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    std::vector<std::string> files_;
};

}  // namespace rxtest
