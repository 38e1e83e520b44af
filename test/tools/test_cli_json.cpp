// Runs the real `ringxfer` binary as a user would. meson passes its path in
// RINGXFER_EXE and a scratch directory in RINGXFER_TEST_TMPDIR.
#define BOOST_TEST_MODULE tools_cli_json
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli_runner.hpp"

namespace {

using rxtest::Run;
using rxtest::run_cli;
using rxtest::scratch;
using rxtest::slurp;

/// Runs `bench --frame-size 1M --frames 3 --verify --json F` plus `extra`
/// and checks the report; returns the JSON and (in `run`) the process result.
nlohmann::json check_bench_json(const std::string& transport,
                                const std::vector<std::string>& extra = {},
                                const std::string& wrapper = "", Run* run = nullptr) {
    std::string json_path = scratch("bench-" + transport + ".json");
    ::unlink(json_path.c_str());
    std::vector<std::string> args = {"bench", "--frame-size", "1M", "--frames", "3",
                                     "--verify", "--json", json_path};
    if (transport != "tcp") {
        args.push_back("--transport");
        args.push_back(transport);
    }
    args.insert(args.end(), extra.begin(), extra.end());
    Run r = run_cli(args, std::chrono::seconds(60), wrapper);
    if (run) *run = r;
    BOOST_REQUIRE_MESSAGE(r.exit_code == 0, "exit " << r.exit_code << ": " << r.err);
    BOOST_TEST(r.err.find("echo 3 frames") != std::string::npos);

    std::ifstream in(json_path);
    BOOST_REQUIRE_MESSAGE(in.good(), "no JSON written to " << json_path);
    nlohmann::json j;
    BOOST_REQUIRE_NO_THROW(j = nlohmann::json::parse(in));
    ::unlink(json_path.c_str());

    BOOST_TEST(j.at("schema_version").get<int>() == 1);
    const auto& p = j.at("params");
    BOOST_TEST(p.at("mode").get<std::string>() == "echo");
    BOOST_TEST(p.at("frame_bytes").get<std::uint64_t>() == 1'000'000u);
    BOOST_TEST(p.at("frames").get<std::uint64_t>() == 3u);
    BOOST_TEST(p.at("verify").get<bool>());
    BOOST_TEST(p.at("transport").get<std::string>() == transport);
    BOOST_TEST(p.at("self_started_server").get<bool>());
    const auto& res = j.at("results");
    BOOST_TEST(res.at("frames").get<std::uint64_t>() == 3u);
    BOOST_TEST(res.at("bytes").get<std::uint64_t>() == 3'000'000u);
    BOOST_TEST(res.at("seconds").get<double>() > 0.0);
    BOOST_TEST(res.at("throughput_mbps").get<double>() > 0.0);
    BOOST_TEST(res.at("errors").get<std::uint64_t>() == 0u);
    BOOST_TEST(res.at("error").is_null());
    BOOST_TEST(res.at("latency_us").at("max").get<std::uint64_t>() >=
               res.at("latency_us").at("p50").get<std::uint64_t>());
    BOOST_TEST(j.at("system").at("io_uring_setup_flags").get<std::string>() != "");
    return j;
}

std::string deny_io_uring() {
    const char* v = std::getenv("DENY_IO_URING");
    return v ? v : "";
}

}  // namespace

BOOST_AUTO_TEST_CASE(bench_over_tcp_writes_the_json_report) {
    auto j = check_bench_json("tcp");
    BOOST_TEST(j.at("system").at("backend").get<std::string>() == "io_uring");
    BOOST_TEST(j.at("params").at("server_echo").get<std::string>() == "cut-through");
}

BOOST_AUTO_TEST_CASE(bench_over_unix_socket_writes_the_json_report) { check_bench_json("unix"); }

BOOST_AUTO_TEST_CASE(bench_store_and_forward_server) {
    auto j = check_bench_json("tcp", {"--store-and-forward"});
    BOOST_TEST(j.at("params").at("server_echo").get<std::string>() == "store-and-forward");
}

