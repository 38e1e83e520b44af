#include "ringxfer/engine/shm_ring.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <new>

namespace ringxfer::engine {

namespace {
constexpr std::uint32_t kMaxCapacity = 1u << 24;

bool power_of_two(std::uint32_t n) { return n >= 2 && n <= kMaxCapacity && (n & (n - 1)) == 0; }

ShmDescriptor* slots_of(ShmRingHeader* h) { return reinterpret_cast<ShmDescriptor*>(h + 1); }

constexpr std::uint32_t kStampMask = 0xff000000u;

std::atomic_ref<std::uint32_t> flags_of(ShmDescriptor& d) noexcept {
    return std::atomic_ref<std::uint32_t>(d.flags);
}
}  // namespace

ShmRing::ShmRing(ShmRingHeader* h, ShmDescriptor* slots, std::uint32_t capacity) noexcept
    : hdr_(h), slots_(slots), capacity_(capacity), mask_(capacity - 1),
      shift_(static_cast<std::uint32_t>(std::countr_zero(capacity))) {}

std::uint32_t ShmRing::stamp(std::uint64_t index) const noexcept {
    // 1..255, different for consecutive laps; a slot never written holds 0.
    return static_cast<std::uint32_t>(((index >> shift_) % 255) + 1) << 24;
}

std::size_t ShmRing::bytes_for(std::uint32_t capacity) noexcept {
    return sizeof(ShmRingHeader) + std::size_t{capacity} * sizeof(ShmDescriptor);
}

int ShmRing::create(void* mem, std::size_t bytes, std::uint32_t capacity, ShmRing& out) noexcept {
    if (!power_of_two(capacity) || bytes < bytes_for(capacity) ||
        reinterpret_cast<std::uintptr_t>(mem) % alignof(ShmRingHeader) != 0)
        return -EINVAL;
    auto* h = new (mem) ShmRingHeader{};
    h->magic = kMagic;
    h->version = kVersion;
    h->capacity = capacity;
    h->descriptor_size = sizeof(ShmDescriptor);
    h->tail.store(0, std::memory_order_relaxed);
    h->head.store(0, std::memory_order_relaxed);
    h->sleeping.store(0, std::memory_order_relaxed);
    std::memset(static_cast<void*>(slots_of(h)), 0, std::size_t{capacity} * sizeof(ShmDescriptor));
    // Published by whatever hands the mapping to the peer (a socket, a
    // fork): a system call orders these stores before the peer's loads.
    h->wake_seq.store(0, std::memory_order_release);
    out = ShmRing(h, slots_of(h), capacity);
    return 0;
}

int ShmRing::attach(void* mem, std::size_t bytes, ShmRing& out) noexcept {
    if (bytes < sizeof(ShmRingHeader) ||
        reinterpret_cast<std::uintptr_t>(mem) % alignof(ShmRingHeader) != 0)
        return -EINVAL;
    auto* h = static_cast<ShmRingHeader*>(mem);
    (void)h->wake_seq.load(std::memory_order_acquire);
    // Read each field once: the peer may change them under us.
    const std::uint32_t magic = h->magic, version = h->version, capacity = h->capacity,
                        dsize = h->descriptor_size;
    if (magic != kMagic || version != kVersion || dsize != sizeof(ShmDescriptor)) return -EPROTO;
    if (!power_of_two(capacity) || bytes < bytes_for(capacity)) return -EINVAL;
    ShmRing r(h, slots_of(h), capacity);
    r.own_tail_ = h->tail.load(std::memory_order_acquire);
    r.own_head_ = r.cached_head_ = h->head.load(std::memory_order_acquire);
    if (r.own_tail_ - r.own_head_ > capacity) return -EPROTO;
    out = r;
    return 0;
}

int ShmRing::try_push(std::span<const ShmDescriptor> batch, bool whole) noexcept {
    std::uint64_t free = capacity_ - (own_tail_ - cached_head_);
    if (free < batch.size()) {
        cached_head_ = hdr_->head.load(std::memory_order_acquire);
        const std::uint64_t used = own_tail_ - cached_head_;
        if (used > capacity_) return -EPROTO;  // a head ahead of our tail, or far behind
        free = capacity_ - used;
    }
    if (whole && free < batch.size()) return 0;
    const std::size_t n = batch.size() < free ? batch.size() : static_cast<std::size_t>(free);
    for (std::size_t i = 0; i < n; i++) {
        // The body first, then the flags word with the lap stamp (release):
        // the consumer that sees the stamp sees the descriptor.
        ShmDescriptor& d = slots_[(own_tail_ + i) & mask_];
        d.region = batch[i].region;
        d.offset = batch[i].offset;
        d.length = batch[i].length;
        d.cookie = batch[i].cookie;
        flags_of(d).store((batch[i].flags & ~kStampMask) | stamp(own_tail_ + i),
                          std::memory_order_release);
    }
    if (n == 0) return 0;
    own_tail_ += n;
    // seq_cst: with consumer_sleeping()'s seq_cst load, and the consumer's
    // seq_cst flag store and tail load in prepare_sleep(), one of the two
    // sides sees the other (no fences: ThreadSanitizer does not model them).
    hdr_->tail.store(own_tail_, std::memory_order_seq_cst);
    return static_cast<int>(n);
}

bool ShmRing::consumer_sleeping() noexcept {
    // Pairs with prepare_sleep(): our tail store, then their flag; their
    // flag store, then our tail. One of the two loads sees the other store.
    // A cheap load first: under load the consumer is awake and this is all.
    if (hdr_->sleeping.load(std::memory_order_seq_cst) == 0) return false;
    return hdr_->sleeping.exchange(0, std::memory_order_seq_cst) != 0;
}

void ShmRing::wake() noexcept {
    bump_wake_seq();
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&hdr_->wake_seq), FUTEX_WAKE, 1,
              nullptr, nullptr, 0);
}

