// FaultInjector: makes a Ring's operations fail or come back short, on
// purpose, so tests can drive every error path of the code above the ring.
//
// Faults are applied when SQEs are handed to the kernel, never by rewriting a
// real completion: a recv that really received 4 KiB cannot be reported as an
// error without losing those bytes, which no kernel would do. Instead
//   - an injected error replaces the SQE with a NOP; the NOP's completion is
//     reported to the operation's owner with the chosen -errno, exactly as if
//     the kernel had failed the operation without doing it;
//   - an injected short count clamps the SQE's length (or the iovecs of a
//     SENDMSG) so the kernel really transfers fewer bytes and the owner must
//     resume.
//
// Rules are deterministic (skip the first `skip` matching SQEs, then hit
// every `every`-th one, `count` times), so a failing test replays exactly.
//
// Compiled in when RINGXFER_FAULT_INJECTION is defined (meson option
// `fault_injection`, on by default so the test suite can use it; packagers
// may turn it off). Without it Ring::set_fault_injector() does nothing and
// fault_injection_compiled is false.
#pragma once

#include <cstdint>
#include <limits>
#include <unordered_map>
#include <vector>

#include "ringxfer/engine/compat.hpp"

namespace ringxfer::engine {

#ifdef RINGXFER_FAULT_INJECTION
inline constexpr bool fault_injection_compiled = true;
#else
inline constexpr bool fault_injection_compiled = false;
#endif

struct FaultRule {
    static constexpr int kAnyOp = -1;
    static constexpr std::uint64_t kForever = std::numeric_limits<std::uint64_t>::max();

    int opcode = kAnyOp;      ///< IORING_OP_* this rule applies to
    std::uint64_t skip = 0;   ///< let this many matching SQEs through first
    std::uint64_t every = 1;  ///< then hit every n-th matching SQE
    std::uint64_t count = 1;  ///< at most this many times (kForever: no limit)
    /// Either an error (-errno, e.g. -ECONNRESET) ...
    std::int32_t error = 0;
    /// ... or a short count: at most this many bytes for the operation.
    std::uint32_t max_bytes = 0;

    /// `count` SQEs of `opcode` fail with `err` (< 0), after `skip` of them.
    static FaultRule fail(int opcode, std::int32_t err, std::uint64_t count = 1,
                          std::uint64_t skip = 0) {
        FaultRule r;
        r.opcode = opcode;
        r.error = err;
        r.count = count;
        r.skip = skip;
        return r;
    }
    /// Every SQE of `opcode` moves at most `max` bytes.
    static FaultRule shorten(int opcode, std::uint32_t max) {
        FaultRule r;
        r.opcode = opcode;
        r.max_bytes = max;
        r.count = kForever;
        return r;
    }
};

class FaultInjector {
public:
    FaultInjector() = default;
    explicit FaultInjector(std::vector<FaultRule> rules) : rules_(std::move(rules)) {}

    void add(const FaultRule& rule) { rules_.push_back(rule); }

    /// Called by the Ring for each SQE about to be submitted.
    void on_submit(io_uring_sqe* sqe);

    /// Called by the Ring for each CQE before dispatch: a CQE of an SQE
    /// replaced by a NOP gets its injected error. Returns the result to report.
    std::int32_t on_complete(std::uint64_t user_data, std::int32_t res, std::uint32_t flags);

    struct Stats {
        std::uint64_t seen = 0;      ///< SQEs inspected
        std::uint64_t errors = 0;    ///< SQEs replaced by an injected error
        std::uint64_t shortened = 0; ///< SQEs whose length was clamped
    };
    const Stats& stats() const noexcept { return stats_; }

private:
    struct State {
        std::uint64_t matched = 0;
        std::uint64_t hits = 0;
    };
    std::vector<FaultRule> rules_;
    std::vector<State> state_;
    // user_data of SQEs replaced by NOPs -> the error their CQE must carry.
    std::unordered_multimap<std::uint64_t, std::int32_t> pending_;
    Stats stats_;
};

}  // namespace ringxfer::engine
