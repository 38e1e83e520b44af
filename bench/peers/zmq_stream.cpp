// zmq_stream — ZeroMQ PUSH/PULL one-way throughput, the message-queue peer.
//
// What it is: the way libzmq is normally used to move a stream of messages
// from one process to another. The bench process forks a PUSH sender and
// PULLs from it; each ZeroMQ message is one frame's payload (ZeroMQ brings
// its own framing, so there is no ringxfer header). Over TCP loopback or,
// with --transport unix, ZeroMQ's ipc:// transport (a Unix stream socket).
//
// Why it is fair:
//   * the sender hands libzmq its payload without a copy (zmq_msg_init_data
//     over one constant buffer with no free function), the receiver takes
//     each message as libzmq delivers it (zmq_msg_recv, no copy out);
//   * high-water marks stay at libzmq's default (1000 messages) unless that
//     would queue more than 64 MiB per side, so 100 MB messages do not queue
//     gigabytes (the receiver's memory stays bounded, as every peer's does);
//   * the clock runs on the receiver, from the moment the warmup messages
//     were received (the sender is then released through a pipe, so nothing
//     is queued in advance) to the receipt of the last measured message.
//
// Usage:
//   zmq_stream bench --frame-size SIZE --frames N [--warmup-frames W]
//              [--transport tcp|unix] [--json FILE]
// Throughput = N * frame_size / seconds, in MB/s (1 MB = 10^6 bytes).

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "wire.hpp"

namespace {

using namespace ringxfer::bench::wire;

constexpr int kRecvTimeoutMs = 30'000;           // a dead sender ends the run, not hangs it
constexpr std::uint64_t kQueueBytes = 64 << 20;  // high-water mark cap per side

[[noreturn]] void fail_zmq(const std::string& what) { fail(what, zmq_strerror(zmq_errno())); }

struct Opts {
    std::string transport = "tcp";
    std::uint64_t frame_size = 0, frames = 0, warmup = 1;
    std::string json_path;
};

// Writes all of s to fd, or fails.
void write_all(int fd, const std::string& s) {
    for (std::size_t off = 0; off < s.size();) {
        const ssize_t w = ::write(fd, s.data() + off, s.size() - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) fail_errno("write pipe");
        off += static_cast<std::size_t>(w);
    }
}

// Reads up to and excluding '\n'.
std::string read_line(int fd) {
    std::string s;
    for (char c;;) {
        const ssize_t r = ::read(fd, &c, 1);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) fail("read pipe", r == 0 ? "closed" : std::strerror(errno));
        if (c == '\n') return s;
        s += c;
    }
}

nlohmann::ordered_json json_or_null(std::optional<double> v) {
    return v ? nlohmann::ordered_json(*v) : nlohmann::ordered_json(nullptr);
}

int hwm_for(std::uint64_t frame_size) {
    return static_cast<int>(std::clamp<std::uint64_t>(kQueueBytes / frame_size, 2, 1000));
}

// The forked sender: connects a PUSH socket to the endpoint read from
// `endpoint_fd`, sends the warmup messages, waits for "go" on `go_fd`, sends
// the measured ones, and exits once libzmq has flushed them (linger -1).
[[noreturn]] void run_sender(const Opts& o, int endpoint_fd, int go_fd) {
    int rc = 0;
    try {
        const std::string endpoint = read_line(endpoint_fd);
        void* ctx = zmq_ctx_new();
        void* push = zmq_socket(ctx, ZMQ_PUSH);
        if (!push) fail_zmq("zmq_socket PUSH");
        const int hwm = hwm_for(o.frame_size);
        zmq_setsockopt(push, ZMQ_SNDHWM, &hwm, sizeof hwm);
        if (zmq_connect(push, endpoint.c_str()) != 0) fail_zmq("zmq_connect " + endpoint);
        std::vector<std::uint8_t> payload(o.frame_size);
        fill_pattern(payload.data(), payload.size());
        auto send_one = [&] {
            zmq_msg_t m;
            // No free function: the buffer outlives the socket (closed below,
            // after libzmq let go of every message), and it is never written
            // again, so all queued messages may share it.
            if (zmq_msg_init_data(&m, payload.data(), payload.size(), nullptr, nullptr) != 0)
                fail_zmq("zmq_msg_init_data");
            if (zmq_msg_send(&m, push, 0) < 0) fail_zmq("zmq_msg_send");
        };
        for (std::uint64_t i = 0; i < o.warmup; ++i) send_one();
        if (read_line(go_fd) != "go") fail("sender", "bad start signal");
        for (std::uint64_t i = 0; i < o.frames; ++i) send_one();
        zmq_close(push);
        zmq_ctx_term(ctx);  // blocks until every message left (default linger: forever)
    } catch (const std::exception& e) {
        std::fprintf(stderr, "zmq_stream: sender: %s\n", e.what());
        rc = 1;
    }
    std::fflush(nullptr);
    ::_exit(rc);
}

