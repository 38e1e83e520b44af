#define BOOST_TEST_MODULE tools_units
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "bench.hpp"
#include "histogram.hpp"
#include "rx_test.hpp"
#include "units.hpp"

using ringxfer::tools::format_bytes;
using ringxfer::tools::Histogram;
using ringxfer::tools::parse_size;

namespace {
/// parse_size() with "invalid" shown as a value Boost.Test can print.
constexpr std::uint64_t kInvalid = 0xbad0bad0bad0bad0ull;
std::uint64_t size_of(const char* text) { return parse_size(text).value_or(kInvalid); }
}  // namespace

BOOST_AUTO_TEST_SUITE(sizes)

BOOST_AUTO_TEST_CASE(decimal_and_binary_suffixes) {
    BOOST_TEST(size_of("100M") == 100'000'000);
    BOOST_TEST(size_of("64Ki") == 65536);
    BOOST_TEST(size_of("1Gi") == 1073741824);
    BOOST_TEST(size_of("1.5G") == 1'500'000'000);
    BOOST_TEST(size_of("4096") == 4096);
    BOOST_TEST(size_of("0") == 0);
    BOOST_TEST(size_of("1K") == 1000);
    BOOST_TEST(size_of("2Mi") == 2 * 1048576);
    BOOST_TEST(size_of("100MB") == 100'000'000);
    BOOST_TEST(size_of("64KiB") == 65536);
    BOOST_TEST(size_of("0.5Ki") == 512);
    BOOST_TEST(size_of("4Gi") == std::uint64_t{4} << 30);
}

BOOST_AUTO_TEST_CASE(garbage_is_rejected) {
    for (const char* bad : {"12x", "", "M", "Ki", "-1", "1..5", ".", "1e3", "1 M", "1MiBx", "0x10",
                            "1T", "abc"}) {
        BOOST_TEST_CONTEXT("'" << bad << "'") { BOOST_TEST(!parse_size(bad).has_value()); }
    }
}

BOOST_AUTO_TEST_CASE(overflow_is_rejected) {
    BOOST_TEST(!parse_size("100000000000000000000").has_value());  // 1e20 > 2^64
    BOOST_TEST(!parse_size("20000000000G").has_value());
    BOOST_TEST(size_of("1000000000G") == 1'000'000'000'000'000'000);
}

BOOST_AUTO_TEST_CASE(format_bytes_uses_decimal_units) {
    BOOST_TEST(format_bytes(0) == "0 B");
    BOOST_TEST(format_bytes(999) == "999 B");
    BOOST_TEST(format_bytes(1500) == "1.5 kB");
    BOOST_TEST(format_bytes(100'000'000) == "100.0 MB");
    BOOST_TEST(format_bytes(2'500'000'000) == "2.50 GB");
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(histogram)

BOOST_AUTO_TEST_CASE(empty_histogram_reports_zero) {
    Histogram h;
    BOOST_TEST(h.count() == 0u);
    BOOST_TEST(h.max() == 0u);
    BOOST_TEST(h.percentile(0.5) == 0u);
}

BOOST_AUTO_TEST_CASE(single_sample_is_every_percentile) {
    for (std::uint64_t v : {std::uint64_t{0}, std::uint64_t{7}, std::uint64_t{1000},
                            std::uint64_t{123456789}}) {
        Histogram h;
        h.record(v);
        BOOST_TEST_CONTEXT("v " << v) {
            for (double q : {0.0, 0.5, 0.99, 1.0}) BOOST_TEST(h.percentile(q) == v);
        }
    }
}

BOOST_AUTO_TEST_CASE(percentiles_are_monotone_bounded_and_max_is_exact) {
    Histogram h;
    std::uint64_t x = 5;
    std::vector<std::uint64_t> samples;
    for (int i = 0; i < 100000; ++i) {
        x = rxtest::mix64(x);
        std::uint64_t v = (x % 1'000'000) + (x >> 60 == 0 ? 50'000'000 : 0);  // a heavy tail
        samples.push_back(v);
        h.record(v);
    }
    h.record(98'765'432);
    samples.push_back(98'765'432);
    std::sort(samples.begin(), samples.end());
    BOOST_TEST(h.count() == samples.size());
    BOOST_TEST(h.max() == 98'765'432u);
    BOOST_TEST(h.percentile(1.0) == 98'765'432u);

    std::uint64_t prev = 0;
    for (int i = 0; i <= 1000; ++i) {
        double q = i / 1000.0;
        std::uint64_t p = h.percentile(q);
        BOOST_TEST_CONTEXT("q " << q) {
            BOOST_TEST(p >= prev);  // monotone
            BOOST_TEST(p <= h.max());
            // A bucket upper bound: never below the true quantile, at most
            // one sub-bucket (1/64) above it.
            std::size_t rank = static_cast<std::size_t>(q * static_cast<double>(samples.size()) + 0.5);
            std::uint64_t exact = samples[rank == 0 ? 0 : rank - 1];
            BOOST_TEST(p >= exact);
            BOOST_TEST(p <= exact + exact / 64 + 1);
        }
        prev = p;
    }
}

BOOST_AUTO_TEST_CASE(buckets_cover_the_whole_range) {
    for (std::uint64_t v : {std::uint64_t{0}, std::uint64_t{127}, std::uint64_t{128},
                            std::uint64_t{129}, std::uint64_t{135'000}, std::uint64_t{1} << 40,
                            std::numeric_limits<std::uint64_t>::max()}) {
        BOOST_TEST_CONTEXT("v " << v) {
            std::size_t idx = Histogram::index(v);
            BOOST_TEST(idx < Histogram::kBuckets);
            BOOST_TEST(Histogram::upper(idx) >= v);
            if (idx > 0) BOOST_TEST(Histogram::upper(idx - 1) < v);
        }
    }
    // The largest value takes the last bucket: the array is exactly as big as it must be.
    BOOST_TEST(Histogram::index(std::numeric_limits<std::uint64_t>::max()) == Histogram::kBuckets - 1);
    Histogram h;
    h.record(std::numeric_limits<std::uint64_t>::max());
    BOOST_TEST(h.max() == std::numeric_limits<std::uint64_t>::max());
    BOOST_TEST(h.percentile(0.5) == std::numeric_limits<std::uint64_t>::max());
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(window)

using ringxfer::tools::effective_window;

BOOST_AUTO_TEST_CASE(auto_window_is_one_round_trip_for_echo_and_8_mib_one_way) {
    BOOST_TEST(effective_window("echo", 4096, 0) == 1u);
    BOOST_TEST(effective_window("echo", 100'000'000, 0) == 1u);
    BOOST_TEST(effective_window("stream", 4096, 0) == 2048u);
    BOOST_TEST(effective_window("reverse", 1 << 20, 0) == 8u);
    BOOST_TEST(effective_window("bidir", 3 << 20, 0) == 3u);  // rounded up
    BOOST_TEST(effective_window("stream", 100'000'000, 0) == 2u);  // at least 2
    BOOST_TEST(effective_window("stream", 64, 0) == 4096u);        // at most 4096
    BOOST_TEST(effective_window("stream", 0, 0) == 4096u);
    BOOST_TEST(effective_window("stream", 4096, 7) == 7u);  // an explicit window wins
    BOOST_TEST(effective_window("echo", 4096, 3) == 3u);
}

BOOST_AUTO_TEST_CASE(auto_busy_poll_only_when_every_poller_has_a_cpu) {
    using ringxfer::tools::busy_poll_for;
    BOOST_TEST(busy_poll_for(1, true, 2).count() == 50);   // client + server on 2 CPUs
    BOOST_TEST(busy_poll_for(2, true, 2).count() == 0);    // 3 pollers, 2 CPUs
    BOOST_TEST(busy_poll_for(2, false, 2).count() == 50);  // remote server: clients only
    BOOST_TEST(busy_poll_for(1, true, 1).count() == 0);    // one CPU: never spin
    BOOST_TEST(busy_poll_for(7, true, 8).count() == 50);
}

BOOST_AUTO_TEST_SUITE_END()
