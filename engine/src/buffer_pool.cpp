#include "ringxfer/engine/buffer_pool.hpp"

#include <sys/mman.h>
#include <sys/resource.h>

#include <array>
#include <atomic>
#include <memory>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/shm_region.hpp"

namespace ringxfer::engine {
namespace {

constexpr std::size_t kMinClass = 4096;
constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kRegionAlign = 2 * kMiB;
constexpr std::size_t kPage = 4096;
constexpr unsigned kMaxClasses = 256;
constexpr unsigned kFixedSlots = 4096;  // sparse fixed-buffer table size
constexpr std::size_t kMaxFixedBytes = std::size_t{1} << 30;  // kernel limit per buffer

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

unsigned class_index(std::size_t cap) {
    if (cap <= kMiB) return static_cast<unsigned>(std::countr_zero(cap)) - 12;  // 4K -> 0, 1M -> 8
    unsigned k = static_cast<unsigned>(std::bit_width(cap)) - 1;
    std::size_t step = std::size_t{1} << (k - 3);
    unsigned i = static_cast<unsigned>((cap - (std::size_t{1} << k)) / step);
    return 8 + (k - 20) * 8 + i;
}

/// Slabs per region for a class: one 2 MiB region for small classes; above
/// 1 MiB the fewest slabs whose 2 MiB round-up wastes at most 1/8.
std::size_t slabs_per_region(std::size_t cap) {
    if (cap <= kMiB) return kRegionAlign / cap;
    for (std::size_t n = 1;; ++n) {
        std::size_t used = n * cap;
        if (round_up(used, kRegionAlign) - used <= used / 8) return n;
    }
}

std::string human_bytes(std::size_t b) {
    char buf[64];
    if (b >= kMiB)
        std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / kMiB);
    else
        std::snprintf(buf, sizeof buf, "%zu B", b);
    return buf;
}

}  // namespace

namespace detail {

class PoolCore final : public LeaseSource {
public:
    PoolCore(Ring* ring, PoolOptions options) : ring_(ring), options_(std::move(options)) {
        if (options_.page_offset >= kPage)
            throw Error(EINVAL, "buffer pool: page_offset " + std::to_string(options_.page_offset) +
                                    " must be below the page size (4096)");
        if (!options_.warn) {
            options_.warn = [](std::string_view msg) {
                std::fprintf(stderr, "ringxfer: warning: %.*s\n", static_cast<int>(msg.size()),
                             msg.data());
            };
        }
        regions_.reserve(64);
    }

    ~PoolCore() {
        for (Region& r : regions_)
            if (r.base && !r.shm) ::munmap(r.base, r.bytes);  // a ShmRegion unmaps itself
    }

    int lease(std::size_t bytes, Lease& out) {
        out.reset();
        if (bytes == 0) return 0;
        std::lock_guard lock(mu_);
        if (bytes > options_.max_buffer_bytes) {
            ++stats_.failures;
            return -EMSGSIZE;
        }
        std::size_t cap = BufferPool::class_size(bytes);
        ClassState& cls = classes_[class_index(cap)];
        // Fast path: a region of this class with a free slab.
        for (std::size_t n = cls.regions.size(), k = 0; k < n; ++k) {
            std::uint32_t id = cls.regions[(cls.hint + k) % n];
            Region& r = regions_[id];
            if (!r.free_stack.empty()) {
                cls.hint = static_cast<std::uint32_t>((cls.hint + k) % n);
                ++stats_.hits;
                take(id, cap, bytes, out);
                return 0;
            }
        }
        int ret = add_region(cap);
        if (ret < 0) {
            ++stats_.failures;
            return ret;
        }
        ++stats_.misses;
        cls.hint = static_cast<std::uint32_t>(cls.regions.size() - 1);
        take(static_cast<std::uint32_t>(ret), cap, bytes, out);
        return 0;
    }

