// Log-bucket latency histogram: fixed memory (no per-sample storage, 30 KiB:
// keep one per thread, not per connection), about 1.6% relative resolution
// (64 sub-buckets per power of two), exact max. Percentiles are bucket upper
// bounds: never below the true value, at most one sub-bucket above it. Bench
// records nanoseconds: at 16 sub-buckets and whole microseconds, a round
// trip of 136.0 us was reported as 143 (docs/performance.md, row 4).
#pragma once

#include <array>
#include <bit>
#include <cstdint>
#include <vector>

namespace ringxfer::tools {

/// Every measured echo round trip of one thread's connections, for `bench
/// --latency-log`: when it completed (CLOCK_MONOTONIC, ns, the clock perf and
/// the kernel's timer ticks can be lined up with), how long it took, and on
/// which connection. Bounded: past kMax records it counts what it dropped.
/// The space is reserved up front (untouched pages cost nothing until used)
/// so that recording never reallocates in the middle of a measurement.
struct LatencyLog {
    struct Record {
        std::int64_t end_ns;
        std::uint64_t rtt_ns;
        std::uint64_t connection;
    };
    static constexpr std::size_t kMax = std::size_t{4} << 20;  // 96 MiB per thread
    std::vector<Record> records;
    std::uint64_t dropped = 0;
    bool enabled = false;

    void enable() {
        enabled = true;
        records.reserve(kMax);
    }
    void add(std::int64_t end_ns, std::uint64_t rtt_ns, std::uint64_t connection) {
        if (!enabled) return;
        if (records.size() == kMax) {
            ++dropped;
            return;
        }
        records.push_back({end_ns, rtt_ns, connection});
    }
};

class Histogram {
public:
    void record(std::uint64_t v) noexcept {
        ++counts_[index(v)];
        ++total_;
        if (v > max_) max_ = v;
    }
    void merge(const Histogram& o) noexcept {
        for (std::size_t i = 0; i < counts_.size(); ++i) counts_[i] += o.counts_[i];
        total_ += o.total_;
        if (o.max_ > max_) max_ = o.max_;
    }
    std::uint64_t count() const noexcept { return total_; }
    std::uint64_t max() const noexcept { return max_; }

    /// Smallest bucket upper bound covering fraction q (0..1) of samples,
    /// never above the exact maximum.
    std::uint64_t percentile(double q) const noexcept {
        if (total_ == 0) return 0;
        auto target = static_cast<std::uint64_t>(q * static_cast<double>(total_) + 0.5);
        if (target < 1) target = 1;
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < counts_.size(); ++i) {
            seen += counts_[i];
            if (seen >= target) return upper(i) < max_ ? upper(i) : max_;
        }
        return max_;
    }

    static constexpr unsigned kSubBits = 6;
    static constexpr std::size_t kSub = std::size_t{1} << kSubBits;
    /// Values below 2 * kSub have a bucket each; above, every power of two
    /// up to 2^64 is split into kSub buckets.
    static constexpr std::size_t kBuckets = (65 - kSubBits) * kSub;

    static std::size_t index(std::uint64_t v) noexcept {
        if (v < 2 * kSub) return static_cast<std::size_t>(v);
        unsigned e = static_cast<unsigned>(std::bit_width(v)) - (kSubBits + 1);
        return (e + 1) * kSub + static_cast<std::size_t>((v >> e) - kSub);
    }
    static std::uint64_t upper(std::size_t idx) noexcept {
        if (idx < 2 * kSub) return idx;
        unsigned e = static_cast<unsigned>(idx / kSub - 1);
        std::uint64_t sub = idx % kSub + kSub;
        return ((sub + 1) << e) - 1;
    }

private:
    std::array<std::uint64_t, kBuckets> counts_{};
    std::uint64_t total_ = 0;
    std::uint64_t max_ = 0;
};

}  // namespace ringxfer::tools
