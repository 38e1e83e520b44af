// The one place where io_uring definitions newer than the installed liburing
// headers live. Debian 12 ships liburing 2.3 (kernel 6.1 era headers); the
// kernels ringxfer runs on may be much newer. Everything here is probed at run
// time (Ring::features()) before use: defining a constant never means the
// kernel supports it.
#pragma once

#include <liburing.h>

#include <cstdint>

// Setup flags (linux/io_uring.h, 6.6+).
#ifndef IORING_SETUP_NO_SQARRAY
#define IORING_SETUP_NO_SQARRAY (1U << 16)
#endif

// SEND_ZC: ask the notification to say whether the kernel copied (6.2+).
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

// send/recv ioprio flags (6.10+): bundle many provided buffers in one CQE.
#ifndef IORING_RECVSEND_BUNDLE
#define IORING_RECVSEND_BUNDLE (1U << 4)
#endif

// Feature bits reported in io_uring_params.features.
#ifndef IORING_FEAT_RECVSEND_BUNDLE
#define IORING_FEAT_RECVSEND_BUNDLE (1U << 14)
#endif
#ifndef IORING_FEAT_REG_REG_RING
#define IORING_FEAT_REG_REG_RING (1U << 13)
#endif

// CQE flag (6.12+): a provided buffer was only partially consumed.
#ifndef IORING_CQE_F_BUF_MORE
#define IORING_CQE_F_BUF_MORE (1U << 4)
#endif

// Futex operations through the ring (6.7+): wait on a futex word beside
// sockets, e.g. the wake word of a shared-memory ShmRing. liburing 2.3 has
// neither the opcodes nor the prep helpers. Probe IORING_OP_FUTEX_WAIT with
// io_uring_opcode_supported() before use.
#ifndef IORING_OP_FUTEX_WAIT
#define IORING_OP_FUTEX_WAIT 51
#define IORING_OP_FUTEX_WAKE 52
#endif
#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02
#endif
#ifndef FUTEX2_PRIVATE
#define FUTEX2_PRIVATE 128
#endif
#ifndef FUTEX_BITSET_MATCH_ANY
#define FUTEX_BITSET_MATCH_ANY 0xffffffff
#endif

namespace ringxfer::engine::compat {
/// IORING_OP_FUTEX_WAIT: completes when `*futex` is woken, or at once with
/// -EAGAIN when it no longer holds `val`. `futex2_flags`: FUTEX2_SIZE_U32,
/// plus FUTEX2_PRIVATE for a word no other process maps.
inline void prep_futex_wait(io_uring_sqe* sqe, const void* futex, std::uint64_t val,
                            unsigned futex2_flags) noexcept {
    io_uring_prep_rw(IORING_OP_FUTEX_WAIT, sqe, static_cast<int>(futex2_flags), futex, 0, val);
    sqe->rw_flags = 0;  // the SQE's futex_flags: none defined
    sqe->addr3 = FUTEX_BITSET_MATCH_ANY;
}
/// IORING_OP_FUTEX_WAKE: wakes up to `nr` waiters of `*futex`.
inline void prep_futex_wake(io_uring_sqe* sqe, const void* futex, std::uint64_t nr,
                            unsigned futex2_flags) noexcept {
    io_uring_prep_rw(IORING_OP_FUTEX_WAKE, sqe, static_cast<int>(futex2_flags), futex, 0, nr);
    sqe->rw_flags = 0;
    sqe->addr3 = FUTEX_BITSET_MATCH_ANY;
}
}  // namespace ringxfer::engine::compat
