// The portable fallback: the same Driver/Stream contract on epoll and
// non-blocking sockets, for hosts where io_uring is blocked (Docker's default
// seccomp profile, kernel.io_uring_disabled). Buffers are the same pooled
// leases (never registered: there is no ring); each operation still owns its
// buffers until its handler runs, and copies are the same except that the
// kernel cannot be asked for zero-copy sends.
//
// Model: every socket is registered once, edge-triggered, for in and out.
// A pending operation is retried when its direction becomes ready; handlers
// run from run_once(), never from inside recv()/send().
//
// Syscalls per message matter on this path (a 64-byte ping-pong is a few of
// them and two wake-ups): a receive is not retried on a socket known to be
// drained (its last recv said EAGAIN; the next EPOLLIN edge says data came),
// and the wake-up eventfd is written only when work becomes ready outside
// run_once(), where a foreign event loop polling completion_fd() must see it.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <fcntl.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <vector>
#include <unordered_map>

#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/error.hpp"

namespace ringxfer::engine {
namespace {

class EpollDriver;

/// FIFO on a circular buffer that keeps its capacity: a stream's send queue
/// allocates only when it grows past its largest size so far (std::deque
/// allocated a node per send: sends are larger than its 512-byte nodes).
template <class T>
class Fifo {
public:
    bool empty() const noexcept { return size_ == 0; }
    std::size_t size() const noexcept { return size_; }
    T& front() noexcept { return slots_[head_]; }
    void push_back(T v) {
        if (size_ == slots_.size()) grow();
        slots_[(head_ + size_) % slots_.size()] = std::move(v);
        ++size_;
    }
    void pop_front() noexcept {
        slots_[head_] = T{};  // release what it owned (buffers, handler)
        head_ = (head_ + 1) % slots_.size();
        --size_;
    }

private:
    void grow() {
        std::vector<T> bigger(std::max<std::size_t>(4, slots_.size() * 2));
        for (std::size_t i = 0; i < size_; ++i)
            bigger[i] = std::move(slots_[(head_ + i) % slots_.size()]);
        slots_ = std::move(bigger);
        head_ = 0;
    }
    std::vector<T> slots_;
    std::size_t head_ = 0, size_ = 0;
};

/// Something registered with epoll: told about readiness (on_ready, from
/// epoll_wait) and given a turn to make progress (run, from the ready queue).
/// Known to the driver by a never-reused id, so a late event for a dead
/// watcher can never reach a new object at the same address.
class Watcher {
public:
    virtual void on_ready(uint32_t events) = 0;
    virtual int run() = 0;  // handlers completed
    std::uint64_t id = 0;

protected:
    ~Watcher() = default;
};

class EpollStream final : public Stream, public Watcher {
public:
    EpollStream(EpollDriver& d, Fd fd);
    ~EpollStream() override;

    void recv(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
              RecvHandler handler) override;
    void send(SendBuffers buffers, SendHandler handler) override;

    void close() override {
        if (closed_) return;
        closed_ = true;
        ::shutdown(fd_.get(), SHUT_RDWR);
        schedule();
    }

    std::string peer() const override { return peer_; }
    std::size_t pending_input() const override { return engine::pending_input(fd_.get()); }
    const StreamCounters& counters() const override { return counters_; }

    void on_ready(uint32_t events) override {
        // Every enqueue on a socket fires its edge, so a socket marked drained
        // stays marked only until the next data, EOF or error.
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) readable_ = true;
        schedule();
    }

    /// Makes progress on pending operations; returns handlers completed.
    int run() override;

    std::size_t pending() const { return (recv_.active ? 1 : 0) + sends_.size(); }

private:
    struct RecvState {
        bool active = false;
        Lease lease;
        std::size_t offset = 0, min = 0, max = 0, got = 0;
        RecvHandler handler;
    };
    struct SendState {
        SendBuffers buf;
        SendHandler handler;
        std::size_t sent = 0;
    };

    void schedule();
    bool step_recv();  // true: completed
    bool step_send();