// The ring set-up levers reach the rings and the report: defer (the
// default) gets DEFER_TASKRUN, coop gets COOP_TASKRUN, sqpoll gets SQPOLL.
BOOST_AUTO_TEST_CASE(bench_ring_setup_levers) {
    for (const char* mode : {"defer", "coop", "sqpoll"}) {
        BOOST_TEST_CONTEXT("--ring " << mode) {
            auto j = check_bench_json("tcp", {"--ring", mode, "--rcvlowat", "256Ki", "--busy-poll", "20"});
            BOOST_TEST(j.at("params").at("busy_poll_us").get<int>() == 20);
            BOOST_TEST(j.at("params").at("ring").get<std::string>() == mode);
            BOOST_TEST(j.at("params").at("rcvlowat_bytes").get<std::uint64_t>() == 256u * 1024);
            std::string flags = j.at("system").at("io_uring_setup_flags").get<std::string>();
            const char* want = std::string(mode) == "defer"  ? "DEFER_TASKRUN"
                               : std::string(mode) == "coop" ? "COOP_TASKRUN"
                                                             : "SQPOLL";
            BOOST_TEST(flags.find(want) != std::string::npos, flags);
        }
    }
}

// --no-huge-pages reaches both pools and the report: the client's memory
// then has no transparent huge pages (unless the system forces them on
// everything), and by default the pool's regions do get them (when the
// system allows them at all).
BOOST_AUTO_TEST_CASE(bench_huge_pages_lever) {
    std::string thp;
    std::getline(std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled"), thp);
    auto off = check_bench_json("tcp", {"--no-huge-pages"});
    BOOST_TEST(!off.at("params").at("huge_pages").get<bool>());
    if (thp.find("[always]") == std::string::npos)
        BOOST_TEST(off.at("system").at("huge_page_bytes").get<std::uint64_t>() == 0u);
    auto on = check_bench_json("tcp");
    BOOST_TEST(on.at("params").at("huge_pages").get<bool>());
    if (thp.find("[never]") == std::string::npos)
        BOOST_TEST(on.at("system").at("huge_page_bytes").get<std::uint64_t>() >= (2u << 20), thp);
}

// --sndbuf: auto gives a loopback TCP connection and a Unix socket the
// engine's local send buffer (the kernel reports twice what was set), a
// size is used as given, 0 leaves the kernel's default.
BOOST_AUTO_TEST_CASE(bench_send_buffer_lever) {
    auto sndbuf_of = [](const nlohmann::json& j) {
        return j.at("system").at("socket_sndbuf_bytes").get<int>();
    };
    // engine::SocketTuning::local_send_buffer; past net.core.wmem_max only as root.
    int local = 512 * 1024, wmem_max = 0;
    std::ifstream("/proc/sys/net/core/wmem_max") >> wmem_max;
    int want = ::geteuid() == 0 || wmem_max >= local ? 2 * local : 2 * wmem_max;
    auto dflt = check_bench_json("tcp");
    BOOST_TEST(dflt.at("params").at("sndbuf").get<std::string>() == "auto");
    BOOST_TEST(sndbuf_of(dflt) == want);
    auto fixed = check_bench_json("tcp", {"--sndbuf", "96Ki"});
    BOOST_TEST(fixed.at("params").at("sndbuf").get<int>() == 96 * 1024);
    BOOST_TEST(sndbuf_of(fixed) == 2 * 96 * 1024);
    auto autotuned = check_bench_json("tcp", {"--sndbuf", "0"});
    BOOST_TEST(autotuned.at("params").at("sndbuf").get<int>() == 0);
    BOOST_TEST(sndbuf_of(autotuned) != sndbuf_of(dflt));
    auto unix_sock = check_bench_json("unix");
    BOOST_TEST(unix_sock.at("params").at("sndbuf").get<std::string>() == "auto");
    BOOST_TEST(sndbuf_of(unix_sock) == want);
    auto unix_default = check_bench_json("unix", {"--sndbuf", "0"});
    BOOST_TEST(sndbuf_of(unix_default) != want);
}

// --page-offset: auto puts pool buffers 16 bytes (the frame header) into a
// page on TCP and at page starts on unix sockets; a number is used as given.
BOOST_AUTO_TEST_CASE(bench_page_offset_lever) {
    auto page_offset = [](const nlohmann::json& j) {
        return j.at("params").at("page_offset_bytes").get<int>();
    };
    BOOST_TEST(page_offset(check_bench_json("tcp")) == 16);
    BOOST_TEST(page_offset(check_bench_json("unix")) == 0);
    BOOST_TEST(page_offset(check_bench_json("tcp", {"--page-offset", "0"})) == 0);
    BOOST_TEST(page_offset(check_bench_json("unix", {"--page-offset", "64"})) == 64);
    Run r = run_cli({"bench", "--page-offset", "4096"});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("0..4095") != std::string::npos, r.err);
}

