// ShmStream: the same-host shared-memory transport (issue #18), a Stream
// like SocketStream, so proto/ and every caller above it use it unchanged.
//
// Rendezvous: an AF_UNIX SOCK_SEQPACKET socket ("shm:PATH"). The connector
// creates one memfd holding two ShmRings (one per direction) and sends it
// with its eventfd (SCM_RIGHTS); the acceptor checks and maps it and answers
// with its own eventfd. After that the socket carries only announcements of
// new pool regions (a memfd each, passed the first time a payload in that
// region is sent) and, by its end-of-file, the news that the peer is gone.
//
// Payloads: a payload that lies in this side's BufferPool (which must be
// PoolOptions::shared_memory) is sent by reference: a descriptor (region,
// offset, length, cookie) goes through the ring and the stream keeps the
// lease until the peer releases it (then the send's handler runs: the
// caller may reuse the buffer). Any other payload is copied once into a
// lease of that pool (the send completes at once); a payload of at most
// kInlineBodyMax bytes, and every prefix, travels inside descriptors.
// The receiver maps the peer's regions read-only. recv() copies bytes out
// (headers, small frames: what a staging buffer holds); take_payload() hands
// a whole payload over as a read-only Lease of the peer's memory, and
// releasing that lease sends a release descriptor back (from any thread).
//
// Flow control: at most ring_capacity payloads per direction are out
// (sent, not yet released); the sender's pool budget bounds their bytes.
// Waits: each side busy-polls its incoming ring for `spin` after the last
// activity (a Ring Poller; by default the ring's own busy_poll, so one
// setting, `--busy-poll`, governs sockets and shared memory), then sleeps: IORING_OP_FUTEX_WAIT on the ring's
// wake word (kernel 6.7+), or an eventfd read, so one thread waits on
// sockets and shared memory at once; the producer wakes only a consumer
// that said it sleeps.
//
// The peer is another process, not a friend: every descriptor is validated
// (type, region announced, bounds) before use; one that fails closes the
// stream with an error naming it (error_message()). A peer that dies: the
// socket's end-of-file returns every payload it held to our pool, frames we
// received from it stay readable (our mappings live while our leases do).
// Our socket stays open while we hold views of the peer's memory, so the
// peer never takes back memory we can still read.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/ring.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"

namespace ringxfer::engine {

struct ShmStreamOptions {
    /// Descriptors per ring (a power of two, 64 .. 65536); also the most
    /// payloads one direction has out at once.
    std::uint32_t ring_capacity = 4096;
    /// Busy-poll the incoming ring this long after the last activity before
    /// sleeping (0: sleep at once). Unset: the ring's RingOptions::busy_poll.
    std::optional<std::chrono::microseconds> spin;
    /// Bytes of copied payloads (sent from memory outside the shared pool)
    /// not yet released by the peer before further copies wait, like a
    /// socket's send buffer: a sender far ahead of its reader would otherwise
    /// copy into ever new shared memory (first-touch page faults) instead of
    /// reusing slabs. A larger payload goes when nothing is out.
    std::size_t max_copied_out = std::size_t{32} << 20;
    /// The handshake must be done this long after the stream is made, or the
    /// stream fails with -ETIMEDOUT and a message saying so (0: no limit).
    std::chrono::milliseconds handshake_timeout{10'000};
    /// close() with payloads out (the peer may still read them): the stream
    /// keeps them, and their sends open, until the peer releases them or
    /// goes away, for at most this long; then they return to the pool (and
    /// their sends complete with -ECANCELED). Destroying the stream returns
    /// them at once.
    std::chrono::milliseconds close_linger{2'000};
    /// Wait on an eventfd even where IORING_OP_FUTEX_WAIT works (tests).
    bool force_eventfd = false;
};

/// Payloads up to this size travel inside descriptors (no slab, no release).
inline constexpr std::size_t kShmInlineBodyMax = 256;

/// A stream over a connected shm rendezvous socket (from accept or connect
/// of an Endpoint::Kind::shm). `connector`: this side made the connection
/// (it creates the rings). The handshake runs in the background; operations
/// issued before it is done wait for it. `pool` must be shared_memory and
/// outlive the stream; -EINVAL (as engine::Error) otherwise.
std::unique_ptr<Stream> make_shm_stream(Ring& ring, Fd fd, BufferPool& pool, bool connector,
                                        const ShmStreamOptions& options = {});

}  // namespace ringxfer::engine
