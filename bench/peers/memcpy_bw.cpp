// memcpy_bw — the machine's single-core memory copy bandwidth, a ceiling.
//
// Every byte a socket moves between two processes on one host is copied by
// the kernel at least once (user -> socket buffer -> user is two copies), so
// one core's memcpy rate bounds what any peer in bench/compare can reach.
// The harness prints each row as a fraction of it.
//
// Copies one buffer into another (default 256 MiB each, far beyond the
// caches), alternating direction, for at least --seconds, after one untimed
// pass that faults both buffers in. Reports bytes copied per second. With a
// small --size (bench/compare's per-frame-size memcpy line: 4 KiB) both
// buffers stay in the cache, so that figure is a copy from cache to cache.
//
// Usage: memcpy_bw [--size SIZE] [--seconds S] [--json FILE]
// Throughput in MB/s (1 MB = 10^6 bytes).

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "wire.hpp"

namespace {

using namespace ringxfer::bench::wire;

int run(int argc, char** argv) {
    std::uint64_t size = 256ULL << 20;
    double min_seconds = 0.5;
    std::string json_path;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) fail("option " + a, "missing value");
            return argv[++i];
        };
        if (a == "--size")
            size = parse_size(value());
        else if (a == "--seconds")
            min_seconds = std::atof(value().c_str());
        else if (a == "--json")
            json_path = value();
        else {
            std::fputs("usage: memcpy_bw [--size SIZE] [--seconds S] [--json FILE]\n", stderr);
            return 2;
        }
    }
    if (size == 0 || min_seconds <= 0) fail("memcpy_bw", "--size and --seconds must be positive");

    std::vector<std::uint8_t> a(size), b(size);  // value-initialised: both faulted in here
    fill_pattern(a.data(), a.size());
    std::memcpy(b.data(), a.data(), size);  // untimed warm pass

    // Reading a byte of each destination into a volatile keeps the copies observable.
    volatile std::uint8_t sink = 0;
    std::uint64_t copies = 0;
    // The clock is read once per MiB copied, not per copy: a 4 KiB copy from
    // cache takes about as long as reading the clock, which would halve the
    // small sizes bench/compare's shm cells compare against.
    const std::uint64_t batch = std::max<std::uint64_t>(1, (1ULL << 20) / size);
    const auto t0 = std::chrono::steady_clock::now();
    double secs = 0;
    do {
        for (std::uint64_t k = 0; k < batch; ++k) {
            const bool forward = copies % 2 == 0;
            std::memcpy(forward ? b.data() : a.data(), forward ? a.data() : b.data(), size);
            sink = sink + (forward ? b : a)[copies % size];
            ++copies;
        }
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (secs < min_seconds);

    const std::uint64_t bytes = copies * size;
    const double mbps = static_cast<double>(bytes) / secs / 1e6;
    std::printf("memcpy_bw: %llu copies x %llu B in %.3f s = %.1f MB/s\n",
                static_cast<unsigned long long>(copies), static_cast<unsigned long long>(size),
                secs, mbps);
    if (!json_path.empty()) {
        nlohmann::ordered_json j = {
            {"schema_version", 1},
            {"tool", {{"name", "memcpy_bw"}}},
            {"params", {{"buffer_bytes", size}, {"min_seconds", min_seconds}}},
            {"results",
             {{"copies", copies}, {"bytes", bytes}, {"seconds", secs}, {"throughput_mbps", mbps}}}};
        std::ofstream f(json_path);
        f << j.dump(2) << '\n';
        f.close();
        if (!f) fail_errno("write " + json_path);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const Error& e) {
        std::fprintf(stderr, "memcpy_bw: %s\n", e.what());
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "memcpy_bw: allocate buffers: %s\n", std::strerror(ENOMEM));
    }
    return 1;
}
