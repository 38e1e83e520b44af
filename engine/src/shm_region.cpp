#include "ringxfer/engine/shm_region.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010  // Linux 5.1; older libc headers lack it
#endif

namespace ringxfer::engine {

namespace {
constexpr std::size_t kMaxFds = 64;

std::size_t page_round(std::size_t n) {
    const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
}
}  // namespace

ShmRegion::ShmRegion(ShmRegion&& o) noexcept
    : fd_(std::move(o.fd_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      writable_(std::exchange(o.writable_, false)) {}

ShmRegion& ShmRegion::operator=(ShmRegion&& o) noexcept {
    if (this != &o) {
        reset();
        fd_ = std::move(o.fd_);
        data_ = std::exchange(o.data_, nullptr);
        size_ = std::exchange(o.size_, 0);
        writable_ = std::exchange(o.writable_, false);
    }
    return *this;
}

ShmRegion::~ShmRegion() { reset(); }

void ShmRegion::reset() noexcept {
    if (data_) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
    fd_.reset();
}

int ShmRegion::create(std::size_t bytes, const char* name, ShmRegion& out, Access access,
                      void* at) noexcept {
    if (bytes == 0) return -EINVAL;
    const std::size_t size = page_round(bytes);
    Fd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (!fd) return -errno;
    if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return -errno;
    void* p = ::mmap(at, size, PROT_READ | PROT_WRITE, MAP_SHARED | (at ? MAP_FIXED : 0), fd.get(),
                     0);
    if (p == MAP_FAILED) return -errno;
    // After our writable mapping exists: F_SEAL_FUTURE_WRITE leaves it
    // working and refuses every later writable mapping, ours or a peer's.
    int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    if (access == Access::owner_writes) seals |= F_SEAL_FUTURE_WRITE;
    if (::fcntl(fd.get(), F_ADD_SEALS, seals) != 0) {
        int e = errno;
        ::munmap(p, size);
        return -e;
    }
    out = ShmRegion(std::move(fd), static_cast<std::byte*>(p), size, true);
    return 0;
}

int ShmRegion::map_peer(Fd fd, std::size_t expected_bytes, ShmRegion& out,
                        Access access) noexcept {
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return -errno;
    if (st.st_size <= 0 || static_cast<std::size_t>(st.st_size) != expected_bytes) return -EPROTO;
    int seals = ::fcntl(fd.get(), F_GET_SEALS);
    if (seals < 0) return errno == EINVAL ? -EPROTO : -errno;  // not a memfd (or not sealable)
    if (!(seals & F_SEAL_SHRINK) || !(seals & F_SEAL_GROW)) return -EPROTO;
    const bool rw = access == Access::both_write;
    void* p = ::mmap(nullptr, expected_bytes, rw ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED,
                     fd.get(), 0);
    if (p == MAP_FAILED) return -errno;
    out = ShmRegion(std::move(fd), static_cast<std::byte*>(p), expected_bytes, rw);
    return 0;
}

int send_with_fds(int sock, std::span<const std::byte> data, std::span<const int> fds) noexcept {
    if (data.empty() || fds.size() > kMaxFds) return -EINVAL;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    iovec iov{const_cast<std::byte*>(data.data()), data.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!fds.empty()) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
        std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    for (;;) {
        ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (n >= 0) return static_cast<int>(n);
        if (errno != EINTR) return -errno;
    }
}

int recv_with_fds(int sock, std::span<std::byte> data, std::vector<Fd>& fds) noexcept {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    iovec iov{data.data(), data.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do {
        n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    std::vector<Fd> got;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; i++) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            got.emplace_back(fd);
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) return -EPROTO;  // `got` closes what did arrive
    for (Fd& f : got) fds.push_back(std::move(f));
    return static_cast<int>(n);
}

}  // namespace ringxfer::engine
