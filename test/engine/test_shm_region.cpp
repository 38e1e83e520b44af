// engine::ShmRegion and the SCM_RIGHTS helpers: a region is sealed so that
// neither side can hurt the other (no shrink under a mapping, no writable
// mapping for anyone but its maker), crosses to another process over a Unix
// socket, and is refused by the receiver when its size or seals are wrong.
#define BOOST_TEST_MODULE engine_shm_region
#ifndef BOOST_TEST_DYN_LINK  // meson's boost dependency may define it already
#define BOOST_TEST_DYN_LINK
#endif
#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "ringxfer/engine/shm_region.hpp"

using ringxfer::engine::Fd;
using ringxfer::engine::recv_with_fds;
using ringxfer::engine::send_with_fds;
using ringxfer::engine::ShmRegion;

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif

namespace {

struct SocketPair {
    SocketPair() {
        int sv[2];
        BOOST_REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        a = Fd(sv[0]);
        b = Fd(sv[1]);
    }
    Fd a, b;
};

void fill(ShmRegion& r, unsigned seed) {
    for (std::size_t i = 0; i < r.size(); i++)
        r.data()[i] = static_cast<std::byte>((i * 131 + seed) & 0xff);
}

bool holds(const ShmRegion& r, unsigned seed) {
    for (std::size_t i = 0; i < r.size(); i++)
        if (r.data()[i] != static_cast<std::byte>((i * 131 + seed) & 0xff)) return false;
    return true;
}

/// Sends `fd` with one byte; the receiving side's descriptor.
Fd pass(SocketPair& sp, int fd) {
    const std::byte one[1] = {std::byte{1}};
    BOOST_REQUIRE(send_with_fds(sp.a.get(), one, std::span<const int>(&fd, 1)) == 1);
    std::byte buf[1];
    std::vector<Fd> fds;
    BOOST_REQUIRE(recv_with_fds(sp.b.get(), buf, fds) == 1);
    BOOST_REQUIRE(fds.size() == 1u);
    return std::move(fds[0]);
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_new_region_is_sealed_and_only_its_maker_writes_it) {
    ShmRegion r;
    BOOST_REQUIRE(ShmRegion::create(100'000, "rx-test", r) == 0);
    BOOST_TEST(r.size() % 4096 == 0u);
    BOOST_TEST(r.size() >= 100'000u);
    BOOST_TEST(r.writable());
    fill(r, 3);
    BOOST_TEST(holds(r, 3));
    int seals = ::fcntl(r.fd(), F_GET_SEALS);
    BOOST_TEST((seals & F_SEAL_SHRINK) != 0);
    BOOST_TEST((seals & F_SEAL_GROW) != 0);
    BOOST_TEST((seals & F_SEAL_FUTURE_WRITE) != 0);
    BOOST_TEST((seals & F_SEAL_SEAL) != 0);
    // Nobody can shrink it, map it writable again, or write(2) to it.
    BOOST_TEST(::ftruncate(r.fd(), 4096) == -1);
    BOOST_TEST(errno == EPERM);
    void* w = ::mmap(nullptr, r.size(), PROT_READ | PROT_WRITE, MAP_SHARED, r.fd(), 0);
    BOOST_TEST(w == MAP_FAILED);
    std::byte b{};
    BOOST_TEST(::pwrite(r.fd(), &b, 1, 0) == -1);
}

BOOST_AUTO_TEST_CASE(a_region_crosses_to_another_process_and_is_mapped_read_only) {
    SocketPair sp;
    constexpr std::size_t kBytes = 1 << 20;
    pid_t pid = ::fork();
    if (pid == 0) {  // the sender: makes, fills, sends, waits for the verdict
        ::alarm(30);
        ShmRegion r;
        if (ShmRegion::create(kBytes, "rx-test-sender", r) != 0) _exit(2);
        fill(r, 9);
        int fd = r.fd();
        const std::byte one[1] = {std::byte{1}};
        if (send_with_fds(sp.a.get(), one, std::span<const int>(&fd, 1)) != 1) _exit(3);
        // After sending, the sender writes more: the receiver sees it live.
        r.data()[0] = std::byte{0x5a};
        if (send_with_fds(sp.a.get(), one, {}) != 1) _exit(4);
        std::byte done[1];
        _exit(::read(sp.a.get(), done, 1) == 1 ? 0 : 5);
    }
    BOOST_REQUIRE(pid > 0);
    std::byte buf[1];
    std::vector<Fd> fds;
    BOOST_REQUIRE(recv_with_fds(sp.b.get(), buf, fds) == 1);
    BOOST_REQUIRE(fds.size() == 1u);
    ShmRegion mine;
    BOOST_REQUIRE(ShmRegion::map_peer(std::move(fds[0]), kBytes, mine) == 0);
    BOOST_TEST(!mine.writable());
    std::vector<Fd> none;
    BOOST_REQUIRE(recv_with_fds(sp.b.get(), buf, none) == 1);
    BOOST_TEST(none.empty());
    BOOST_TEST((mine.data()[0] == std::byte{0x5a}));
    BOOST_TEST((mine.data()[1] == static_cast<std::byte>((131 + 9) & 0xff)));
    BOOST_TEST((mine.data()[kBytes - 1] == static_cast<std::byte>(((kBytes - 1) * 131 + 9) & 0xff)));
    // The receiver cannot widen its mapping into a writable one.
    BOOST_TEST(::mprotect(mine.data(), mine.size(), PROT_READ | PROT_WRITE) == -1);
    BOOST_REQUIRE(::write(sp.b.get(), "k", 1) == 1);
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_TEST((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

BOOST_AUTO_TEST_CASE(a_write_through_the_receivers_mapping_faults) {
    ShmRegion r;
    BOOST_REQUIRE(ShmRegion::create(4096, "rx-test", r) == 0);
    SocketPair sp;
    ShmRegion mine;
    BOOST_REQUIRE(ShmRegion::map_peer(pass(sp, r.fd()), r.size(), mine) == 0);
    pid_t pid = ::fork();
    if (pid == 0) {
        ::signal(SIGSEGV, SIG_DFL);
        *const_cast<volatile std::byte*>(mine.data()) = std::byte{1};
        _exit(0);  // reached only if the write went through
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(pid, &status, 0) == pid);
    BOOST_TEST((WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV));
    BOOST_TEST((r.data()[0] == std::byte{0}));
}

BOOST_AUTO_TEST_CASE(the_receiver_refuses_a_wrong_size_or_missing_seals) {
    SocketPair sp;
    ShmRegion r;
    BOOST_REQUIRE(ShmRegion::create(8192, "rx-test", r) == 0);
    ShmRegion out;
    // Announced size and real size differ.
    BOOST_TEST(ShmRegion::map_peer(pass(sp, r.fd()), 4096, out) == -EPROTO);
    BOOST_TEST(ShmRegion::map_peer(pass(sp, r.fd()), 16384, out) == -EPROTO);
    BOOST_TEST(!out);
    // A memfd the sender could still shrink.
    Fd loose(::memfd_create("rx-test-loose", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    BOOST_REQUIRE(loose);
    BOOST_REQUIRE(::ftruncate(loose.get(), 4096) == 0);
    BOOST_TEST(ShmRegion::map_peer(pass(sp, loose.get()), 4096, out) == -EPROTO);
    // Not a memfd at all (a pipe has no seals, and no size).
    int p[2];
    BOOST_REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    Fd pr(p[0]), pw(p[1]);
    BOOST_TEST(ShmRegion::map_peer(pass(sp, pr.get()), 4096, out) == -EPROTO);
    BOOST_TEST(!out);
}