    EpollDriver& driver_;
    Fd fd_;
    std::string peer_;
    StreamCounters counters_;
    RecvState recv_;
    Fifo<SendState> sends_;
    bool closed_ = false;
    bool scheduled_ = false;
    bool readable_ = true;  ///< false: the last recv drained the socket
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
    friend class EpollDriver;
};

class EpollDriver final : public Driver {
public:
    explicit EpollDriver(std::chrono::microseconds busy_poll) : busy_poll_(busy_poll) {
        epfd_ = Fd(::epoll_create1(EPOLL_CLOEXEC));
        if (!epfd_) throw Error(errno, errno_message("cannot create epoll instance", errno));
        wake_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake_) throw Error(errno, errno_message("cannot create eventfd", errno));
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = 0;  // the wake-up eventfd; watchers have ids from 1
        ::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, wake_.get(), &ev);
    }

    int run_once(unsigned min_complete, std::chrono::nanoseconds timeout) override {
        Turn turn(*this);
        int done = drain_ready();
        if (done > 0 || min_complete == 0 || timeout.count() <= 0) {
            poll_events(0);
            done += drain_ready();
        } else if ((done = busy_poll(timeout)) == 0) {
            // As on the ring: after a poll that ran out, the blocking wait gets
            // the whole timeout again (at most 2x it).
            int ms = timeout == std::chrono::nanoseconds::max()
                         ? -1
                         : static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                timeout).count());
            if (ms == 0) ms = 1;
            int ret = poll_events(ms);
            if (ret < 0 && ret != -EINTR) return ret;
            done = drain_ready();
        } else if (done < 0) {
            return done;
        }
        // Handlers usually queue more (a reply, the next receive): run it now,
        // while it is cheap, rather than through the eventfd. Bounded, so one
        // stream that always has more cannot hold the caller.
        for (int pass = 0; pass < 4 && !ready_.empty(); ++pass) {
            int d = drain_ready();
            done += d;
            if (d == 0) break;
        }
        return done;
    }

    std::size_t in_flight() const override { return in_flight_; }

    int completion_fd() override { return epfd_.get(); }  // epoll fds are pollable

    std::unique_ptr<Stream> make_stream(Fd fd, const SocketStreamOptions&) override {
        return std::make_unique<EpollStream>(*this, std::move(fd));
    }

    void* async_accept(int listen_fd, AcceptHandler handler) override;
    void async_connect(const Endpoint& ep, ConnectHandler handler) override;
    void cancel(void* token) override;

    Ring* ring() override { return nullptr; }
    std::string describe() const override { return "epoll (io_uring fallback)"; }
    const char* backend_name() const override { return "epoll"; }

    // --- for streams and socket ops
    void watch(int fd, Watcher* w) {
        w->id = ++next_id_;
        live_[w->id] = w;
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.u64 = w->id;
        ::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev);
    }
    void unwatch(int fd, Watcher* w) {
        ::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, fd, nullptr);
        live_.erase(w->id);
    }
    void make_ready(Watcher* w) {
        if (ready_.empty() && !in_turn_) wake();
        ready_.push_back(w->id);
    }
    void add_in_flight(std::ptrdiff_t n) { in_flight_ += n; }

private:
    /// Inside run_once() work made ready is drained before it returns; what
    /// is still queued then is announced once through the eventfd, so that
    /// completion_fd() is readable exactly when run_once() has work.
    /// (A handler that runs the driver itself nests turns: only the
    /// outermost one announces.)
    struct Turn {
        explicit Turn(EpollDriver& d) : d(d), outer(!d.in_turn_) { d.in_turn_ = true; }
        ~Turn() {
            if (!outer) return;
            d.in_turn_ = false;
            if (!d.ready_.empty()) d.wake();
        }
        EpollDriver& d;
        bool outer;
    };

    void wake() {
        std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof one);
    }

    /// Returns handlers completed while polling epoll without blocking for
    /// up to the busy-poll time (0 when it ran out or is off), or -errno.
    int busy_poll(std::chrono::nanoseconds timeout) {
        if (busy_poll_.count() == 0) return 0;
        auto deadline = std::chrono::steady_clock::now() +
                        std::min<std::chrono::nanoseconds>(busy_poll_, timeout);
        do {
            int n = poll_events(0);
            if (n < 0 && n != -EINTR) return n;
            if (!ready_.empty())
                if (int done = drain_ready(); done > 0) return done;
        } while (std::chrono::steady_clock::now() < deadline);
        return 0;
    }

    Watcher* find(std::uint64_t id) {
        auto it = live_.find(id);
        return it == live_.end() ? nullptr : it->second;
    }

    int poll_events(int ms) {
        epoll_event evs[64];
        int n = ::epoll_wait(epfd_.get(), evs, 64, ms);
        if (n < 0) return -errno;
        for (int i = 0; i < n; ++i) {
            if (evs[i].data.u64 == 0) {  // the wake-up eventfd
                std::uint64_t v;
                [[maybe_unused]] auto r = ::read(wake_.get(), &v, sizeof v);
                continue;
            }
            if (Watcher* w = find(evs[i].data.u64)) w->on_ready(evs[i].events);
        }
        return n;
    }

    int drain_ready() {
        // Swap out: handlers may make more watchers ready; those run on the
        // next call, which does not block because the eventfd is set. The two
        // vectors trade places and keep their capacity: no allocation per
        // turn (a nested turn, from a handler that runs the driver, may
        // allocate its own).
        std::vector<std::uint64_t> batch = std::move(spare_);
        batch.clear();
        batch.swap(ready_);
        int done = 0;
        for (std::uint64_t id : batch)
            if (Watcher* w = find(id)) done += w->run();
        batch.clear();
        if (batch.capacity() > spare_.capacity()) spare_ = std::move(batch);
        return done;
    }

    Fd epfd_;
    Fd wake_;
    std::vector<std::uint64_t> ready_;
    std::vector<std::uint64_t> spare_;  // drain_ready()'s batch, kept for reuse
    std::unordered_map<std::uint64_t, Watcher*> live_;
    std::uint64_t next_id_ = 0;
    std::size_t in_flight_ = 0;
    std::chrono::microseconds busy_poll_;
    bool in_turn_ = false;
};