// SEND_ZC on loopback: the kernel copies, the connection falls back (one
// fallback per connection), unless --no-zerocopy-fallback.
BOOST_AUTO_TEST_CASE(bench_zerocopy_falls_back_on_loopback) {
    auto on = check_bench_json("tcp", {"--zerocopy-threshold", "64Ki"});
    auto sys = on.at("system");
    if (!sys.at("send_zc_available").get<bool>() ||
        sys.at("send_zc_copied_notifications").get<int>() == 0) {
        BOOST_TEST_MESSAGE("no SEND_ZC or no copy reported here: nothing to fall back from");
        return;
    }
    BOOST_TEST(sys.at("send_zc_used").get<bool>());
    BOOST_TEST(sys.at("send_zc_fallbacks").get<int>() == 1);
    auto off = check_bench_json("tcp", {"--zerocopy-threshold", "64Ki", "--no-zerocopy-fallback"});
    BOOST_TEST(off.at("system").at("send_zc_fallbacks").get<int>() == 0);
}

BOOST_AUTO_TEST_CASE(oversized_socket_buffer_is_a_usage_error) {
    Run r = run_cli({"bench", "--sndbuf", "4Gi"});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("above 1Gi") != std::string::npos, r.err);
}

BOOST_AUTO_TEST_CASE(bench_on_the_epoll_backend) {
    auto j = check_bench_json("tcp", {"--backend", "epoll"});
    BOOST_TEST(j.at("system").at("backend").get<std::string>() == "epoll");
    BOOST_TEST(!j.at("system").at("buffers_registered").get<bool>());
}

BOOST_AUTO_TEST_CASE(blocked_io_uring_falls_back_to_epoll_with_one_warning) {
    std::string deny = deny_io_uring();
    if (deny.empty()) {
        BOOST_TEST_MESSAGE("deny_io_uring not built (no libseccomp): skipped");
        return;
    }
    Run r;
    auto j = check_bench_json("unix", {}, deny, &r);
    BOOST_TEST(j.at("system").at("backend").get<std::string>() == "epoll");
    BOOST_TEST(r.err.find("falling back to the epoll backend") != std::string::npos);
    BOOST_TEST(r.err.find("EPERM") != std::string::npos);  // says why
}

BOOST_AUTO_TEST_CASE(blocked_io_uring_with_backend_uring_exits_3) {
    std::string deny = deny_io_uring();
    if (deny.empty()) {
        BOOST_TEST_MESSAGE("deny_io_uring not built (no libseccomp): skipped");
        return;
    }
    Run r = run_cli({"bench", "--backend", "uring", "--frame-size", "64K", "--frames", "1"},
                    std::chrono::seconds(60), deny);
    BOOST_TEST(r.exit_code == 3);
    BOOST_TEST(r.err.find("io_uring") != std::string::npos);
    BOOST_TEST(r.err.find("seccomp") != std::string::npos);  // the likely cause and remedy
}