Child g_child;  // the forked sender: killed, its socket dir removed, if the run fails

int run_bench(const Opts& o) {
    int endpoint_pipe[2], go_pipe[2];
    if (::pipe2(endpoint_pipe, O_CLOEXEC) < 0 || ::pipe2(go_pipe, O_CLOEXEC) < 0)
        fail_errno("pipe");
    // Fork before any libzmq state exists: a context must not cross fork().
    std::fflush(nullptr);
    g_child.pid = ::fork();
    if (g_child.pid < 0) fail_errno("fork");
    if (g_child.pid == 0) {
        ::close(endpoint_pipe[1]);
        ::close(go_pipe[1]);
        run_sender(o, endpoint_pipe[0], go_pipe[0]);
    }
    ::close(endpoint_pipe[0]);
    ::close(go_pipe[0]);
    Fd endpoint_w(endpoint_pipe[1]), go_w(go_pipe[1]);

    std::string endpoint = "tcp://127.0.0.1:*";
    if (o.transport == "unix") {
        endpoint = "ipc://" + g_child.make_socket_dir("zmq_stream");
    }
    void* ctx = zmq_ctx_new();
    void* pull = zmq_socket(ctx, ZMQ_PULL);
    if (!pull) fail_zmq("zmq_socket PULL");
    const int hwm = hwm_for(o.frame_size), timeout = kRecvTimeoutMs;
    zmq_setsockopt(pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(pull, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    if (zmq_bind(pull, endpoint.c_str()) != 0) fail_zmq("zmq_bind " + endpoint);
    char bound[256];
    std::size_t bound_len = sizeof bound;
    if (zmq_getsockopt(pull, ZMQ_LAST_ENDPOINT, bound, &bound_len) != 0)
        fail_zmq("zmq_getsockopt LAST_ENDPOINT");
    write_all(endpoint_w.fd, std::string(bound) + "\n");

    zmq_msg_t m;
    zmq_msg_init(&m);
    auto recv_one = [&] {
        if (zmq_msg_recv(&m, pull, 0) < 0) {
            if (zmq_errno() == EAGAIN)
                fail("zmq_msg_recv", "no message within 30 s (sender died?)");
            fail_zmq("zmq_msg_recv");
        }
        if (zmq_msg_size(&m) != o.frame_size) fail("zmq_msg_recv", "message size mismatch");
    };
    for (std::uint64_t i = 0; i < o.warmup; ++i) recv_one();
    // CPU over the measured span, both processes (and libzmq's I/O threads).
    const auto cpu0_recv = process_cpu_s(), cpu0_send = child_cpu_s(g_child.pid);
    const auto t0 = std::chrono::steady_clock::now();
    write_all(go_w.fd, "go\n");
    for (std::uint64_t i = 0; i < o.frames; ++i) recv_one();
    const auto t1 = std::chrono::steady_clock::now();
    const auto cpu_recv = cpu_delta(cpu0_recv, process_cpu_s());
    // The sender may still be flushing its last messages; it has produced
    // everything the receiver got, so read its clock now, before it exits.
    const auto cpu_send = cpu_delta(cpu0_send, child_cpu_s(g_child.pid));
    zmq_msg_close(&m);
    zmq_close(pull);
    zmq_ctx_term(ctx);

    const std::uint64_t rss_sender = g_child.reap("sender").value_or(0);
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    g_child.cleanup();

    const double secs = std::chrono::duration<double>(t1 - t0).count();
    const std::uint64_t bytes = o.frames * o.frame_size;
    const double mbps = secs > 0 ? static_cast<double>(bytes) / secs / 1e6 : 0.0;
    std::printf("zmq_stream: stream %llu frames x %llu B in %.3f s = %.1f MB/s\n",
                static_cast<unsigned long long>(o.frames),
                static_cast<unsigned long long>(o.frame_size), secs, mbps);
    if (!o.json_path.empty()) {
        int major = 0, minor = 0, patch = 0;
        zmq_version(&major, &minor, &patch);
        nlohmann::ordered_json j = {
            {"schema_version", 1},
            {"tool",
             {{"name", "zmq_stream"},
              {"libzmq_version",
               std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch)}}},
            {"params",
             {{"mode", "stream"},
              {"frame_bytes", o.frame_size},
              {"frames", o.frames},
              {"transport", o.transport},
              {"warmup_frames", o.warmup},
              {"hwm_messages", hwm}}},
            {"results",
             {{"frames", o.frames},
              {"bytes", bytes},
              {"seconds", secs},
              {"throughput_mbps", mbps},
              {"errors", 0},
              {"rss_peak_bytes",
               {{"client", rss_sender},
                {"server", static_cast<std::uint64_t>(ru.ru_maxrss) * 1024}}},
              {"cpu",
               {{"client", {{"total_s", json_or_null(cpu_send)}}},
                {"server", {{"total_s", json_or_null(cpu_recv)}}}}}}}};
        std::ofstream f(o.json_path);
        f << j.dump(2) << '\n';
        f.close();
        if (!f) fail_errno("write " + o.json_path);
    }
    return 0;
}

[[noreturn]] void usage() {
    std::fputs(
        "usage: zmq_stream bench --frame-size SIZE --frames N [--warmup-frames W]\n"
        "                  [--transport tcp|unix] [--json FILE]\n",
        stderr);
    std::exit(2);
}

int run(int argc, char** argv) {
    if (argc < 2 || std::string(argv[1]) != "bench") usage();
    Opts o;
    bool have_size = false, have_frames = false;
    for (int i = 2; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) fail("option " + a, "missing value");
            return argv[++i];
        };
        if (a == "--frame-size") {
            o.frame_size = parse_size(value());
            have_size = true;
        } else if (a == "--frames") {
            o.frames = parse_size(value());
            have_frames = true;
        } else if (a == "--warmup-frames")
            o.warmup = parse_size(value());
        else if (a == "--json")
            o.json_path = value();
        else if (a == "--mode") {
            if (value() != "stream") fail("--mode", "zmq_stream measures stream mode only");
        } else if (a == "--transport") {
            o.transport = value();
            if (o.transport != "tcp" && o.transport != "unix")
                fail("--transport " + o.transport, "expected tcp or unix");
        } else
            fail("bad argument '" + a + "'", "see usage");
    }
    if (!have_size || !have_frames) fail("bench", "--frame-size and --frames are required");
    if (o.frames == 0 || o.frame_size == 0)
        fail("bench", "--frames and --frame-size must be at least 1");
    if (o.warmup == 0) fail("bench", "--warmup-frames must be at least 1 (it starts the clock)");
    return run_bench(o);
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const Error& e) {
        std::fprintf(stderr, "zmq_stream: %s\n", e.what());
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "zmq_stream: allocate buffers: %s\n", std::strerror(ENOMEM));
    }
    g_child.cleanup();
    return 1;
}