// ---------------------------------------------------------------------------

EpollStream::EpollStream(EpollDriver& d, Fd fd) : driver_(d), fd_(std::move(fd)) {
    peer_ = peer_name(fd_.get());
    int fl = ::fcntl(fd_.get(), F_GETFL);
    ::fcntl(fd_.get(), F_SETFL, fl | O_NONBLOCK);
    driver_.watch(fd_.get(), this);
}

EpollStream::~EpollStream() {
    *alive_ = false;
    driver_.add_in_flight(-static_cast<std::ptrdiff_t>(pending()));
    driver_.unwatch(fd_.get(), this);
    // Pending operations are dropped without their handlers (the Stream
    // contract); nothing is in the kernel, so their buffers go back now.
}

void EpollStream::recv(Lease lease, std::size_t offset, std::size_t min, std::size_t max,
                   RecvHandler handler) {
    assert(!recv_.active && "one recv in flight per stream");
    assert(min >= 1 && min <= max && offset + max <= lease.capacity());
    recv_ = {true, std::move(lease), offset, min, max, 0, std::move(handler)};
    counters_.recv_ops++;
    driver_.add_in_flight(1);
    schedule();
}

void EpollStream::send(SendBuffers buffers, SendHandler handler) {
    sends_.push_back({std::move(buffers), std::move(handler), 0});
    counters_.send_ops++;
    driver_.add_in_flight(1);
    schedule();
}

void EpollStream::schedule() {
    if (scheduled_) return;
    scheduled_ = true;
    driver_.make_ready(this);
}

bool EpollStream::step_recv() {
    auto finish = [&](int err, bool eof) {
        RecvHandler h = std::move(recv_.handler);
        Lease l = std::move(recv_.lease);
        IoResult r{recv_.got, err, eof};
        recv_ = RecvState{};
        driver_.add_in_flight(-1);
        h(std::move(l), r);  // may destroy this stream: touch nothing after
        return true;
    };
    if (closed_) return finish(-ECANCELED, false);
    while (recv_.got < recv_.min) {
        if (!readable_) return false;  // drained: wait for the next EPOLLIN edge
        std::byte* p = recv_.lease.data() + recv_.offset + recv_.got;
        ssize_t n = ::recv(fd_.get(), p, recv_.max - recv_.got, 0);
        if (n > 0) {
            // A short read is not taken as "drained": TCP stops short at an
            // urgent mark with data still queued and no edge to come.
            recv_.got += static_cast<std::size_t>(n);
            counters_.bytes_received += static_cast<std::size_t>(n);
        } else if (n == 0) {
            return finish(0, true);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            readable_ = false;
            return false;
        } else if (errno != EINTR) {
            return finish(-errno, false);
        }
    }
    return finish(0, false);
}

