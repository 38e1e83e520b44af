// lat_modes: how fast can a 64-byte ping-pong go through io_uring on this
// machine, and which receive/wait style gets there? Issue #6 row 4 compares
// ringxfer with sockperf; this strips both down to the mechanism so the
// floor of each path is measured, not guessed. A client process and an echo
// server process (forked) exchange --size-byte messages over TCP loopback
// (TCP_NODELAY), one in flight, for --time seconds; the client prints the
// half round trip's p50/p99/p99.9 in microseconds.
//
//   --mode syscall     recv()/send() on the socket (sockperf's path)
//   --mode oneshot     io_uring: a single-shot RECV per message, the echo's
//                      SEND and the next RECV submitted together
//   --mode pollfirst   oneshot with IORING_RECVSEND_POLL_FIRST on every RECV
//   --mode multishot   io_uring: one multishot RECV over a provided-buffer
//                      ring, SEND per message
//   --mode dontwait    oneshot with MSG_DONTWAIT: a RECV that finds nothing
//                      completes with -EAGAIN instead of arming a poll, and
//                      is submitted again (a spinning recv through the ring)
//   --wait spin|sleep  spin: poll for completions without sleeping
//                      (recv with MSG_DONTWAIT, or io_uring_enter(GETEVENTS)
//                      without min_complete); sleep: block in recv() or in
//                      io_uring_enter(min_complete=1)
//   --setup defer|coop|none   ring flags: SINGLE_ISSUER|DEFER_TASKRUN,
//                      COOP_TASKRUN|TASKRUN_FLAG, or none
//   --send-syscall     io_uring modes: send with send(2), receive through the ring
//   --sendmsg          io_uring modes: SENDMSG of a 16-byte prefix and the rest
//                      (the shape of ringxfer's header + payload send)
//   --wait-timeout     sleeping io_uring waits carry a 200 ms timeout (EXT_ARG)
//   --peek             with --setup none/coop and --wait spin: spin on the CQ
//                      in memory, entering the kernel only to submit
//
//   --log FILE         every round trip as CSV (end_ns on CLOCK_MONOTONIC,
//                      rtt_ns, connection), the format of `ringxfer bench
//                      --latency-log`, for bench/latency_tail
//
//   lat_modes --mode oneshot --wait spin [--setup defer] [--time 3]
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ringxfer/engine/compat.hpp"

namespace {

[[noreturn]] void die(const char* what, int err) {
    std::fprintf(stderr, "lat_modes: %s: %s\n", what, std::strerror(err));
    std::exit(1);
}

enum class Mode { syscall, oneshot, pollfirst, multishot, dontwait };

struct Options {
    std::string mode = "oneshot", wait = "spin", setup = "defer";
    // Parsed once: the per-message paths test these, not the strings.
    Mode m = Mode::oneshot;
    bool spin = true;
    bool peek = false;
    bool send_syscall = false;  // io_uring modes: send with send(2) instead of a SEND SQE
    bool sendmsg = false;       // io_uring modes: SENDMSG of a 16-byte prefix + the rest (ringxfer's shape)
    bool wait_timeout = false;  // sleeping io_uring waits carry a 200 ms timeout (ringxfer's run_until slice)
    std::size_t size = 64;
    double time = 3;
    std::string log;  // --log FILE: every round trip, as `ringxfer bench --latency-log` writes them
};

using Clock = std::chrono::steady_clock;

// One side of the exchange: receive exactly `size` bytes, then (client) time
// it or (server) send them back.
class Side {
public:
    Side(int fd, const Options& o) : fd_(fd), o_(o), buf_(o.size) {
        if (o.m == Mode::syscall) return;
        io_uring_params p{};
        if (o.setup == "defer") p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
        if (o.setup == "coop") p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
        p.flags |= IORING_SETUP_SUBMIT_ALL;
        if (int ret = io_uring_queue_init_params(64, &ring_, &p); ret < 0) die("io_uring_queue_init", -ret);
        if (o.m == Mode::multishot) {
            std::size_t bytes = kBufs * sizeof(io_uring_buf);
            void* mem = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (mem == MAP_FAILED) die("mmap", errno);
            br_ = static_cast<io_uring_buf_ring*>(mem);
            io_uring_buf_reg reg{};
            reg.ring_addr = reinterpret_cast<std::uintptr_t>(mem);
            reg.ring_entries = kBufs;
            reg.bgid = 0;
            if (int ret = io_uring_register_buf_ring(&ring_, &reg, 0); ret < 0) die("register_buf_ring", -ret);
            io_uring_buf_ring_init(br_);
            pool_.resize(kBufs * kBufSize);
            for (unsigned i = 0; i < kBufs; ++i)
                io_uring_buf_ring_add(br_, pool_.data() + i * kBufSize, kBufSize, i,
                                      io_uring_buf_ring_mask(kBufs), i);
            io_uring_buf_ring_advance(br_, kBufs);
            arm_multishot();
            submit();
        }
    }

