// recv_modes: how should a receiver take a stream of small frames off a TCP
// socket with io_uring? One sender process writes 16-byte-header frames in
// 1 MiB writes over loopback for --time seconds; the receiver parses every
// frame (header walk, frames cut by a buffer edge carried over by copy)
// with one of:
//   recv       single-shot RECV into a 64 KiB buffer, resubmitted per CQE
//              (what ringxfer's FrameReader does with its staging buffer)
//   multishot  one multishot RECV over a provided-buffer ring of 64 KiB
//              buffers, each returned to the ring once parsed
//   bundle     the same with IORING_RECVSEND_BUNDLE (one CQE may cover
//              several ring buffers), where the kernel has it
// It prints received MB/s, the receiver's CPU-seconds per GB, CQEs per MB.
// Issue #6's lever "multishot recv with a provided buffer ring, and
// bundles", measured as a mechanism (docs/performance.md).
//
//   recv_modes --mode recv|multishot|bundle [--frame-size 4096] [--time 2]
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ringxfer/engine/compat.hpp"

namespace {

[[noreturn]] void die(const char* what, int err) {
    std::fprintf(stderr, "recv_modes: %s: %s\n", what, std::strerror(err));
    std::exit(1);
}

constexpr std::size_t kHeader = 16;
constexpr std::size_t kBuf = 64 * 1024;
constexpr unsigned kRingBufs = 64;

double cpu_seconds() {
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// Frame parser over arbitrary chunks: frames cut by a chunk edge are carried
// (copied) into `carry` until complete, as a receiver that hands out whole
// frames must.
struct Parser {
    std::size_t frame;
    std::vector<std::byte> carry;
    std::uint64_t frames = 0, bytes = 0, sum = 0;
    void feed(const std::byte* p, std::size_t n) {
        bytes += n;
        if (!carry.empty()) {
            std::size_t want = kHeader + frame - carry.size();
            std::size_t take = std::min(want, n);
            carry.insert(carry.end(), p, p + take);
            p += take;
            n -= take;
            if (carry.size() < kHeader + frame) return;
            consume(carry.data());
            carry.clear();
        }
        while (n >= kHeader + frame) {
            consume(p);
            p += kHeader + frame;
            n -= kHeader + frame;
        }
        if (n) carry.assign(p, p + n);
    }
    void consume(const std::byte* f) {
        std::uint64_t len;
        std::memcpy(&len, f, sizeof len);
        if (len != frame) {
            std::fprintf(stderr, "recv_modes: bad frame length %llu\n", (unsigned long long)len);
            std::exit(1);
        }
        sum += static_cast<unsigned char>(f[kHeader]);  // touch the payload
        ++frames;
    }
};

void sender(int fd, std::size_t frame, double seconds) {
    std::size_t per = kHeader + frame;
    std::size_t n = std::max<std::size_t>(1, (1 << 20) / per);
    std::vector<std::byte> buf(n * per, std::byte{7});
    for (std::size_t i = 0; i < n; ++i) {
        std::uint64_t len = frame;
        std::memcpy(buf.data() + i * per, &len, sizeof len);
    }
    auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {
        std::size_t off = 0;
        while (off < buf.size()) {
            ssize_t w = ::send(fd, buf.data() + off, buf.size() - off, MSG_NOSIGNAL);
            if (w <= 0) std::exit(0);
            off += static_cast<std::size_t>(w);
        }
    }
    ::close(fd);
    std::exit(0);
}

}  // namespace

int main(int argc, char** argv) {
    std::string mode = "recv";
    std::size_t frame = 4096;
    double seconds = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--mode") mode = argv[i + 1];
        else if (a == "--frame-size") frame = std::strtoull(argv[i + 1], nullptr, 10);
        else if (a == "--time") seconds = std::strtod(argv[i + 1], nullptr);
        else {
            std::fprintf(stderr, "usage: recv_modes --mode recv|multishot|bundle [--frame-size N] [--time S]\n");
            return 2;
        }
    }
    if (mode != "recv" && mode != "multishot" && mode != "bundle") {
        std::fprintf(stderr, "recv_modes: --mode %s: expected recv, multishot or bundle\n", mode.c_str());
        return 2;
    }
    int l = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t slen = sizeof sa;
    if (::bind(l, reinterpret_cast<sockaddr*>(&sa), sizeof sa) || ::listen(l, 1) ||
        ::getsockname(l, reinterpret_cast<sockaddr*>(&sa), &slen))
        die("listen", errno);
    pid_t pid = ::fork();
    if (pid == 0) {
        int c = ::socket(AF_INET, SOCK_STREAM, 0);
        if (::connect(c, reinterpret_cast<sockaddr*>(&sa), sizeof sa)) die("connect", errno);
        int one = 1;
        ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        sender(c, frame, seconds);
    }
    int fd = ::accept(l, nullptr, nullptr);
    if (fd < 0) die("accept", errno);