bool EpollStream::step_send() {
    SendState& s = sends_.front();
    auto finish = [&](int err) {
        SendHandler h = std::move(s.handler);
        SendBuffers b = std::move(s.buf);
        IoResult r{s.sent, err, false};
        sends_.pop_front();
        driver_.add_in_flight(-1);
        h(std::move(b), r);  // may destroy this stream: touch nothing after
        return true;
    };
    if (closed_) return finish(-ECANCELED);
    const std::size_t total = s.buf.prefix_len + s.buf.body_len;
    while (s.sent < total) {
        iovec iov[2];
        int n = 0;
        if (s.sent < s.buf.prefix_len)
            iov[n++] = {s.buf.prefix.data() + s.sent, s.buf.prefix_len - s.sent};
        std::size_t body_done = s.sent > s.buf.prefix_len ? s.sent - s.buf.prefix_len : 0;
        if (body_done < s.buf.body_len)
            iov[n++] = {s.buf.body.data() + s.buf.body_offset + body_done,
                        s.buf.body_len - body_done};
        msghdr msg{};
        msg.msg_iov = iov;
        msg.msg_iovlen = static_cast<std::size_t>(n);
        ssize_t w = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
        if (w > 0) {
            s.sent += static_cast<std::size_t>(w);
            counters_.bytes_sent += static_cast<std::size_t>(w);
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return false;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            return finish(w < 0 ? -errno : -EPIPE);
        }
    }
    return finish(0);
}

int EpollStream::run() {
    scheduled_ = false;
    int done = 0;
    // A handler may queue more work on this stream, or drop the last
    // reference to its owner and so destroy the stream: the alive token says
    // whether `this` still exists after each handler.
    std::shared_ptr<bool> alive = alive_;
    if (recv_.active && step_recv()) {
        ++done;
        if (!*alive) return done;
    }
    while (!sends_.empty() && step_send()) {
        ++done;
        if (!*alive) return done;
    }
    return done;
}

// ---------------------------------------------------------------------------
// accept / connect

class EpollAccept final : public Watcher {
public:
    EpollAccept(EpollDriver& d, int fd, AcceptHandler h) : d_(d), fd_(fd), h_(std::move(h)) {
        int fl = ::fcntl(fd, F_GETFL);
        ::fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        d_.watch(fd_, this);
        d_.add_in_flight(1);
        d_.make_ready(this);
    }
    void on_ready(uint32_t) override { d_.make_ready(this); }
    int run() override { return step(cancelled) ? 1 : 0; }
    bool step(bool cancelled) {
        int fd = cancelled ? -1 : ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (!cancelled && fd < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return false;
        int err = cancelled ? -ECANCELED : (fd < 0 ? -errno : 0);
        d_.unwatch(fd_, this);
        d_.add_in_flight(-1);
        AcceptHandler h = std::move(h_);
        delete this;
        h(Fd(fd), err);
        return true;
    }
    bool cancelled = false;

private:
    EpollDriver& d_;
    int fd_;
    AcceptHandler h_;
};

class EpollConnect final : public Watcher {
public:
    EpollConnect(EpollDriver& d, Fd fd, ConnectHandler h)
        : d_(d), fd_(std::move(fd)), h_(std::move(h)) {
        d_.watch(fd_.get(), this);
        d_.add_in_flight(1);
    }
    int run() override { return 0; }
    void on_ready(uint32_t events) override {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(fd_.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        finish(err ? -err : 0);
    }
    void finish(int err) {
        d_.unwatch(fd_.get(), this);
        d_.add_in_flight(-1);
        ConnectHandler h = std::move(h_);
        Fd fd = std::move(fd_);
        delete this;
        if (err == 0) {
            int fl = ::fcntl(fd.get(), F_GETFL);
            ::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK);
            h(std::move(fd), 0);
        } else {
            h(Fd(), err);
        }
    }

private:
    EpollDriver& d_;
    Fd fd_;
    ConnectHandler h_;
};

void* EpollDriver::async_accept(int listen_fd, AcceptHandler handler) {
    return new EpollAccept(*this, listen_fd, std::move(handler));
}

void EpollDriver::cancel(void* token) {
    auto* a = static_cast<EpollAccept*>(token);
    a->cancelled = true;
    make_ready(a);
}

void EpollDriver::async_connect(const Endpoint& ep, ConnectHandler handler) {
    SockAddr addr = resolve(ep);
    Fd fd(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) {
        int err = -errno;
        handler(Fd(), err);
        return;
    }
    int ret = ::connect(fd.get(), addr.get(), addr.len);
    if (ret < 0 && errno != EINPROGRESS) {
        int err = -errno;
        handler(Fd(), err);
        return;
    }
    new EpollConnect(*this, std::move(fd), std::move(handler));
}

}  // namespace

std::unique_ptr<Driver> make_epoll_driver(std::chrono::microseconds busy_poll) {
    return std::make_unique<EpollDriver>(busy_poll);
}

}  // namespace ringxfer::engine