    // Sends `n` bytes from buf_ (and, for oneshot modes, queues the next recv
    // in the same submission).
    void send_and_rearm() {
        if (o_.m == Mode::syscall || o_.send_syscall) {
            if (o_.m != Mode::syscall && o_.m != Mode::multishot) {
                queue_recv();
                submit();
            }
            if (::send(fd_, buf_.data(), o_.size, 0) != static_cast<ssize_t>(o_.size)) die("send", errno);
            return;
        }
        io_uring_sqe* s = io_uring_get_sqe(&ring_);
        if (o_.sendmsg) {
            std::size_t head = std::min<std::size_t>(16, o_.size);
            iov_[0] = {buf_.data(), head};
            iov_[1] = {buf_.data() + head, o_.size - head};
            msg_ = {};
            msg_.msg_iov = iov_;
            msg_.msg_iovlen = o_.size > head ? 2 : 1;
            io_uring_prep_sendmsg(s, fd_, &msg_, 0);
        } else {
            io_uring_prep_send(s, fd_, buf_.data(), o_.size, 0);
        }
        io_uring_sqe_set_data64(s, kSend);
        if (o_.m != Mode::multishot) queue_recv();
        submit();
    }

    // Waits until `size` bytes arrived in buf_.
    void recv_message() {
        std::size_t got = 0;
        if (o_.m == Mode::syscall) {
            int flags = o_.spin ? MSG_DONTWAIT : 0;
            while (got < o_.size) {
                ssize_t n = ::recv(fd_, buf_.data() + got, o_.size - got, flags);
                if (n > 0) got += n;
                else if (n == 0 || (n < 0 && errno == ECONNRESET)) std::exit(0);
                else if (errno != EAGAIN && errno != EINTR) die("recv", errno);
            }
            return;
        }
        while (got < o_.size) {
            io_uring_cqe* cqe = next_cqe();
            std::uint64_t tag = cqe->user_data;
            int res = cqe->res;
            unsigned flags = cqe->flags;
            if (tag == kSend) {
                if (res < 0) die("send cqe", -res);
            } else if (tag == kRecv) {
                if (res == 0) std::exit(0);
                if (res == -EAGAIN && o_.m == Mode::dontwait) {
                    queue_recv(got);
                    submit();
                    io_uring_cqe_seen(&ring_, cqe);
                    continue;
                }
                if (res < 0 && res != -ENOBUFS) die("recv cqe", -res);
                if (o_.m == Mode::multishot) {
                    if (res > 0) {
                        unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
                        std::memcpy(buf_.data() + got, pool_.data() + bid * kBufSize, res);
                        io_uring_buf_ring_add(br_, pool_.data() + bid * kBufSize, kBufSize, bid,
                                              io_uring_buf_ring_mask(kBufs), 0);
                        io_uring_buf_ring_advance(br_, 1);
                        got += res;
                    }
                    if (!(flags & IORING_CQE_F_MORE)) {
                        arm_multishot();
                        submit();
                    }
                } else {
                    got += res;
                    if (got < o_.size) {
                        queue_recv(got);
                        submit();
                    }
                }
            }
            io_uring_cqe_seen(&ring_, cqe);
        }
    }

    // Client only: the very first recv, before the first send.
    void prime() {
        if (o_.m != Mode::multishot && o_.m != Mode::syscall) {
            queue_recv();
            submit();
        }
    }

    std::vector<char>& buf() { return buf_; }

private:
    static constexpr std::uint64_t kSend = 1, kRecv = 2;
    static constexpr unsigned kBufs = 64;
    static constexpr std::size_t kBufSize = 4096;

    void queue_recv(std::size_t offset = 0) {
        io_uring_sqe* s = io_uring_get_sqe(&ring_);
        io_uring_prep_recv(s, fd_, buf_.data() + offset, o_.size - offset,
                           o_.m == Mode::dontwait ? MSG_DONTWAIT : 0);
        if (o_.m == Mode::pollfirst) s->ioprio |= IORING_RECVSEND_POLL_FIRST;
        io_uring_sqe_set_data64(s, kRecv);
    }
    void arm_multishot() {
        io_uring_sqe* s = io_uring_get_sqe(&ring_);
        io_uring_prep_recv_multishot(s, fd_, nullptr, 0, 0);
        s->flags |= IOSQE_BUFFER_SELECT;
        s->buf_group = 0;
        io_uring_sqe_set_data64(s, kRecv);
    }
    void submit() {
        int ret = io_uring_submit(&ring_);
        if (ret < 0) die("io_uring_submit", -ret);
    }
    io_uring_cqe* next_cqe() {
        io_uring_cqe* cqe = nullptr;
        if (!o_.spin) {
            int ret;
            __kernel_timespec ts{0, 200'000'000};
            do ret = o_.wait_timeout ? io_uring_wait_cqe_timeout(&ring_, &cqe, &ts)
                                     : io_uring_wait_cqe(&ring_, &cqe);
            while (ret == -EINTR || ret == -ETIME);
            if (ret < 0) die("io_uring_wait_cqe", -ret);
            return cqe;
        }
        for (;;) {
            if (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe) return cqe;
            if (!o_.peek) {
                int ret = io_uring_submit_and_get_events(&ring_);
                if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) die("get_events", -ret);
            }
        }
    }