    void release(Lease& l) noexcept override {
        // Last handle of a shared slab returns it; others only drop a count.
        if (l.refs_->fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        bool destroy;
        {
            std::lock_guard lock(mu_);
            Region& r = regions_[l.region_];
            r.free_stack.push_back(l.slab_);  // capacity reserved: never allocates
            stats_.leased_buffers--;
            stats_.leased_bytes -= r.slab_bytes;
            stats_.free_buffers++;
            stats_.free_bytes += r.slab_bytes;
            destroy = orphaned_ && stats_.leased_buffers == 0;
        }
        if (destroy) delete this;
    }

    void orphan() {
        bool destroy;
        {
            std::lock_guard lock(mu_);
            if (ring_ && fixed_table_) io_uring_unregister_buffers(ring_->raw());
            ring_ = nullptr;
            orphaned_ = true;
            destroy = stats_.leased_buffers == 0;
        }
        if (destroy) delete this;
    }

    PoolStats stats() const {
        std::lock_guard lock(mu_);
        return stats_;
    }

    const PoolOptions& options() const { return options_; }

    bool locate(const Lease& l, SharedLocation& out) const noexcept {
        if (l.core_ != this || !options_.shared_memory) return false;
        std::lock_guard lock(mu_);
        const Region& r = regions_[l.region_];
        out.region = l.region_;
        out.fd = r.shm.fd();
        out.region_bytes = r.bytes;
        out.offset = static_cast<std::size_t>(l.data_ - r.base);
        return true;
    }

private:
    struct Region {
        std::byte* base = nullptr;
        std::size_t bytes = 0;
        std::size_t slab_bytes = 0;
        unsigned cls = 0;
        std::uint32_t slabs = 0;
        int buf_index = -1;
        std::vector<std::uint32_t> free_stack;
        // Handles per slab (Lease::share); heap-allocated so that Leases can
        // point at their counter while regions_ grows.
        std::unique_ptr<std::atomic<std::uint32_t>[]> refs;
        ShmRegion shm;  // shared_memory pools: the memfd and its mapping
    };
    struct ClassState {
        std::vector<std::uint32_t> regions;
        std::uint32_t hint = 0;
    };

    void take(std::uint32_t id, std::size_t cap, std::size_t bytes, Lease& out) {
        Region& r = regions_[id];
        std::uint32_t slab = r.free_stack.back();
        r.free_stack.pop_back();
        out.core_ = this;
        out.data_ = r.base + std::size_t{slab} * cap + options_.page_offset;
        out.size_ = bytes;
        out.capacity_ = cap;
        out.region_ = id;
        out.slab_ = slab;
        out.buf_index_ = r.buf_index;
        out.refs_ = &r.refs[slab];
        out.refs_->store(1, std::memory_order_relaxed);
        stats_.leased_buffers++;
        stats_.leased_bytes += cap;
        stats_.free_buffers--;
        stats_.free_bytes -= cap;
    }

    /// Maps, carves and registers a region for class `cap`; returns its id or
    /// -errno. Evicts fully free regions of other classes to fit the budget.
    int add_region(std::size_t cap) {
        std::size_t slabs = slabs_per_region(cap);
        std::size_t bytes = round_up(slabs * cap, kRegionAlign);
        // Slabs start page_offset bytes in: the last one may need a page more.
        if (bytes - slabs * cap < options_.page_offset) bytes += kPage;
        if (stats_.mapped_bytes + bytes > options_.budget_bytes) evict(bytes);
        if (stats_.mapped_bytes + bytes > options_.budget_bytes) return -ENOBUFS;

        // Over-map by the alignment and trim, so the region starts on a 2 MiB
        // boundary and can be backed by huge pages.
        std::size_t span = bytes + kRegionAlign;
        void* raw = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                           0);
        if (raw == MAP_FAILED) return -errno;
        auto addr = reinterpret_cast<std::uintptr_t>(raw);
        std::uintptr_t aligned = round_up(addr, kRegionAlign);
        if (aligned > addr) ::munmap(raw, aligned - addr);
        std::size_t tail = (addr + span) - (aligned + bytes);
        if (tail) ::munmap(reinterpret_cast<void*>(aligned + bytes), tail);
        auto* base = reinterpret_cast<std::byte*>(aligned);
        ShmRegion shm;
        if (options_.shared_memory) {
            // The memfd mapped over the aligned reservation (MAP_FIXED).
            int ret = ShmRegion::create(bytes, "ringxfer-pool", shm,
                                        ShmRegion::Access::owner_writes, base);
            if (ret < 0) {
                ::munmap(base, bytes);
                return ret;
            }
        } else if (options_.huge_pages) {
            ::madvise(base, bytes, MADV_HUGEPAGE);
        }

        std::uint32_t id;
        if (!dead_ids_.empty() && !options_.shared_memory) {
            id = dead_ids_.back();
            dead_ids_.pop_back();
        } else {
            id = static_cast<std::uint32_t>(regions_.size());
            regions_.emplace_back();
        }
        Region& r = regions_[id];
        r.base = base;
        r.bytes = bytes;
        r.slab_bytes = cap;
        r.cls = class_index(cap);
        r.slabs = static_cast<std::uint32_t>(slabs);
        r.free_stack.clear();
        r.free_stack.reserve(slabs);
        r.refs = std::make_unique<std::atomic<std::uint32_t>[]>(slabs);
        for (std::size_t s = slabs; s-- > 0;) r.free_stack.push_back(static_cast<std::uint32_t>(s));
        r.shm = std::move(shm);
        r.buf_index = register_region(r);
        classes_[r.cls].regions.push_back(id);
        stats_.mapped_bytes += bytes;
        stats_.regions++;
        stats_.free_buffers += slabs;
        stats_.free_bytes += slabs * cap;
        return static_cast<int>(id);
    }