int ShmRing::pop(std::span<ShmDescriptor> out) noexcept {
    if (corrupt_) return -EPROTO;
    // The stamps say what is there: the tail (the producer's cache line) is
    // not read while polling, so a poll moves no line but the descriptors'.
    // Copied out before anyone looks at them: the producer may write the
    // slots again once head moves, or at any time if it is hostile.
    std::size_t n = 0;
    for (; n < out.size(); n++) {
        ShmDescriptor& d = slots_[(own_head_ + n) & mask_];
        const std::uint32_t f = flags_of(d).load(std::memory_order_acquire);
        if ((f & kStampMask) != stamp(own_head_ + n)) break;
        out[n].region = d.region;
        out[n].offset = d.offset;
        out[n].length = d.length;
        out[n].cookie = d.cookie;
        out[n].flags = f & ~kStampMask;
    }
    if (n == 0) return 0;
    own_head_ += n;
    hdr_->head.store(own_head_, std::memory_order_release);
    return static_cast<int>(n);
}

bool ShmRing::empty() const noexcept {
    ShmDescriptor& d = slots_[own_head_ & mask_];
    return (flags_of(d).load(std::memory_order_acquire) & kStampMask) != stamp(own_head_);
}

std::optional<std::uint32_t> ShmRing::prepare_sleep() noexcept {
    const std::uint32_t seq = hdr_->wake_seq.load(std::memory_order_acquire);
    hdr_->sleeping.store(1, std::memory_order_seq_cst);
    const std::uint64_t tail = hdr_->tail.load(std::memory_order_seq_cst);
    if (tail != own_head_) {
        // Descriptors arrived, or we took some by their stamps before their
        // tail store showed (it lags by at most a batch). A tail neither
        // within a ring's length behind nor ahead of our head is impossible:
        // the next pop() says so.
        if (tail - own_head_ > capacity_ && own_head_ - tail > capacity_) corrupt_ = true;
        hdr_->sleeping.store(0, std::memory_order_relaxed);
        return std::nullopt;
    }
    return seq;
}

void ShmRing::end_sleep() noexcept { hdr_->sleeping.store(0, std::memory_order_relaxed); }

int ShmRing::wait(std::uint32_t seq, std::int64_t timeout_ns) noexcept {
    timespec ts{};
    if (timeout_ns >= 0) {
        ts.tv_sec = static_cast<time_t>(timeout_ns / 1'000'000'000);
        ts.tv_nsec = static_cast<long>(timeout_ns % 1'000'000'000);
    }
    long r = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&hdr_->wake_seq), FUTEX_WAIT,
                       seq, timeout_ns >= 0 ? &ts : nullptr, nullptr, 0);
    return r == 0 ? 0 : -errno;
}

}  // namespace ringxfer::engine
