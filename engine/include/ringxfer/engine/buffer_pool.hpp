// BufferPool: the slab allocator behind every payload buffer.
//
// Size classes run from 4 KiB up to the largest buffer the pool serves:
// powers of two up to 1 MiB, then eight steps per power of two
// (2^k * (1 + i/8)), so a buffer never wastes more than 12.5% of its size
// above 1 MiB (a 100 MB frame takes a 96 MiB buffer, not 128 MiB).
//
// Memory comes from regions: 2 MiB-aligned anonymous mmaps (MADV_HUGEPAGE),
// each carved into equal slabs of one class and registered once with the ring
// as one fixed buffer, so every slab can be used by *_FIXED operations.
// Regions are kept when their slabs return; in steady state leasing and
// returning a buffer takes an uncontended mutex and nothing else: no malloc,
// no syscall. A budget caps the mapped total: when a new region would exceed
// it, fully free regions of other classes are unmapped first; if that is not
// enough the lease fails with -ENOBUFS (back-pressure, not a crash).
//
// If registration fails (ENOMEM under RLIMIT_MEMLOCK for ordinary users) the
// pool goes on unregistered and warns once with the limit and what it needed.
//
// Ownership: a Lease owns its slab; Lease::share() makes more owners (views),
// and the slab returns when the last one is destroyed. Leases may be released
// from any thread. The BufferPool object may be destroyed before its leases:
// the memory then lives until the last lease is gone. The Ring passed in must
// outlive the BufferPool.
//
// Lease::wrap() makes a Lease over memory the pool does not own (a caller's
// buffer, another language's object): the same owner type on every path, so
// a send from an application's memory needs no copy into a slab.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <utility>

#include "ringxfer/engine/callback.hpp"