    void evict(std::size_t need) {
        if (options_.shared_memory) return;  // a peer may still map them
        for (std::uint32_t id = 0; id < regions_.size(); ++id) {
            if (stats_.mapped_bytes + need <= options_.budget_bytes) return;
            Region& r = regions_[id];
            if (!r.base || r.free_stack.size() != r.slabs) continue;
            if (r.buf_index >= 0) unregister_slot(r.buf_index);
            ::munmap(r.base, r.bytes);
            auto& list = classes_[r.cls].regions;
            std::erase(list, id);
            classes_[r.cls].hint = 0;
            stats_.mapped_bytes -= r.bytes;
            stats_.regions--;
            stats_.free_buffers -= r.slabs;
            stats_.free_bytes -= r.slabs * r.slab_bytes;
            if (r.buf_index >= 0) stats_.registered_bytes -= r.bytes;
            r = Region{};
            dead_ids_.push_back(id);
        }
    }

    int register_region(const Region& r) {
        if (!ring_ || !options_.register_buffers || registration_failed_) return -1;
        if (r.bytes > kMaxFixedBytes) return -1;
        if (!fixed_table_) {
            int ret = io_uring_register_buffers_sparse(ring_->raw(), kFixedSlots);
            if (ret < 0) {
                registration_failed(ret, r.bytes);
                return -1;
            }
            fixed_table_ = true;
            for (unsigned i = kFixedSlots; i-- > 0;) free_slots_.push_back(i);
        }
        if (free_slots_.empty()) return -1;  // table full: this region stays unregistered
        unsigned slot = free_slots_.back();
        iovec iov{r.base, r.bytes};
        __u64 tag = 0;
        int ret = io_uring_register_buffers_update_tag(ring_->raw(), slot, &iov, &tag, 1);
        if (ret < 0) {
            registration_failed(ret, r.bytes);
            return -1;
        }
        free_slots_.pop_back();
        stats_.registered_bytes += r.bytes;
        return static_cast<int>(slot);
    }

    void unregister_slot(int slot) {
        if (!ring_) return;
        iovec iov{nullptr, 0};
        __u64 tag = 0;
        io_uring_register_buffers_update_tag(ring_->raw(), static_cast<unsigned>(slot), &iov,
                                             &tag, 1);
        free_slots_.push_back(static_cast<unsigned>(slot));
    }