    int fd_;
    const Options& o_;
    std::vector<char> buf_;
    io_uring ring_{};
    io_uring_buf_ring* br_ = nullptr;
    iovec iov_[2]{};
    msghdr msg_{};
    std::vector<char> pool_;
};

int listen_loopback(std::uint16_t* port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket", errno);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) die("bind", errno);
    if (::listen(fd, 1) < 0) die("listen", errno);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    *port = ntohs(a.sin_port);
    return fd;
}

void nodelay(int fd) {
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) die(a.c_str(), EINVAL);
            return argv[++i];
        };
        if (a == "--mode") o.mode = val();
        else if (a == "--wait") o.wait = val();
        else if (a == "--setup") o.setup = val();
        else if (a == "--peek") o.peek = true;
        else if (a == "--send-syscall") o.send_syscall = true;
        else if (a == "--sendmsg") o.sendmsg = true;
        else if (a == "--wait-timeout") o.wait_timeout = true;
        else if (a == "--size") o.size = std::stoul(val());
        else if (a == "--time") o.time = std::stod(val());
        else if (a == "--log") o.log = val();
        else {
            std::fprintf(stderr,
                         "usage: lat_modes [--mode syscall|oneshot|pollfirst|multishot|dontwait] [--wait spin|sleep]\n"
                         "                 [--setup defer|coop|none] [--peek] [--send-syscall] [--sendmsg]\n"
                         "                 [--wait-timeout] [--size 64] [--time 3] [--log FILE]\n");
            return 2;
        }
    }
    const std::pair<const char*, Mode> modes[] = {{"syscall", Mode::syscall},
                                                  {"oneshot", Mode::oneshot},
                                                  {"pollfirst", Mode::pollfirst},
                                                  {"multishot", Mode::multishot},
                                                  {"dontwait", Mode::dontwait}};
    auto known = std::find_if(std::begin(modes), std::end(modes),
                              [&](const auto& m) { return o.mode == m.first; });
    if (known == std::end(modes) || (o.wait != "spin" && o.wait != "sleep") ||
        (o.setup != "defer" && o.setup != "coop" && o.setup != "none")) {
        std::fprintf(stderr, "lat_modes: --mode %s --wait %s --setup %s: expected --mode "
                             "syscall|oneshot|pollfirst|multishot|dontwait, --wait spin|sleep, "
                             "--setup defer|coop|none\n",
                     o.mode.c_str(), o.wait.c_str(), o.setup.c_str());
        return 2;
    }
    o.m = known->second;
    o.spin = o.wait == "spin";
    if (o.peek && o.setup == "defer") {
        std::fprintf(stderr, "lat_modes: --peek needs --setup none or coop (DEFER_TASKRUN runs task work only on enter)\n");
        return 2;
    }
    std::uint16_t port = 0;
    int lfd = listen_loopback(&port);
    pid_t child = ::fork();
    if (child < 0) die("fork", errno);
    if (child == 0) {
        int fd = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) die("accept", errno);
        nodelay(fd);
        Side s(fd, o);
        s.prime();
        for (;;) {
            s.recv_message();
            s.send_and_rearm();
        }
    }
    ::close(lfd);
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) die("connect", errno);
    nodelay(fd);
    Side s(fd, o);
    std::vector<std::uint32_t> ns;
    std::vector<std::int64_t> ends;  // only with --log
    ns.reserve(4'000'000);
    if (!o.log.empty()) ends.reserve(4'000'000);
    auto warm_end = Clock::now() + std::chrono::milliseconds(300);
    auto end = warm_end + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.time));
    for (;;) {
        auto t0 = Clock::now();
        if (t0 >= end) break;
        s.send_and_rearm();
        s.recv_message();
        auto t1 = Clock::now();
        if (t0 >= warm_end) {
            ns.push_back(static_cast<std::uint32_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count()));
            if (!o.log.empty())
                ends.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1.time_since_epoch()).count());
        }
    }
    ::shutdown(fd, SHUT_RDWR);
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    if (!o.log.empty()) {
        FILE* f = std::fopen(o.log.c_str(), "w");
        if (!f) die(o.log.c_str(), errno);
        std::fprintf(f, "end_ns,rtt_ns,connection\n");
        for (std::size_t i = 0; i < ns.size(); ++i)
            std::fprintf(f, "%lld,%u,0\n", static_cast<long long>(ends[i]), ns[i]);
        if (std::fclose(f) != 0) die(o.log.c_str(), errno);
    }
    std::sort(ns.begin(), ns.end());
    auto pct = [&](double p) { return ns.empty() ? 0.0 : ns[std::min(ns.size() - 1, static_cast<std::size_t>(p * ns.size()))] / 2000.0; };
    std::printf("mode=%s wait=%s setup=%s%s n=%zu half_rtt_us p50=%.2f p99=%.2f p999=%.2f\n", o.mode.c_str(),
                o.wait.c_str(), o.setup.c_str(), o.peek ? " peek" : "", ns.size(), pct(0.5), pct(0.99), pct(0.999));
}