namespace ringxfer::engine {

class Ring;
class Lease;
namespace detail {
/// Where a Lease's memory goes back to: the pool, or the owner of foreign
/// memory (Lease::wrap).
class LeaseSource {
public:
    /// Drops one handle of `lease`; the last one gives the memory back.
    virtual void release(Lease& lease) noexcept = 0;

protected:
    ~LeaseSource() = default;
};
class PoolCore;
class ForeignMemory;
class ShmLink;
}  // namespace detail

struct PoolOptions {
    std::size_t budget_bytes = std::size_t{4} << 30;  ///< cap on mapped memory
    std::size_t max_buffer_bytes = std::size_t{1} << 30;  ///< largest lease
    bool register_buffers = true;  ///< register regions with the ring
    bool huge_pages = true;        ///< MADV_HUGEPAGE on regions
    /// Every buffer starts this many bytes past a 4 KiB page boundary (0 ..
    /// 4095; the regions get a page more where the last slab needs it). The
    /// kernel copies socket data with `rep movsb`, which on some CPUs (AMD
    /// Zen 3 here: 1.6 vs 13-20 GB/s) crawls when the destination is 1-63
    /// bytes ahead of the source modulo 4 KiB. A TCP sender's socket pages
    /// hold each payload right behind its frame header, usually from a page
    /// start, so a payload copies at full speed from buffers that start the
    /// header's length into a page (proto::kHeaderSize): 64 KiB echo 4.1x,
    /// 1 MiB echo 1.9x, 100 MB echo 1.6x (docs/performance.md). Unix
    /// sockets lay payloads out from page starts: keep 0 there. (A class
    /// whose region is exactly 1 GiB is then a page over the kernel's limit
    /// for one fixed buffer and stays unregistered.)
    std::size_t page_offset = 0;
    /// Regions are shared memory (memfd, sealed: ShmRegion::Access::
    /// owner_writes) instead of anonymous memory, so that the shm transport
    /// can hand a lease's bytes to a peer process by reference
    /// (BufferPool::locate). No huge pages; regions are never evicted (a
    /// peer may still have them mapped): the budget is a hard cap.
    bool shared_memory = false;
    /// Where the one-time warnings go (default: stderr with a "ringxfer:" prefix).
    std::function<void(std::string_view)> warn;
};

struct PoolStats {
    std::size_t leased_buffers = 0;
    std::size_t leased_bytes = 0;  ///< capacity of leased slabs
    std::size_t free_buffers = 0;  ///< slabs carved and free
    std::size_t free_bytes = 0;
    std::size_t mapped_bytes = 0;
    std::size_t registered_bytes = 0;
    std::size_t regions = 0;
    std::uint64_t hits = 0;    ///< leases served from a free slab
    std::uint64_t misses = 0;  ///< leases that had to map a new region
    std::uint64_t failures = 0;  ///< leases refused (budget or size)
    bool registration_failed = false;
};

/// Owner of one pooled buffer, or of a view into one. Not copyable: extra
/// owners are made explicitly with share(), and the slab returns to the pool
/// when the last of them is dropped. A view keeps the whole slab alive.
class Lease {
public:
    Lease() = default;
    Lease(Lease&& other) noexcept { *this = std::move(other); }
    // Inline: frames move a lease several times on their way to the caller,
    // and most resets find it empty (4 KiB streams: ~10% of the CPU went to
    // these two as calls into the shared library).
    Lease& operator=(Lease&& other) noexcept {
        if (this != &other) {
            reset();
            core_ = std::exchange(other.core_, nullptr);
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
            capacity_ = std::exchange(other.capacity_, 0);
            region_ = other.region_;
            slab_ = other.slab_;
            refs_ = std::exchange(other.refs_, nullptr);
            buf_index_ = std::exchange(other.buf_index_, -1);
            read_only_ = std::exchange(other.read_only_, false);
        }
        return *this;
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { reset(); }

    /// Drops this handle now (the slab returns when no other handle remains).
    void reset() noexcept {
        if (core_) release();
        data_ = nullptr;
        size_ = capacity_ = 0;
        buf_index_ = -1;
        read_only_ = false;
    }

    /// Another owner of bytes [offset, offset + length) of this lease (an
    /// empty Lease when the range is outside size()). Thread-safe; no
    /// allocation: one atomic increment.
    Lease share(std::size_t offset, std::size_t length) const noexcept;
    Lease share() const noexcept { return share(0, size_); }

    /// A Lease over `memory`, which the pool does not own: `on_release` runs
    /// once, when the last handle (this one or a share()) is dropped, on
    /// whichever thread drops it; until then the memory must stay valid and
    /// the engine may read or write it. Never registered (buf_index() -1):
    /// operations on it use the plain, non-fixed opcodes. Allocates one small
    /// control block; throws std::bad_alloc like any allocation.
    static Lease wrap(std::span<std::byte> memory, Callback<void()> on_release);

    /// True when no other handle (view or owner) shares this slab: its
    /// bytes may then be rewritten without anyone seeing it.
    bool unique() const noexcept {
        return refs_ != nullptr && refs_->load(std::memory_order_acquire) == 1;
    }

    explicit operator bool() const noexcept { return data_ != nullptr; }
    std::byte* data() const noexcept { return data_; }
    /// Bytes asked for (<= capacity()).
    std::size_t size() const noexcept { return size_; }
    std::size_t capacity() const noexcept { return capacity_; }
    std::span<std::byte> span() const noexcept { return {data_, size_}; }
    /// Fixed-buffer index for IORING_OP_{READ,WRITE}_FIXED and
    /// IORING_RECVSEND_FIXED_BUF, or -1 when the memory is not registered.
    int buf_index() const noexcept { return buf_index_; }
    /// The memory is mapped read-only (a payload the shm transport received
    /// by reference: the peer's memory). Writing through data() faults.
    bool read_only() const noexcept { return read_only_; }

private:
    friend class detail::PoolCore;
    friend class detail::ForeignMemory;
    friend class detail::ShmLink;
    void release() noexcept;  // drops this handle's count; the last returns the slab
    detail::LeaseSource* core_ = nullptr;
    std::byte* data_ = nullptr;
    std::size_t size_ = 0;
    std::size_t capacity_ = 0;
    std::uint32_t region_ = 0;
    std::uint32_t slab_ = 0;
    std::atomic<std::uint32_t>* refs_ = nullptr;
    int buf_index_ = -1;
    bool read_only_ = false;
};

/// Where a lease of a shared-memory pool lies (BufferPool::locate).
struct SharedLocation {
    std::uint32_t region = 0;     ///< the pool's region number (never reused)
    int fd = -1;                  ///< the region's memfd (owned by the pool)
    std::size_t region_bytes = 0;
    std::size_t offset = 0;       ///< of lease.data() in the region
};

class BufferPool {
public:
    /// `ring` may be null: the pool then never registers memory.
    explicit BufferPool(Ring* ring, PoolOptions options = {});
    ~BufferPool();
    BufferPool(const BufferPool&) = delete;
    BufferPool& operator=(const BufferPool&) = delete;

    /// Leases a buffer of at least `bytes` (size() == bytes). Returns 0 or
    /// -errno: -EMSGSIZE above max_buffer_bytes, -ENOBUFS when the budget is
    /// exhausted by leased memory, -ENOMEM when mmap fails.
    int lease(std::size_t bytes, Lease& out);

    PoolStats stats() const;
    const PoolOptions& options() const noexcept;

    /// True, with where it lies, when `lease` (or a view of it) is a lease
    /// of this pool and the pool is shared_memory; false otherwise.
    bool locate(const Lease& lease, SharedLocation& out) const noexcept;

    /// The capacity a request of `bytes` is rounded up to.
    static std::size_t class_size(std::size_t bytes) noexcept;

private:
    detail::PoolCore* core_;
};

}  // namespace ringxfer::engine