    void registration_failed(int ret, std::size_t bytes) {
        registration_failed_ = true;
        stats_.registration_failed = true;
        std::string msg = "cannot register " + human_bytes(bytes) +
                          " of buffer memory with io_uring (" + std::strerror(-ret) + ")";
        rlimit lim{};
        if (ret == -ENOMEM && ::getrlimit(RLIMIT_MEMLOCK, &lim) == 0) {
            msg += ": RLIMIT_MEMLOCK is " +
                   (lim.rlim_cur == RLIM_INFINITY ? std::string("unlimited")
                                                  : human_bytes(lim.rlim_cur)) +
                   ", " + human_bytes(stats_.registered_bytes) + " already registered";
        }
        msg += "; continuing with unregistered buffers (no fixed-buffer operations). "
               "Raise the locked-memory limit (ulimit -l, or LimitMEMLOCK= in systemd) to "
               "register them.";
        options_.warn(msg);
    }

    mutable std::mutex mu_;
    Ring* ring_;
    PoolOptions options_;
    PoolStats stats_;
    std::vector<Region> regions_;
    std::vector<std::uint32_t> dead_ids_;
    std::array<ClassState, kMaxClasses> classes_;
    std::vector<unsigned> free_slots_;
    bool fixed_table_ = false;
    bool registration_failed_ = false;
    bool orphaned_ = false;
};

// The control block of a wrapped lease: its handle count and what to run
// when the last handle goes.
class ForeignMemory final : public LeaseSource {
public:
    explicit ForeignMemory(Callback<void()> on_release) : on_release_(std::move(on_release)) {}

    void release(Lease& l) noexcept override {
        if (l.refs_->fetch_sub(1, std::memory_order_acq_rel) != 1) return;
        Callback<void()> done = std::move(on_release_);
        delete this;
        if (done) done();
    }

    std::atomic<std::uint32_t> refs{1};

private:
    Callback<void()> on_release_;
};

}  // namespace detail

Lease Lease::wrap(std::span<std::byte> memory, Callback<void()> on_release) {
    auto* owner = new detail::ForeignMemory(std::move(on_release));
    Lease l;
    l.core_ = owner;
    // A zero-length buffer still needs a non-null address: a Lease with a
    // null data() reads as empty.
    static std::byte empty_memory;
    l.data_ = memory.empty() || memory.data() == nullptr ? &empty_memory : memory.data();
    l.size_ = l.capacity_ = memory.size();
    l.refs_ = &owner->refs;
    l.buf_index_ = -1;
    return l;
}

Lease Lease::share(std::size_t offset, std::size_t length) const noexcept {
    Lease view;
    if (!core_ || offset > size_ || length > size_ - offset) return view;
    refs_->fetch_add(1, std::memory_order_relaxed);
    view.core_ = core_;
    view.data_ = data_ + offset;
    view.size_ = length;
    view.capacity_ = capacity_ - offset;
    view.region_ = region_;
    view.slab_ = slab_;
    view.refs_ = refs_;
    view.buf_index_ = buf_index_;
    view.read_only_ = read_only_;
    return view;
}

void Lease::release() noexcept {
    core_->release(*this);
    core_ = nullptr;
}

BufferPool::BufferPool(Ring* ring, PoolOptions options)
    : core_(new detail::PoolCore(ring, std::move(options))) {}

BufferPool::~BufferPool() { core_->orphan(); }

int BufferPool::lease(std::size_t bytes, Lease& out) { return core_->lease(bytes, out); }

PoolStats BufferPool::stats() const { return core_->stats(); }

const PoolOptions& BufferPool::options() const noexcept { return core_->options(); }

bool BufferPool::locate(const Lease& lease, SharedLocation& out) const noexcept {
    return core_->locate(lease, out);
}

std::size_t BufferPool::class_size(std::size_t bytes) noexcept {
    if (bytes <= kMinClass) return kMinClass;
    if (bytes <= kMiB) return std::bit_ceil(bytes);
    std::size_t step = std::bit_floor(bytes) / 8;
    return round_up(bytes, step);
}

}  // namespace ringxfer::engine
