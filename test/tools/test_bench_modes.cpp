// `ringxfer bench` in every mode, over TCP loopback and a Unix socket, as a
// user runs it: the JSON validates against docs/bench-result.schema.json, the
// --json-stream output parses line by line, interval counts match --time,
// latency percentiles are monotone, and both sides' CPU figures are present.
#define BOOST_TEST_MODULE tools_bench_modes
#ifndef BOOST_TEST_DYN_LINK
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_runner.hpp"
#include "json_schema.hpp"

namespace {

using nlohmann::json;

const rxtest::SchemaValidator& schema() {
    static const rxtest::SchemaValidator v = [] {
        std::string path = rxtest::env_or_fail("RINGXFER_SCHEMA");
        std::ifstream in(path);
        BOOST_REQUIRE_MESSAGE(in, "cannot open " << path);
        return rxtest::SchemaValidator(json::parse(in));
    }();
    return v;
}

void require_valid(const json& doc) {
    auto errors = schema().validate(doc);
    for (auto& e : errors) BOOST_TEST_MESSAGE("schema: " << e);
    BOOST_TEST(errors.empty(), "result does not validate against the schema: "
                                   << (errors.empty() ? "" : errors.front()));
}

json run_json(const std::vector<std::string>& extra, rxtest::Run* run = nullptr) {
    std::string path = rxtest::scratch("modes.json");
    ::unlink(path.c_str());
    std::vector<std::string> args = {"bench", "--json", path, "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    rxtest::Run r = rxtest::run_cli(args, std::chrono::seconds(60));
    if (run) *run = r;
    BOOST_REQUIRE_MESSAGE(r.exit_code == 0, "exit " << r.exit_code << ": " << r.err);
    std::ifstream in(path);
    BOOST_REQUIRE_MESSAGE(in, "no JSON written");
    json j = json::parse(in);
    ::unlink(path.c_str());
    return j;
}

}  // namespace

BOOST_AUTO_TEST_CASE(small_lone_sends_are_copied_and_counted) {
    // 64-byte echo frames, one in flight: every data frame is a lone send of
    // 16 + 64 bytes, copied and sent with SEND; --inline-send 0 copies none.
    json on = run_json({"--mode", "echo", "--frame-size", "64", "--frames", "50", "--verify"});
    require_valid(on);
    BOOST_TEST(on["params"]["inline_send_bytes"] == 256);
    BOOST_TEST(on["results"]["errors"] == 0);
    BOOST_TEST(on["results"]["send_copied_bytes"].get<std::uint64_t>() >= 50u * 64u);
    json off = run_json({"--mode", "echo", "--frame-size", "64", "--frames", "50", "--verify",
                         "--inline-send", "0"});
    require_valid(off);
    BOOST_TEST(off["results"]["errors"] == 0);
    BOOST_TEST(off["results"]["send_copied_bytes"].get<std::uint64_t>() == 0u);
    // Frames above the limit are never copied: 256 KiB echoes copy only the
    // small control messages.
    json big = run_json({"--mode", "echo", "--frame-size", "256Ki", "--frames", "5"});
    BOOST_TEST(big["results"]["send_copied_bytes"].get<std::uint64_t>() < 4096u);
}

// The client sends views of one pattern per thread; only echo --verify,
// whose frames carry their sequence number, needs a buffer per frame in
// flight. 8 connections of 1 MiB echoes: 1 send buffer instead of 8.
BOOST_AUTO_TEST_CASE(echo_sends_share_one_pattern_unless_verifying) {
    std::vector<std::string> args = {"--mode", "echo", "--frame-size", "1Mi", "-P", "8",
                                     "--frames", "3"};
    json shared = run_json(args);
    args.push_back("--verify");
    json stamped = run_json(args);
    BOOST_TEST(shared["results"]["errors"] == 0);
    BOOST_TEST(stamped["results"]["errors"] == 0);
    auto a = shared["system"]["registered_bytes"].get<std::uint64_t>();
    auto b = stamped["system"]["registered_bytes"].get<std::uint64_t>();
    BOOST_TEST(a > 0u);
    // 7 more 1 MiB send buffers; regions hold several slabs, so some may sit
    // in room the receive buffers' regions had anyway: more, not exactly 7 MiB.
    BOOST_TEST(b > a + (2u << 20));
}

BOOST_AUTO_TEST_CASE(every_mode_over_tcp_unix_and_shm_validates) {
    for (std::string transport : {"tcp", "unix", "shm"}) {
        for (std::string mode : {"echo", "stream", "reverse", "bidir"}) {
            BOOST_TEST_CONTEXT(mode << " over " << transport) {
                json j = run_json({"--mode", mode, "--transport", transport, "--frame-size",
                                   "256Ki", "--frames", "20", "--window", "2", "--verify"});
                require_valid(j);
                const json& res = j["results"];
                BOOST_TEST(j["params"]["mode"] == mode);
                BOOST_TEST(j["params"]["transport"] == transport);
                BOOST_TEST(res["errors"] == 0);
                const std::uint64_t per_dir = 20 * 256 * 1024;
                const json& d = res["directions"];
                std::uint64_t c2s = d["client_to_server"]["bytes"], s2c = d["server_to_client"]["bytes"];
                if (mode == "stream") {
                    BOOST_TEST(c2s == per_dir);
                    BOOST_TEST(s2c == 0u);
                } else if (mode == "reverse") {
                    BOOST_TEST(c2s == 0u);
                    BOOST_TEST(s2c == per_dir);
                } else {
                    BOOST_TEST(c2s == per_dir);
                    BOOST_TEST(s2c == per_dir);
                }
                BOOST_TEST(res["throughput_mbps"].get<double>() > 0.0);
                // CPU of both sides, over the measured span: present and plausible.
                for (const char* side : {"client", "server"}) {
                    BOOST_REQUIRE(res["cpu"][side].is_object());
                    double cpu = res["cpu"][side]["user_s"].get<double>() +
                                 res["cpu"][side]["sys_s"].get<double>();
                    BOOST_TEST(cpu >= 0.0);
                    BOOST_TEST(cpu <= 1.0 + 4 * res["seconds"].get<double>() + 1.0);
                }
                BOOST_TEST(res["rss_peak_bytes"]["server"].get<std::uint64_t>() > 0u);
                if (mode == "echo") {
                    const json& l = res["latency_ns"];
                    BOOST_TEST(l["p50"] <= l["p90"]);
                    BOOST_TEST(l["p90"] <= l["p99"]);
                    BOOST_TEST(l["p99"] <= l["p999"]);
                    BOOST_TEST(l["p999"] <= l["max"]);
                    // A loopback round trip takes at least a microsecond.
                    BOOST_TEST(l["p50"].get<std::uint64_t>() >= 1000u);
                    // latency_us: the same values to the nearest microsecond.
                    for (const char* k : {"p50", "p90", "p99", "p999", "max"})
                        BOOST_TEST(res["latency_us"][k].get<std::uint64_t>() ==
                                   (l[k].get<std::uint64_t>() + 500) / 1000);
                } else {
                    BOOST_TEST(res["latency_us"].is_null());
                    BOOST_TEST(res["latency_ns"].is_null());
                }
            }
        }
    }
}

BOOST_AUTO_TEST_CASE(time_limited_run_has_one_interval_per_second) {
    json j = run_json({"--mode", "stream", "--frame-size", "64Ki", "--time", "2", "--interval",
                       "0.5", "--connections", "3", "--threads", "2", "--window", "4"});
    require_valid(j);
    BOOST_TEST(j["results"]["seconds"].get<double>() == 2.0, boost::test_tools::tolerance(1e-6));
    BOOST_REQUIRE(j["intervals"].size() == 4u);
    std::uint64_t sum = 0;
    double edge = 0;
    for (auto& iv : j["intervals"]) {
        BOOST_TEST(iv["start_s"].get<double>() == edge, boost::test_tools::tolerance(1e-6));
        edge = iv["end_s"].get<double>();
        sum += iv["bytes"].get<std::uint64_t>();
    }
    BOOST_TEST(edge == 2.0, boost::test_tools::tolerance(1e-6));
    BOOST_TEST(sum == j["results"]["bytes"].get<std::uint64_t>());
    BOOST_TEST(j["results"]["connections"].size() == 3u);
    std::uint64_t per_conn = 0;
    for (auto& c : j["results"]["connections"]) per_conn += c["bytes"].get<std::uint64_t>();
    BOOST_TEST(per_conn == j["results"]["bytes"].get<std::uint64_t>());
}

BOOST_AUTO_TEST_CASE(eight_hundred_connections_all_get_served) {
    // The self-started server once listened with a backlog of 16: beyond a
    // few hundred simultaneous connects the client waited on SYN retries
    // forever while the connected ones kept warming up.
    json j = run_json({"--mode", "echo", "--frame-size", "4Ki", "--frames", "2",
                       "--connections", "800", "--threads", "2", "--interval", "0"});
    require_valid(j);
    BOOST_TEST(j["results"]["errors"].get<std::uint64_t>() == 0u);
    BOOST_REQUIRE(j["results"]["connections"].size() == 800u);
    for (auto& c : j["results"]["connections"]) BOOST_TEST(c["frames"].get<std::uint64_t>() == 2u);
}

BOOST_AUTO_TEST_CASE(json_stream_parses_line_by_line) {
    rxtest::Run r = rxtest::run_cli({"bench", "--mode", "echo", "--frame-size", "4Ki", "--time",
                                     "1", "--interval", "0.25", "--json-stream", "--window", "4"},
                                    std::chrono::seconds(60));
    BOOST_REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    std::istringstream lines(r.out);
    std::string line;
    std::vector<std::string> events;
    json end;
    while (std::getline(lines, line)) {
        json e = json::parse(line);  // throws, failing the test, on a bad line
        events.push_back(e["event"]);
        if (e["event"] == "end") end = e["result"];
    }
    BOOST_REQUIRE(events.size() == 6u);  // start, 4 intervals, end
    BOOST_TEST(events.front() == "start");
    BOOST_TEST(events.back() == "end");
    for (std::size_t i = 1; i + 1 < events.size(); ++i) BOOST_TEST(events[i] == "interval");
    require_valid(end);
    BOOST_TEST(r.err.find("MB/s") != std::string::npos);  // human report stays on stderr
}
