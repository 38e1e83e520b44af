// ShmRegion: a memfd-backed region of shared memory, and the SCM_RIGHTS
// helpers that hand its descriptor to a peer process (issue #18).
//
// The sender makes a region (memfd_create with sealing allowed), sizes it,
// maps it read-write, then seals it against shrinking, growing, writes
// through any *new* mapping or write(2) (F_SEAL_FUTURE_WRITE: its own
// mapping keeps working) and further sealing. The receiver maps the
// descriptor it was sent read-only, after checking what the sender cannot
// take back:
//   - the size is the one announced (fstat), so every descriptor's bounds
//     are checked against a size that cannot change;
//   - F_SEAL_SHRINK is set, so the sender cannot truncate the file under the
//     receiver's mapping (a read past the new end would be SIGBUS).
// And the sender is safe from the receiver: with F_SEAL_FUTURE_WRITE no
// process can map the region writable again or write(2) to it, whatever
// descriptor it holds. A region that fails a check is refused with -EPROTO
// and never mapped.
#pragma once

#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "ringxfer/engine/socket.hpp"

namespace ringxfer::engine {

class ShmRegion {
public:
    ShmRegion() = default;
    ShmRegion(ShmRegion&& o) noexcept;
    ShmRegion& operator=(ShmRegion&& o) noexcept;
    ShmRegion(const ShmRegion&) = delete;
    ShmRegion& operator=(const ShmRegion&) = delete;
    ~ShmRegion();

    /// Who may write a region once it is shared.
    enum class Access {
        owner_writes,  ///< payloads: sealed against future writes, peers map it read-only
        both_write,    ///< descriptor rings: both processes map it read-write
    };
    /// A new region of `bytes` (rounded up to pages), mapped read-write (at
    /// `at` with MAP_FIXED when not null: the caller reserved that range),
    /// then sealed: shrink, grow and seal, and future writes for
    /// Access::owner_writes. -errno of memfd_create, ftruncate, mmap or fcntl.
    static int create(std::size_t bytes, const char* name, ShmRegion& out,
                      Access access = Access::owner_writes, void* at = nullptr) noexcept;
    /// Maps a region a peer sent, read-only (read-write for
    /// Access::both_write). -EPROTO: its size is not `expected_bytes` or it
    /// is not sealed against shrinking and growing; else -errno.
    static int map_peer(Fd fd, std::size_t expected_bytes, ShmRegion& out,
                        Access access = Access::owner_writes) noexcept;

    std::byte* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    int fd() const noexcept { return fd_.get(); }
    bool writable() const noexcept { return writable_; }
    explicit operator bool() const noexcept { return data_ != nullptr; }

private:
    ShmRegion(Fd fd, std::byte* data, std::size_t size, bool writable) noexcept
        : fd_(std::move(fd)), data_(data), size_(size), writable_(writable) {}
    void reset() noexcept;
    Fd fd_;
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
    bool writable_ = false;
};

/// sendmsg() of `data` (at least one byte) with `fds` as SCM_RIGHTS (at
/// most 64). Bytes sent, or -errno.
int send_with_fds(int sock, std::span<const std::byte> data, std::span<const int> fds) noexcept;
/// recvmsg() into `data`, descriptors (close-on-exec) appended to `fds`.
/// Bytes received (0: the peer closed), or -errno; -EPROTO when the
/// descriptors were cut (MSG_CTRUNC): those that arrived are closed.
int recv_with_fds(int sock, std::span<std::byte> data, std::vector<Fd>& fds) noexcept;

}  // namespace ringxfer::engine
