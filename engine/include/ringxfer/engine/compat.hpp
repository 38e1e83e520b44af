// The one place where io_uring definitions newer than the installed liburing
// headers live. Debian 12 ships liburing 2.3 (kernel 6.1 era headers); the
// kernels ringxfer runs on may be much newer. Everything here is probed at run
// time (Ring::features()) before use: defining a constant never means the
// kernel supports it.
#pragma once

#include <liburing.h>

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