BOOST_AUTO_TEST_CASE(unknown_backend_is_a_usage_error) {
    Run r = run_cli({"bench", "--backend", "kqueue"});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("kqueue") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_busy_poll_is_a_usage_error) {
    Run r = run_cli({"bench", "--busy-poll", "soon"});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("soon") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(bad_size_is_a_usage_error) {
    Run r = run_cli({"bench", "--frame-size", "12x"});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("12x") != std::string::npos);
    BOOST_TEST(r.err.find("not a size") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(frame_above_max_frame_is_a_usage_error) {
    Run r = run_cli({"bench", "--frame-size", "2M", "--max-frame", "1M"});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("--max-frame") != std::string::npos);
}

// --latency-log: one CSV line per measured round trip, the same round trips
// the histogram summarises (so its exact max is one of them), in completion
// order, each naming its connection.
BOOST_AUTO_TEST_CASE(latency_log_has_every_measured_round_trip) {
    std::string log = scratch("rtt.csv"), json_path = scratch("rtt.json");
    ::unlink(log.c_str());
    Run r = run_cli({"bench", "--mode", "echo", "--frame-size", "4Ki", "-P", "3", "-T", "2",
                     "--frames", "40", "--warmup-frames", "5", "--latency-log", log, "--json",
                     json_path});
    BOOST_REQUIRE_MESSAGE(r.exit_code == 0, "exit " << r.exit_code << ": " << r.err);
    auto j = nlohmann::json::parse(slurp(json_path));
    std::istringstream in(slurp(log));
    std::string line;
    std::getline(in, line);
    BOOST_TEST(line == "end_ns,rtt_ns,connection");
    std::vector<std::uint64_t> rtts;
    std::vector<int> per_conn(3, 0);
    long long last_end = 0;
    while (std::getline(in, line)) {
        long long end = 0;
        unsigned long long rtt = 0, conn = 99;
        BOOST_REQUIRE(std::sscanf(line.c_str(), "%lld,%llu,%llu", &end, &rtt, &conn) == 3);
        BOOST_TEST(end >= last_end);
        last_end = end;
        BOOST_REQUIRE(conn < 3u);
        ++per_conn[conn];
        rtts.push_back(rtt);
    }
    BOOST_TEST(rtts.size() == 120u);  // 40 measured per connection, warm-up left out
    for (int n : per_conn) BOOST_TEST(n == 40);
    const auto& lat = j.at("results").at("latency_ns");
    BOOST_TEST(*std::max_element(rtts.begin(), rtts.end()) == lat.at("max").get<std::uint64_t>());
    std::sort(rtts.begin(), rtts.end());
    // The histogram's p50 is a bucket's upper bound: at or above the true
    // median, by at most 1/64 of it.
    auto p50 = lat.at("p50").get<std::uint64_t>();
    BOOST_TEST(p50 >= rtts[59]);
    BOOST_TEST(p50 <= rtts[59] + rtts[59] / 64 + 1);
}

BOOST_AUTO_TEST_CASE(latency_log_needs_echo) {
    Run r = run_cli({"bench", "--mode", "stream", "--latency-log", scratch("x.csv")});
    BOOST_TEST(r.exit_code == 2);
    BOOST_TEST(r.err.find("--mode echo") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(nothing_listening_fails_with_cannot_connect) {
    // 127.0.0.1:1 is assumed closed; check, and fall back to a reserved
    // (bound, not listening) port if something does listen there.
    std::string target = "127.0.0.1:1";
    {
        int probe = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in sin{};
        sin.sin_family = AF_INET;
        sin.sin_port = htons(1);
        sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        bool open = ::connect(probe, reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0;
        ::close(probe);
        if (open) BOOST_TEST_MESSAGE("something listens on 127.0.0.1:1; using a reserved port");
        if (open) target.clear();
    }
    int reserve = -1;
    if (target.empty()) {
        reserve = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in sin{};
        sin.sin_family = AF_INET;
        sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        BOOST_REQUIRE(::bind(reserve, reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
        socklen_t len = sizeof sin;
        ::getsockname(reserve, reinterpret_cast<sockaddr*>(&sin), &len);
        target = "127.0.0.1:" + std::to_string(ntohs(sin.sin_port));
    }
    Run r = run_cli({"bench", target, "--frame-size", "1K", "--frames", "1"},
                    std::chrono::seconds(30));
    if (reserve >= 0) ::close(reserve);
    BOOST_TEST(r.exit_code != -1, "did not exit within the safety limit");
    BOOST_TEST(r.exit_code == 1);
    BOOST_TEST(r.err.find("cannot connect") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(version_flag) {
    Run r = run_cli({"--version"});
    BOOST_TEST(r.exit_code == 0);
    BOOST_TEST(r.out.find("0.") != std::string::npos);
}
