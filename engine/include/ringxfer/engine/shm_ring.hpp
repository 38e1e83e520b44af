// ShmRing: a single-producer single-consumer ring of fixed-size descriptors
// in memory two processes share: the descriptor channel of the same-host
// shared-memory transport (issue #18; one ring per direction). Payloads never
// pass through it: a descriptor names where a frame lies (region, offset,
// length) in the sender's shared pool, and the same ring carries releases
// back.
//
// Layout in the shared mapping (created by one side, attached by the other):
//
//   ShmRingHeader   magic, version, capacity, descriptor size (written once
//                   by the creator), then on cache lines of their own: tail
//                   (the producer's next slot), head (the consumer's next
//                   slot), and the consumer's sleep word and wake sequence
//   ShmDescriptor[capacity]
//
// The peer is another process, not a friend: every field of the mapping may
// hold anything at any time. Each side keeps the capacity it validated at
// create/attach and never reads it again; the consumer copies descriptors out
// before anything else looks at them; a head or tail that claims more than
// `capacity` entries is reported as -EPROTO, never followed.
//
// Publication: each slot's flags word carries a lap stamp (its top byte,
// 1..255, different for consecutive laps), stored last with release order.
// The consumer polls the next slot's stamp, not the tail, so a polling
// consumer touches only the cache lines of the descriptors themselves; the
// tail is still stored once per batch, for the sleep handshake below.
//
// Wake-ups cost nothing under load: the producer publishes a batch with one
// store, and enters the kernel (FUTEX_WAKE on the wake sequence) only when
// the consumer said it sleeps. The consumer's prepare_sleep() / producer's
// try_push() + consumer_sleeping() pair is Dekker-style: each stores (its
// flag, the tail), then loads the other's, all seq_cst, so one of them sees
// the other and a wake-up is never lost. The wake word is a plain futex in shared memory, so
// io_uring's IORING_OP_FUTEX_WAIT can wait on it beside sockets (kernel 6.7+,
// probed by the transport) as well as futex(2).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

namespace ringxfer::engine {

/// One descriptor: 32 bytes, copied by value through the ring.
struct ShmDescriptor {
    std::uint32_t region = 0;  ///< the sender's region number
    /// What the transport says it is (frame, release, ...): bits 0..23. The
    /// top byte is the ring's (the slot's lap stamp) and reads as 0.
    std::uint32_t flags = 0;
    std::uint64_t offset = 0;  ///< bytes into the region
    std::uint64_t length = 0;  ///< bytes
    std::uint64_t cookie = 0;  ///< the sender's handle for it (returned on release)
};
static_assert(sizeof(ShmDescriptor) == 32);

struct alignas(64) ShmRingHeader {
    std::uint32_t magic;
    std::uint32_t version;
    std::uint32_t capacity;
    std::uint32_t descriptor_size;
    alignas(64) std::atomic<std::uint64_t> tail;
    alignas(64) std::atomic<std::uint64_t> head;
    alignas(64) std::atomic<std::uint32_t> sleeping;  ///< 1 while the consumer may sleep
    std::atomic<std::uint32_t> wake_seq;              ///< the futex word
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

class ShmRing {
public:
    static constexpr std::uint32_t kMagic = 0x52585352;  // "RSXR"
    static constexpr std::uint32_t kVersion = 2;  // 2: lap stamps in the flags' top byte

    /// Bytes of shared memory a ring of `capacity` descriptors needs.
    static std::size_t bytes_for(std::uint32_t capacity) noexcept;

    /// Lays out a new ring in `mem` (`bytes` long, 64-byte aligned).
    /// -EINVAL: capacity not a power of two from 2 to 2^24, or `mem` too small
    /// or misaligned.
    static int create(void* mem, std::size_t bytes, std::uint32_t capacity,
                      ShmRing& out) noexcept;
    /// Attaches to a ring the peer laid out. -EPROTO: not a ring of this
    /// version (magic, version, descriptor size); -EINVAL: its capacity is
    /// not a power of two or does not fit in `bytes`.
    static int attach(void* mem, std::size_t bytes, ShmRing& out) noexcept;

    ShmRing() = default;

    std::uint32_t capacity() const noexcept { return capacity_; }

    // -- producer --------------------------------------------------------

    /// Copies as many of `batch` as fit into the ring (all or none with
    /// `whole`: the parts of one frame travel together) and publishes them
    /// with one store. Returns how many (0 when full), or -EPROTO when the
    /// consumer's head is impossible.
    int try_push(std::span<const ShmDescriptor> batch, bool whole = false) noexcept;
    /// After try_push(): true when the consumer said it sleeps, i.e. wake()
    /// is needed. Takes the flag (one exchange): of the pushes made while the
    /// consumer sleeps only the first wakes it.
    bool consumer_sleeping() noexcept;
    /// Wakes the consumer through futex(2) on the wake word.
    void wake() noexcept;
    /// The futex word, for a wake (or wait) submitted through io_uring, and
    /// the bump that must come before such a wake.
    std::atomic<std::uint32_t>* wake_word() noexcept { return &hdr_->wake_seq; }
    void bump_wake_seq() noexcept { hdr_->wake_seq.fetch_add(1, std::memory_order_release); }

    // -- consumer --------------------------------------------------------

    /// Copies up to out.size() descriptors out of the ring and frees their
    /// slots. Returns how many (0 when empty), or -EPROTO when the
    /// producer's tail is impossible.
    int pop(std::span<ShmDescriptor> out) noexcept;
    /// True when nothing is waiting (or the tail is corrupt: pop() says so).
    bool empty() const noexcept;
    /// Says the consumer is about to sleep. Returns the wake sequence to wait
    /// on (futex value), or nullopt when descriptors arrived meanwhile: do
    /// not sleep, pop them. After waking (or deciding not to wait), call
    /// end_sleep().
    std::optional<std::uint32_t> prepare_sleep() noexcept;
    void end_sleep() noexcept;
    /// futex(2) wait on the wake word for `seq` (from prepare_sleep), at most
    /// `timeout_ns` (-1: no limit). 0, -EAGAIN (woken before it slept),
    /// -ETIMEDOUT or -EINTR.
    int wait(std::uint32_t seq, std::int64_t timeout_ns = -1) noexcept;

private:
    ShmRing(ShmRingHeader* h, ShmDescriptor* slots, std::uint32_t capacity) noexcept;
    std::uint32_t stamp(std::uint64_t index) const noexcept;

    ShmRingHeader* hdr_ = nullptr;
    ShmDescriptor* slots_ = nullptr;
    std::uint32_t capacity_ = 0;  // validated once, never read from the mapping again
    std::uint32_t mask_ = 0;
    std::uint32_t shift_ = 0;  // log2(capacity): index >> shift_ is the lap
    bool corrupt_ = false;     // consumer: prepare_sleep() saw an impossible tail
    // Each side's own index lives here, not in the mapping: the producer's
    // tail, the consumer's head. The mapping's copy is only published.
    std::uint64_t own_tail_ = 0;     // producer
    std::uint64_t own_head_ = 0;     // consumer
    std::uint64_t cached_head_ = 0;  // producer: the last head it read
};

}  // namespace ringxfer::engine