    io_uring ring;
    io_uring_params p{};
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (int r = io_uring_queue_init_params(256, &ring, &p); r < 0) die("io_uring_queue_init", -r);
    if (mode == "bundle" && !(p.features & IORING_FEAT_RECVSEND_BUNDLE)) {
        std::printf("recv_modes: bundle: this kernel has no IORING_FEAT_RECVSEND_BUNDLE\n");
        return 3;
    }
    Parser parser{frame, {}, 0, 0, 0};
    std::uint64_t cqes = 0;
    double cpu0 = cpu_seconds();
    auto t0 = std::chrono::steady_clock::now();
    bool eof = false;

    if (mode == "recv") {
        std::vector<std::byte> buf(kBuf);
        while (!eof) {
            io_uring_sqe* sqe = io_uring_get_sqe(&ring);
            io_uring_prep_recv(sqe, fd, buf.data(), kBuf, 0);
            io_uring_cqe* cqe;
            if (int r = io_uring_submit_and_wait(&ring, 1); r < 0) die("submit", -r);
            if (int r = io_uring_wait_cqe(&ring, &cqe); r < 0) die("wait", -r);
            int res = cqe->res;
            io_uring_cqe_seen(&ring, cqe);
            ++cqes;
            if (res < 0) die("recv", -res);
            if (res == 0) eof = true;
            else parser.feed(buf.data(), static_cast<std::size_t>(res));
        }
    } else {
        int ret = 0;
        io_uring_buf_reg reg{};
        std::size_t ring_bytes = sizeof(io_uring_buf) * kRingBufs;
        void* mem = ::mmap(nullptr, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        auto* br = static_cast<io_uring_buf_ring*>(mem);
        reg.ring_addr = reinterpret_cast<unsigned long>(br);
        reg.ring_entries = kRingBufs;
        reg.bgid = 1;
        if ((ret = io_uring_register_buf_ring(&ring, &reg, 0)) < 0) die("register_buf_ring", -ret);
        io_uring_buf_ring_init(br);
        std::vector<std::byte> bufs(kBuf * kRingBufs);
        int mask = io_uring_buf_ring_mask(kRingBufs);
        for (unsigned b = 0; b < kRingBufs; ++b)
            io_uring_buf_ring_add(br, bufs.data() + b * kBuf, kBuf, b, mask, b);
        io_uring_buf_ring_advance(br, kRingBufs);
        auto arm = [&] {
            io_uring_sqe* sqe = io_uring_get_sqe(&ring);
            io_uring_prep_recv_multishot(sqe, fd, nullptr, 0, 0);
            sqe->flags |= IOSQE_BUFFER_SELECT;
            sqe->buf_group = 1;
            if (mode == "bundle") sqe->ioprio |= IORING_RECVSEND_BUNDLE;
        };
        arm();
        while (!eof) {
            if (int r = io_uring_submit_and_wait(&ring, 1); r < 0) die("submit", -r);
            io_uring_cqe* cqe;
            unsigned head, seen = 0;
            io_uring_for_each_cqe(&ring, head, cqe) {
                ++seen;
                int res = cqe->res;
                if (res == -ENOBUFS) { arm(); continue; }
                if (res < 0) die("recv multishot", -res);
                if (res == 0) { eof = true; continue; }
                unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
                std::size_t left = static_cast<std::size_t>(res);
                unsigned used = 0;
                while (left > 0) {  // a bundle spans consecutive ring buffers
                    unsigned b = (bid + used) % kRingBufs;
                    std::size_t n = std::min(left, kBuf);
                    parser.feed(bufs.data() + b * kBuf, n);
                    left -= n;
                    io_uring_buf_ring_add(br, bufs.data() + b * kBuf, kBuf, b, mask, used);
                    ++used;
                }
                io_uring_buf_ring_advance(br, used);
                if (!(cqe->flags & IORING_CQE_F_MORE) && !eof) arm();
            }
            io_uring_cq_advance(&ring, seen);
            cqes += seen;
        }
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double cpu = cpu_seconds() - cpu0;
    int st = 0;
    ::waitpid(pid, &st, 0);
    std::printf("recv_modes %s frame %zu: %.1f MB/s, receiver %.3f CPU-s/GB, %.2f CQEs/MB, %llu frames\n",
                mode.c_str(), frame, parser.bytes / s / 1e6, cpu / (parser.bytes / 1e9),
                cqes / (parser.bytes / 1e6), (unsigned long long)parser.frames);
    return 0;
}
