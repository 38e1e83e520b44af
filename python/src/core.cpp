// ringxfer._core: the engine and the framing layer as seen from Python.
//
// One Engine per (event loop, backend, busy poll): a Driver (io_uring or
// epoll) and its buffer pools. The asyncio layer (ringxfer/_stream.py)
// watches Engine.fileno() with loop.add_reader() and calls Engine.pump() when
// it is readable; pump() runs the ring with the GIL released, and the
// completion handlers only record what happened (they run without the GIL
// and never touch a Python object). Once the ring is left, with the GIL
// again, the recorded events resolve asyncio futures: Python runs once per
// frame, not once per chunk.
//
// Ownership across the boundary (docs/python.md):
// - A Frame object owns one Lease: the frame's pooled buffer. Its memory is
//   exported through the buffer protocol; release() gives it back to the
//   pool and raises BufferError while a memoryview or numpy array still uses
//   it. Views hold a reference to the Frame, so collection never frees
//   memory under a live view.
// - send() of a bytes-like object takes a buffer export of it (a Lease::wrap
//   whose release runs PyBuffer_Release) for as long as the kernel may read
//   it: the object cannot be resized or freed until then, and the coroutine
//   returns only after that. A Frame is sent from a share() of its lease.
//
// Everything here belongs to the thread that made the Engine (the event
// loop's); other threads get RuntimeError. Only a Frame's release may happen
// anywhere.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <sys/socket.h>

#include "ringxfer/engine/buffer_pool.hpp"
#include "ringxfer/engine/driver.hpp"
#include "ringxfer/engine/error.hpp"
#include "ringxfer/engine/shm_stream.hpp"
#include "ringxfer/engine/socket.hpp"
#include "ringxfer/engine/stream.hpp"
#include "ringxfer/proto/errors.hpp"
#include "ringxfer/proto/frame.hpp"
#include "ringxfer/proto/frame_reader.hpp"
#include "ringxfer/proto/frame_writer.hpp"

namespace py = pybind11;

namespace ringxfer::python {
namespace {

using namespace std::chrono_literals;

// ---------------------------------------------------------------------------
// Python references that may be dropped where the GIL is not held: inside
// the ring (a stream destroyed with sends in flight frees their handlers
// when the kernel's final completion arrives).

/// Runs `f` holding the GIL, taking it only where the caller does not hold it.
template <class F>
void with_gil(F&& f) {
    if (PyGILState_Check()) return f();
    PyGILState_STATE s = PyGILState_Ensure();
    f();
    PyGILState_Release(s);
}

class GilRef {
public:
    GilRef() = default;
    explicit GilRef(py::object o) : p_(o.release().ptr()) {}
    GilRef(GilRef&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    GilRef& operator=(GilRef&& o) noexcept {
        std::swap(p_, o.p_);
        return *this;
    }
    ~GilRef() { reset(); }
    void reset() noexcept {
        if (!p_) return;
        PyObject* p = std::exchange(p_, nullptr);
        with_gil([p] { Py_DECREF(p); });
    }
    explicit operator bool() const noexcept { return p_ != nullptr; }
    py::handle get() const noexcept { return p_; }

private:
    PyObject* p_ = nullptr;
};

// ---------------------------------------------------------------------------
// Errors: ringxfer.errors defines the exception types (subclasses of the
// builtins users already catch); these build instances of them.

py::object errors_module() {
    // Never destroyed: a static py::object would be released after the
    // interpreter is finalized, at process exit.
    static PyObject* mod = py::module_::import("ringxfer.errors").release().ptr();
    return py::reinterpret_borrow<py::object>(mod);
}

const char* errc_name(proto::Errc e) {
    switch (e) {
        case proto::Errc::closed: return "closed";
        case proto::Errc::truncated: return "truncated";
        case proto::Errc::bad_magic: return "bad_magic";
        case proto::Errc::bad_version: return "bad_version";
        case proto::Errc::unknown_flags: return "unknown_flags";
        case proto::Errc::reserved_not_zero: return "reserved_not_zero";
        case proto::Errc::too_large: return "too_large";
        case proto::Errc::checksum_mismatch: return "checksum_mismatch";
        case proto::Errc::no_buffer: return "no_buffer";
        case proto::Errc::too_many_empty: return "too_many_empty";
    }
    return "unknown";
}

/// The exception for a connection that ended with `ec`; `peer` names it.
/// `detail`: what the stream could say beyond its errno (Stream::
/// error_message(): an shm peer that broke the shm protocol says how).
py::object make_error(std::error_code ec, const std::string& peer, bool closed_locally,
                      const std::string& detail = {}) {
    py::object errs = errors_module();
    if (closed_locally || ec == std::errc::operation_canceled) {
        return py::module_::import("builtins")
            .attr("ConnectionAbortedError")(ECONNABORTED,
                                            "connection to " + peer +
                                                " was closed locally (close() was called)");
    }
    if (ec.category() == proto::category()) {
        auto e = static_cast<proto::Errc>(ec.value());
        if (e == proto::Errc::closed)
            return errs.attr("ConnectionClosed")(peer + " closed the connection");
        std::string what = ec.message() + " (from " + peer + ")";
        if (e == proto::Errc::no_buffer) {
            what += ": the buffer pool's budget is used up by frames this process still "
                    "holds; release frames sooner or raise pool_budget";
            return errs.attr("BufferPoolExhausted")(what, errc_name(e));
        }
        return errs.attr("ProtocolError")(what, errc_name(e));
    }
    int err = ec.value();
    if (err == EPROTO && !detail.empty())  // a descriptor or handshake the shm peer forged
        return errs.attr("ProtocolError")(detail + " (from " + peer + ")", "shm_protocol");
    // OSError(errno, text) picks the builtin subclass (ConnectionResetError,
    // BrokenPipeError, ...) from the errno.
    return py::module_::import("builtins")
        .attr("OSError")(err, ec.message() + " (connection to " + peer + ")");
}

[[noreturn]] void raise(py::object exc) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    throw py::error_already_set();
}

[[noreturn]] void raise_errno(PyObject* type, int err, const std::string& what) {
    py::object e = py::reinterpret_borrow<py::object>(type)(err, what);
    raise(e);
}

// ---------------------------------------------------------------------------
// Frame

struct PyFrame {
    proto::Frame frame;
    bool readonly = false;
    Py_ssize_t exports = 0;  // live buffer views (memoryview, numpy, ...)
    bool released = false;

    void check() const {
        if (released) throw py::value_error("operation on a released ringxfer.Frame");
    }
    void release() {
        if (released) return;
        if (exports > 0)
            throw py::buffer_error(
                "ringxfer.Frame.release(): " + std::to_string(exports) +
                " buffer view(s) (memoryview, numpy array, ...) still use this frame's memory; "
                "drop them first (the memory then returns when the Frame is collected)");
        frame.reset();
        released = true;
    }
};

PyFrame* frame_of(PyObject* self) { return py::cast<PyFrame*>(py::handle(self)); }

// The buffer protocol by hand (pybind11's def_buffer cannot count exports):
// every view is counted, and holds a reference to the Frame.
int frame_getbuffer(PyObject* self, Py_buffer* view, int flags) {
    static char empty = 0;
    view->obj = nullptr;
    PyFrame* f;
    try {
        f = frame_of(self);
    } catch (...) {
        PyErr_SetString(PyExc_TypeError, "not a ringxfer.Frame");
        return -1;
    }
    if (f->released) {
        PyErr_SetString(PyExc_ValueError, "operation on a released ringxfer.Frame");
        return -1;
    }
    auto span = f->frame.payload();
    void* data = span.empty() ? static_cast<void*>(&empty) : const_cast<std::byte*>(span.data());
    if (PyBuffer_FillInfo(view, self, data, static_cast<Py_ssize_t>(span.size()), f->readonly,
                          flags) < 0)
        return -1;
    f->exports++;
    return 0;
}

void frame_releasebuffer(PyObject* self, Py_buffer*) {
    try {
        frame_of(self)->exports--;
    } catch (...) {
        PyErr_Clear();
    }
}

/// A Lease over a bytes-like object's memory, held as a buffer export until
/// the engine lets go of it.
engine::Lease wrap_buffer(py::handle obj) {
    auto view = std::make_unique<Py_buffer>();
    if (PyObject_GetBuffer(obj.ptr(), view.get(), PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        throw py::type_error(
            std::string("send() takes bytes-like objects (bytes, bytearray, memoryview, "
                        "C-contiguous numpy arrays, ringxfer.Frame); got ") +
            Py_TYPE(obj.ptr())->tp_name);
    }
    std::span<std::byte> mem(static_cast<std::byte*>(view->buf),
                             static_cast<std::size_t>(view->len));
    Py_buffer* raw = view.release();
    try {
        return engine::Lease::wrap(mem, [raw]() noexcept {
            with_gil([raw] { PyBuffer_Release(raw); });
            delete raw;
        });
    } catch (...) {
        PyBuffer_Release(raw);
        delete raw;
        throw;
    }
}

// ---------------------------------------------------------------------------

class Conn;
struct Channel;

struct SendState {
    bool done = false;
    std::error_code ec;
    proto::Frame frame;  // the sent frame, dropped with the GIL held
    GilRef future;       // made only when the send did not finish at once
    std::weak_ptr<Conn> conn;
    Channel* channel = nullptr;  // the one it went to (alive while it is out)
    // Lent, not sent: every part lies in this side's shared pool and goes to
    // the shm peer by reference. The engine completes it when the peer
    // releases it, which may be never while the peer keeps the frame; the
    // caller is told it is sent once it is handed over (send() does not wait,
    // drain() does not count it), and the engine holds the lease till then.
    bool lent = false;
    bool control = false;  // an upgrade control frame, not the caller's
    std::string detail;          // the stream's error_message() on failure
    bool written = false;  // from write(): drain() waits for it, errors wait for drain()
};

struct EngineOptions {
    std::string backend = "auto";
    double busy_poll_us = 0;
    std::size_t pool_budget = std::size_t{4} << 30;
    bool register_buffers = true;
};

class Engine {
public:
    Engine(py::object loop, const EngineOptions& o) : loop_(py::weakref(loop)), options_(o) {
        engine::RingOptions ro;
        ro.busy_poll = std::chrono::microseconds(static_cast<long long>(o.busy_poll_us));
        // Driven from a foreign loop through the completion eventfd, the ring
        // must post completions without our entering it: with DEFER_TASKRUN
        // this kernel left a received frame's task work waiting for a
        // GETEVENTS enter that the sleeping loop never made (4 KiB ping-pong
        // between two processes: 29 round trips/s, against 12,135 with
        // COOP_TASKRUN; docs/python.md). COOP_TASKRUN runs it at the next
        // kernel entry and signals the eventfd.
        ro.defer_taskrun = false;
        std::vector<std::string> warnings;
        try {
            driver_ = engine::make_driver(engine::parse_backend(o.backend), ro,
                                          [&](std::string_view w) { warnings.emplace_back(w); });
        } catch (const engine::Error& e) {
            raise_errno(PyExc_OSError, e.code(), e.what());
        }
        for (const std::string& w : warnings) warn(w);
        int fd = driver_->completion_fd();
        if (fd < 0) raise_errno(PyExc_OSError, -fd, "cannot create the completion descriptor");
    }

    ~Engine() {
        // Streams are gone (connections hold the Engine); their cancelled
        // operations still own buffers until the kernel's final completions.
        py::gil_scoped_release nogil;
        auto deadline = std::chrono::steady_clock::now() + 2s;
        while (driver_ && driver_->in_flight() > 0 && std::chrono::steady_clock::now() < deadline)
            driver_->run_once(1, 50ms);
    }

    int fileno() { return driver_->completion_fd(); }
    std::string backend() const { return driver_->backend_name(); }
    std::string describe() const { return driver_->describe(); }

    void check_thread() const {
        if (std::this_thread::get_id() != owner_)
            throw std::runtime_error(
                "ringxfer objects belong to the thread of the event loop that made them; "
                "use loop.call_soon_threadsafe() to reach them from another thread");
    }

    /// The loop's reader callback: completions in, futures resolved.
    void pump() {
        check_thread();
        for (int round = 0; round < 64; ++round) {
            // Woken through the descriptor: the first round clears it.
            int n = round == 0 ? run_ring(0, 0ns) : advance_ring();
            bool any = dispatch();
            if (n > 0 || any) continue;
            if (busy_poll() && waiting_ > 0) {
                n = run_ring(1, std::chrono::microseconds(
                                    static_cast<long long>(options_.busy_poll_us)));
                if (dispatch() || n > 0) continue;
            }
            break;
        }
        flush();  // never leave a queued SQE (or a posted completion) behind
    }

    /// Submits what is queued and dispatches what completed, without waiting.
    /// Handlers run here may queue SQEs (a recv resumed after a short
    /// read): it returns only once none is left unsubmitted, or the loop
    /// would sleep on a receive the kernel never saw.
    void poll() {
        do {
            advance_ring();
            dispatch();
        } while (sq_pending());
    }

    /// SQEs queued, or completions posted from user space (an shm stream's):
    /// neither wakes the loop through the descriptor.
    bool sq_pending() {
        engine::Ring* r = driver_->ring();
        return r && (io_uring_sq_ready(r->raw()) > 0 || r->has_posted());
    }

    /// Submits queued SQEs if there are any (after a Python call queued one),
    /// and runs what no descriptor would wake the loop for: completions an
    /// shm stream posted, and its poll, which arms the wake-up its peer
    /// signals.
    void flush() {
        engine::Ring* r = driver_->ring();
        if (r && (sq_pending() || r->has_pollers())) poll();
    }

    /// write() queues without entering the kernel: the frames written until
    /// the loop runs its next callback leave together, gathered into as few
    /// SENDMSGs as the stream allows. `self` is this engine's Python object.
    void schedule_flush(const py::object& self) {
        if (flush_scheduled_) return;
        py::object loop = loop_();
        if (loop.is_none())
            throw std::runtime_error("the event loop of this ringxfer connection is gone");
        loop.attr("call_soon")(self.attr("flush_writes"));
        flush_scheduled_ = true;
    }

    void flush_writes() {
        flush_scheduled_ = false;
        flush();
    }

    // The loop is held weakly: it holds the Engine (its reader callback), and
    // a cycle through C++ would keep both, ring and pools, forever.
    py::object create_future() {
        py::object loop = loop_();
        if (loop.is_none())
            throw std::runtime_error("the event loop of this ringxfer connection is gone");
        return loop.attr("create_future")();
    }

    engine::BufferPool& pool(bool tcp) {
        auto& p = tcp ? pool_tcp_ : pool_unix_;
        if (!p) {
            engine::PoolOptions po;
            po.budget_bytes = options_.pool_budget;
            po.page_offset = proto::payload_page_offset(tcp);
            // One fixed-buffer table per ring: the first pool registers its
            // memory; the default data path (RECV, SENDMSG) uses none.
            bool other = tcp ? bool(pool_unix_) : bool(pool_tcp_);
            po.register_buffers = options_.register_buffers && !other;
            po.warn = [this](std::string_view w) { warnings_.emplace_back(w); };
            p = std::make_unique<engine::BufferPool>(driver_->ring(), std::move(po));
        }
        return *p;
    }

    /// The pool of shm connections: memfd regions a peer maps (PoolOptions::
    /// shared_memory), so a payload leased here goes by reference. Never
    /// registered: shm payloads never reach the kernel's I/O paths.
    engine::BufferPool& shm_pool() {
        if (!pool_shm_) {
            engine::PoolOptions po;
            po.budget_bytes = options_.pool_budget;
            po.shared_memory = true;
            po.register_buffers = false;
            po.warn = [this](std::string_view w) { warnings_.emplace_back(w); };
            pool_shm_ = std::make_unique<engine::BufferPool>(driver_->ring(), std::move(po));
        }
        return *pool_shm_;
    }

    engine::Driver& driver() { return *driver_; }

    /// Busy polling (busy_poll_us > 0): a recv() that finds nothing polls the
    /// ring up to that long for `ready()` before it hands a future to the
    /// loop, as the CLI's waiting ring polls before it sleeps. A frame that
    /// arrives within it costs no wake-up of either the loop or the process.
    template <class Ready>
    void spin(Ready ready) {
        if (!busy_poll()) return;
        auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::nanoseconds(static_cast<long long>(options_.busy_poll_us * 1e3));
        do {
            advance_ring();
            dispatch();
            if (ready()) break;
        } while (std::chrono::steady_clock::now() < deadline);
        // Handlers above may have queued SQEs (a recv resumed after a short
        // read): none may be left unsubmitted when the loop goes to sleep.
        flush();
    }

    // Called from completion handlers (no GIL).
    void wake(std::weak_ptr<Conn> c) { woken_.push_back(std::move(c)); }
    void send_done(std::shared_ptr<SendState> s) { sends_done_.push_back(std::move(s)); }

    /// Connections with a recv or close waiting (busy polling polls only then).
    int waiting_ = 0;

    py::dict pool_stats();

private:
    bool busy_poll() const { return options_.busy_poll_us > 0; }

    int run_ring(unsigned min, std::chrono::nanoseconds timeout) {
        int n;
        {
            py::gil_scoped_release nogil;
            n = driver_->run_once(min, timeout);
        }
        if (n < 0 && n != -EINTR && n != -EAGAIN && n != -ETIME && n != -EBUSY)
            raise_errno(PyExc_OSError, -n, engine::errno_message("ringxfer: the ring failed", n));
        return n;
    }

    int advance_ring() {
        int n;
        {
            py::gil_scoped_release nogil;
            n = driver_->advance();
        }
        if (n < 0) raise_errno(PyExc_OSError, -n, engine::errno_message("ringxfer: the ring failed", n));
        return n;
    }

    bool dispatch();

    void warn(const std::string& w) {
        if (PyErr_WarnEx(PyExc_RuntimeWarning, ("ringxfer: " + w).c_str(), 1) < 0)
            throw py::error_already_set();
    }

    std::thread::id owner_ = std::this_thread::get_id();
    py::weakref loop_;
    EngineOptions options_;
    std::unique_ptr<engine::Driver> driver_;
    std::unique_ptr<engine::BufferPool> pool_tcp_, pool_unix_, pool_shm_;
    std::vector<std::string> warnings_;
    std::vector<std::weak_ptr<Conn>> woken_, woken_spare_;
    std::vector<std::shared_ptr<SendState>> sends_done_, sends_spare_;
    bool flush_scheduled_ = false;
};

// ---------------------------------------------------------------------------

struct ConnOptions {
    std::uint64_t max_frame = proto::kDefaultMaxFrame;
    bool checksum = false;
    std::size_t read_ahead = std::size_t{8} << 20;
    std::size_t recv_buffer = std::size_t{512} << 10;
};

enum class Transport { tcp, unix_stream, shm };

const char* transport_name(Transport t) {
    switch (t) {
        case Transport::tcp: return "tcp";
        case Transport::unix_stream: return "unix";
        case Transport::shm: return "shm";
    }
    return "unknown";
}

/// One transport of a connection: a stream with its frame reader and writer.
/// A Conn has one; while a same-host upgrade moves it onto shared memory it
/// has two, frames read from one and written to one of them.
struct Channel {
    Transport kind = Transport::tcp;
    std::unique_ptr<engine::Stream> stream;
    std::unique_ptr<proto::FrameReader> reader;
    std::unique_ptr<proto::FrameWriter> writer;
    engine::BufferPool* pool = nullptr;  // allocate()'s: the shared pool on shm
    std::size_t sends_outstanding = 0;

    ~Channel() {
        // The stream first: it cancels its operations, whose handlers (which
        // point into the Conn) are then never run.
        stream.reset();
        reader.reset();
        writer.reset();
    }
};

/// Counters of a connection's channels, summed over the ones that are gone.
struct Totals {
    engine::StreamCounters s;
    proto::ReaderStats r;

    void add(const Channel& c) {
        const engine::StreamCounters& o = c.stream->counters();
        s.bytes_received += o.bytes_received;
        s.bytes_sent += o.bytes_sent;
        s.recv_ops += o.recv_ops;
        s.gathered_sends += o.gathered_sends;
        s.send_copied_bytes += o.send_copied_bytes;
        s.by_reference_sends += o.by_reference_sends;
        s.by_reference_recvs += o.by_reference_recvs;
        s.recv_copied_bytes += o.recv_copied_bytes;
        r.copied_bytes += c.reader->stats().copied_bytes;
        r.referenced_frames += c.reader->stats().referenced_frames;
    }
};

class Conn : public std::enable_shared_from_this<Conn> {
public:
    /// Adopts the connected socket `fd` (owned from here on, closed on
    /// failure): TCP, a Unix stream socket, or an shm rendezvous (a Unix
    /// SOCK_SEQPACKET socket; `connector`: this side connected it).
    Conn(py::object engine_ref, int fd, const ConnOptions& o, bool connector)
        : engine_ref_(std::move(engine_ref)),
          engine_(engine_ref_.cast<Engine&>()),
          options_(o) {
        auto ch = make_channel(engine::Fd(fd), connector);
        peer_ = ch->stream->peer();
        rx_ = tx_ = ch.get();
        transport_ = ch->kind;
        channels_.push_back(std::move(ch));
    }

    ~Conn() {
        channels_.clear();
        if (recv_waiter_) engine_.waiting_--;
    }

    /// Starts receiving (after the Python side holds the object).
    void start() {
        pump_reader();
        engine_.flush();
    }

    py::object recv() {
        engine_.check_thread();
        if (recv_waiter_ && !recv_waiter_.attr("done")().cast<bool>())
            throw std::runtime_error("recv() called while another recv() on this connection "
                                     "is waiting for a frame");
        if (ready_.empty() && !end_ && !closed_) {
            engine_.poll();
            engine_.spin([this] { return !ready_.empty() || end_ || closed_; });
        }
        if (!ready_.empty()) {
            py::object f = pop_frame();
            engine_.flush();
            return f;
        }
        if (closed_ || end_) raise(error());
        set_recv_waiter(engine_.create_future());
        return recv_waiter_;
    }

    /// Puts a frame back at the head of the queue: a recv() cancelled after
    /// its frame was handed over gives it back, so no frame is lost.
    void unrecv(PyFrame& f) {
        engine_.check_thread();
        f.check();
        if (f.exports > 0) throw py::buffer_error("the frame is in use by buffer views");
        ready_bytes_ += f.frame.size();
        ready_.push_front(std::move(f.frame));
        f.released = true;
    }

    py::object send(py::args parts) {
        engine_.check_thread();
        if (closed_) raise(error_closed());
        auto st = submit(parts, false);
        // A send that fits in the socket's buffer completes inside this
        // submit: no future, no trip through the event loop.
        engine_.poll();
        if (st->done || st->lent) {
            if (st->ec) raise(make_error(st->ec, peer_, closed_, st->detail));
            return py::none();
        }
        py::object fut = engine_.create_future();
        st->future = GilRef(fut);
        return fut;
    }

    /// Queues a frame and returns: the kernel is entered once the loop runs
    /// its next callback (or at drain()), for every frame written until then.
    void write(py::args parts) {
        engine_.check_thread();
        if (closed_) raise(error_closed());
        if (write_error_) raise(make_error(write_error_, peer_, closed_, write_detail_));
        submit(parts, true);
        engine_.schedule_flush(engine_ref_);
    }

    /// None when every written frame is in the kernel, else a future
    /// resolved then; the first failed write's error, once.
    py::object drain() {
        engine_.check_thread();
        engine_.flush();
        if (write_error_)
            raise(make_error(std::exchange(write_error_, {}), peer_, closed_, write_detail_));
        if (writes_outstanding_ == 0) return py::none();
        if (closed_) raise(error_closed());
        py::object fut = engine_.create_future();
        drain_waiters_.push_back(fut);
        return fut;
    }

private:
    std::unique_ptr<Channel> make_channel(engine::Fd fd, bool connector) {
        sockaddr_storage ss{};
        socklen_t len = sizeof ss;
        if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len) < 0)
            raise_errno(PyExc_OSError, errno, "getsockname on the adopted socket failed");
        int type = 0;
        socklen_t tlen = sizeof type;
        if (::getsockopt(fd.get(), SOL_SOCKET, SO_TYPE, &type, &tlen) < 0)
            raise_errno(PyExc_OSError, errno, "getsockopt(SO_TYPE) on the adopted socket failed");
        auto ch = std::make_unique<Channel>();
        if ((ss.ss_family == AF_INET || ss.ss_family == AF_INET6) && type == SOCK_STREAM)
            ch->kind = Transport::tcp;
        else if (ss.ss_family == AF_UNIX && type == SOCK_STREAM)
            ch->kind = Transport::unix_stream;
        else if (ss.ss_family == AF_UNIX && type == SOCK_SEQPACKET)
            ch->kind = Transport::shm;
        else
            throw py::value_error("ringxfer connections run over TCP, Unix stream sockets or shm "
                                  "rendezvous sockets (Unix SOCK_SEQPACKET)");
        engine::BufferPool* reader_pool = nullptr;
        if (ch->kind == Transport::shm) {
            engine::ShmStreamOptions so;
            // Never spin inside the ring: the event loop sleeps on the
            // completion descriptor, and a stream that answered "spin" rather
            // than arming its futex wait would not be woken by its peer.
            // Busy polling is the Engine's (busy_poll_us): it polls the
            // stream through advance().
            so.spin = std::chrono::microseconds(0);
            try {
                engine::BufferPool& shared = engine_.shm_pool();
                ch->stream = engine_.driver().make_shm_stream(std::move(fd), shared, connector, so);
                ch->pool = &shared;
            } catch (const engine::Error& e) {
                raise(errors_module().attr("ShmError")(
                    e.code(), std::string(e.what()) +
                                  ": io_uring is unavailable here or backend='epoll' was asked "
                                  "for; use transport='unix' or 'tcp' instead"));
            }
            // Headers and small frames are copied out of shared memory into
            // staging, leased from the process-private pool; larger payloads
            // become frames on the peer's memory (take_payload).
            reader_pool = &engine_.pool(false);
        } else {
            engine::tune_socket(fd.get(), engine::SocketTuning{});
            ch->pool = reader_pool = &engine_.pool(ch->kind == Transport::tcp);
            ch->stream = engine_.driver().make_stream(std::move(fd), engine::SocketStreamOptions{});
        }
        ch->reader = std::make_unique<proto::FrameReader>(
            *ch->stream, *reader_pool,
            proto::ReaderOptions{.max_frame = options_.max_frame,
                                 .staging_bytes = options_.recv_buffer,
                                 // an idle connection holds a page
                                 .initial_staging_bytes = 4096});
        ch->writer = std::make_unique<proto::FrameWriter>(
            *ch->stream,
            proto::WriterOptions{.max_bytes_in_flight = std::numeric_limits<std::size_t>::max(),
                                 .checksum = options_.checksum});
        return ch;
    }

    /// True when every part lies in `ch`'s shared pool: the shm stream sends
    /// them by reference (a descriptor each, no copy).
    static bool lent_by_reference(const Channel& ch, const std::vector<engine::Lease>& parts) {
        engine::SharedLocation where;
        for (const engine::Lease& p : parts)
            if (p.size() <= engine::kShmInlineBodyMax || !ch.pool->locate(p, where)) return false;
        return !parts.empty();
    }

    std::shared_ptr<SendState> submit(py::args parts, bool written) {
        std::vector<engine::Lease> leases;
        leases.reserve(parts.size());
        engine::Lease empty;
        for (py::handle p : parts) {
            engine::Lease l;
            if (py::isinstance<PyFrame>(p)) {
                PyFrame& f = p.cast<PyFrame&>();
                f.check();
                l = f.frame.lease().share();
            } else {
                l = wrap_buffer(p);
            }
            // Empty parts carry nothing and are left out (the shm stream
            // never completed a zero-length part queued behind another);
            // a frame of nothing but empty parts is one empty part.
            if (l.size() > 0)
                leases.push_back(std::move(l));
            else if (!empty)
                empty = std::move(l);
        }
        if (leases.empty()) leases.push_back(std::move(empty));
        auto st = std::make_shared<SendState>();
        st->conn = weak_from_this();
        Channel& ch = *tx_;
        st->channel = &ch;
        st->lent = ch.kind == Transport::shm && lent_by_reference(ch, leases);
        st->written = written && !st->lent;
        ch.sends_outstanding++;
        sends_outstanding_++;
        writes_outstanding_ += st->written;
        frames_sent_ += st->lent;
        if (leases.size() == 1) {
            proto::Frame f(std::move(leases[0]));
            ch.writer->try_write(f, [this, st](proto::Frame sent, std::error_code ec) mutable {
                st->frame = std::move(sent);
                on_send_done(std::move(st), ec);
            });
        } else {
            ch.writer->try_write_gather(leases, 0, [this, st](std::error_code ec) mutable {
                on_send_done(std::move(st), ec);
            });
        }
        return st;
    }

public:
    // --- Same-host upgrade (docs/design.md): ringxfer/_upgrade.py agrees on
    // it with the peer over a rendezvous socket and the connection's own
    // control frames; these are its moves.

    /// Upgrade control frames received (their JSON) and "switched" once both
    /// directions run on shared memory go to `handler(kind, payload)`.
    void set_upgrade_handler(py::object handler) { upgrade_handler_ = std::move(handler); }

    /// Sends a control frame (flag bit 1) holding `json` on the channel
    /// frames are written to, in order with the frames written before it.
    void send_control(const std::string& json) {
        engine_.check_thread();
        if (closed_) raise(error_closed());
        write_control(*tx_, json);
        engine_.flush();
    }

    /// Makes the shm channel over the rendezvous socket `fd` (owned from
    /// here on) and starts its handshake; nothing is read from or written to
    /// it until the switch.
    void prepare_upgrade(int fd, bool connector) {
        engine_.check_thread();
        engine::Fd owned(fd);
        if (closed_ || next_) throw std::runtime_error("no upgrade can be prepared now");
        auto ch = make_channel(std::move(owned), connector);
        if (ch->kind != Transport::shm)
            throw py::value_error("prepare_upgrade() takes an shm rendezvous socket");
        next_ = ch.get();
        channels_.push_back(std::move(ch));
        engine_.flush();
    }

    /// From now on frames are written to the prepared shm channel; the
    /// switch marker, written last on the old one, tells the peer where its
    /// reading moves over.
    void switch_sends() {
        engine_.check_thread();
        if (!next_ || tx_ == next_) throw std::runtime_error("no prepared upgrade to switch to");
        switch_sends_now();
        engine_.flush();
    }

    py::object allocate(std::size_t n) {
        engine_.check_thread();
        if (!tx_) raise(error_closed());
        PyFrame f;
        int ret = proto::Frame::allocate(*tx_->pool, n, f.frame);
        if (ret == -EMSGSIZE)
            throw py::value_error("allocate(" + std::to_string(n) +
                                  "): larger than the pool's largest buffer (1 GiB)");
        if (ret == -ENOBUFS)
            raise(errors_module().attr("BufferPoolExhausted")(
                "allocate(" + std::to_string(n) +
                    "): the buffer pool's budget is used up by frames still held; "
                    "release frames or raise pool_budget",
                "no_buffer"));
        if (ret < 0) raise_errno(PyExc_MemoryError, -ret, "allocate: cannot map pool memory");
        return py::cast(std::move(f));
    }

    void close() {
        engine_.check_thread();
        if (closed_) return;
        closed_ = true;
        for (auto& ch : channels_) ch->stream->close();
        engine_.poll();
        finish_close_if_idle();
    }

    /// None once the socket is closed, else a future resolved then.
    py::object wait_closed() {
        engine_.check_thread();
        if (channels_.empty()) return py::none();
        py::object fut = engine_.create_future();
        close_waiters_.push_back(fut);
        engine_.waiting_++;
        return fut;
    }

    bool is_closing() const { return closed_; }
    bool at_eof() const { return ready_.empty() && end_ == proto::Errc::closed; }
    const std::string& peer() const { return peer_; }
    const char* transport() const { return transport_name(transport_); }

    py::dict counters() const {
        Totals t = totals_;
        for (const auto& ch : channels_) t.add(*ch);
        py::dict d;
        d["frames_received"] = frames_received_;
        d["frames_sent"] = frames_sent_;
        d["bytes_received"] = t.s.bytes_received;
        d["bytes_sent"] = t.s.bytes_sent;
        d["receive_copied_bytes"] = t.r.copied_bytes + t.s.recv_copied_bytes + upgrade_copied_bytes_;
        d["send_copied_bytes"] = t.s.send_copied_bytes;
        d["frames_queued"] = ready_.size();
        d["writes_in_flight"] = writes_outstanding_;
        d["sends_gathered"] = t.s.gathered_sends;
        d["recv_ops"] = t.s.recv_ops;
        d["bytes_queued"] = ready_bytes_;
        d["sends_in_flight"] = sends_outstanding_;
        d["by_reference_sends"] = t.s.by_reference_sends;
        d["by_reference_recvs"] = t.r.referenced_frames;
        d["shm_upgraded"] = int(next_ != nullptr && rx_ == next_ && tx_ == next_);
        return d;
    }

    /// Engine::dispatch: something this connection waits for happened.
    void on_woken() {
        woken_queued_ = false;
        if (!events_.empty()) {
            auto events = std::move(events_);
            events_.clear();
            if (rx_ == next_ && tx_ == next_) retire_idle_channels();
            for (auto& [kind, payload] : events) {
                if (!upgrade_handler_) continue;
                try {
                    upgrade_handler_(kind, py::bytes(payload));
                } catch (py::error_already_set& e) {
                    e.discard_as_unraisable("ringxfer: the upgrade handler");
                }
            }
        }
        if (recv_waiter_) {
            if (recv_waiter_.attr("done")().cast<bool>()) {  // cancelled
                set_recv_waiter(py::object());
            } else if (!ready_.empty()) {
                py::object fut = set_recv_waiter(py::object());
                fut.attr("set_result")(pop_frame());
            } else if (end_ || closed_) {
                py::object fut = set_recv_waiter(py::object());
                fut.attr("set_exception")(error());
            }
        }
        if (closed_) finish_close_if_idle();
    }

    void deliver_send(SendState& st) {
        if (rx_ && rx_ == next_ && tx_ == next_) retire_idle_channels();
        if (st.control) {
            if (closed_) finish_close_if_idle();
            return;
        }
        frames_sent_ += st.ec || st.lent ? 0 : 1;  // a lent frame counted when handed over
        if (st.written) {
            writes_outstanding_--;
            if (st.ec && !write_error_) {
                write_error_ = st.ec;
                write_detail_ = st.detail;
            }
            if (writes_outstanding_ == 0 || write_error_) resolve_drains();
        }
        if (st.future) {
            py::object fut = py::reinterpret_borrow<py::object>(st.future.get());
            if (!fut.attr("done")().cast<bool>()) {
                if (st.ec)
                    fut.attr("set_exception")(make_error(st.ec, peer_, closed_, st.detail));
                else
                    fut.attr("set_result")(py::none());
            }
        }
        if (closed_) finish_close_if_idle();
    }

private:
    /// Every waiting drain() learns the same outcome; an error is said once
    /// a drain() was there to hear it (else the next drain() or write()).
    void resolve_drains() {
        auto waiters = std::move(drain_waiters_);
        drain_waiters_.clear();
        const std::error_code ec = write_error_;
        bool told = false;
        for (py::object& fut : waiters) {
            if (fut.attr("done")().cast<bool>()) continue;  // cancelled
            told = true;
            if (ec)
                fut.attr("set_exception")(make_error(ec, peer_, closed_, write_detail_));
            else
                fut.attr("set_result")(py::none());
        }
        if (told) write_error_ = {};
    }

    py::object set_recv_waiter(py::object fut) {
        if (recv_waiter_ && !fut) engine_.waiting_--;
        if (!recv_waiter_ && fut) engine_.waiting_++;
        return std::exchange(recv_waiter_, std::move(fut));
    }

    bool room() const {
        return ready_.empty() || ready_bytes_ < options_.read_ahead;
    }

    // Keeps one read in flight while the queue has room. A loop, not
    // recursion: read() may deliver at once when the frame is buffered.
    void pump_reader() {
        if (pumping_) return;
        pumping_ = true;
        while (!reading_ && !end_ && !closed_ && rx_ && room()) {
            reading_ = true;
            rx_->reader->read([this](proto::Frame f, std::error_code ec) { on_frame(std::move(f), ec); });
        }
        pumping_ = false;
    }

    static constexpr std::string_view kUpgradePrefix = R"({"type":"shm-)";
    static constexpr std::string_view kSwitchMarker = R"({"type":"shm-switch"})";

    static bool is_upgrade_control(const proto::Frame& f, std::string_view& text) {
        if (!f.is_control()) return false;
        auto p = f.payload();
        text = std::string_view(reinterpret_cast<const char*>(p.data()), p.size());
        return text.starts_with(kUpgradePrefix);
    }

    void write_control(Channel& ch, std::string_view json) {
        proto::Frame f;
        if (proto::Frame::allocate(*ch.pool, json.size(), f, proto::kFlagControl) < 0)
            throw std::runtime_error("cannot lease a control frame");
        std::memcpy(f.mutable_payload().data(), json.data(), json.size());
        auto st = std::make_shared<SendState>();
        st->conn = weak_from_this();
        st->channel = &ch;
        st->control = true;
        ch.sends_outstanding++;
        sends_outstanding_++;
        ch.writer->try_write(f, [this, st](proto::Frame sent, std::error_code ec) mutable {
            st->frame = std::move(sent);
            on_send_done(std::move(st), ec);
        });
    }

    // No GIL needed: the marker's buffer and send are engine objects.
    void switch_sends_now() {
        write_control(*tx_, kSwitchMarker);
        tx_ = next_;
        transport_ = Transport::shm;
        if (rx_ == next_) note_switched();
    }

    void note_switched() {
        events_.emplace_back("switched", std::string());
        wake_for_events();
    }

    void wake_for_events() {
        if (!woken_queued_) {
            woken_queued_ = true;
            engine_.wake(weak_from_this());
        }
    }

    /// An upgrade control frame from the peer (completion handler: no GIL).
    void on_upgrade_control(std::string_view text) {
        if (text != kSwitchMarker) {
            events_.emplace_back("control", std::string(text));
            wake_for_events();
            return;
        }
        // The peer's last frame on this channel: the rest comes over shared
        // memory. Only after we proved the peer's token (prepare_upgrade).
        if (!next_ || rx_ == next_) {
            end_ = std::make_error_code(std::errc::protocol_error);
            end_detail_ = "the peer moved the connection to shared memory without an agreed upgrade";
            return;
        }
        rx_ = next_;
        if (tx_ != next_)
            switch_sends_now();
        else
            note_switched();
    }

    /// A channel nothing reads from or writes to any more, with no send out,
    /// is closed (after an upgrade: the old socket).
    void retire_idle_channels() {
        for (auto it = channels_.begin(); it != channels_.end();) {
            Channel* c = it->get();
            if (c != rx_ && c != tx_ && c != next_ && c->sends_outstanding == 0) {
                totals_.add(*c);
                it = channels_.erase(it);
            } else {
                ++it;
            }
        }
    }

    // Completion handler: no GIL, no Python.
    void on_frame(proto::Frame f, std::error_code ec) {
        reading_ = false;
        std::string_view text;
        if (!ec && is_upgrade_control(f, text)) {
            on_upgrade_control(text);
            if (end_) wake_for_events();
            pump_reader();
            return;
        }
        if (ec) {
            if (!end_) {
                end_ = ec;
                end_detail_ = rx_->stream->error_message();
            }
        } else {
            ready_bytes_ += f.size();
            ready_.push_back(std::move(f));
            frames_received_++;
        }
        if ((recv_waiter_ || closed_) && !woken_queued_) {
            woken_queued_ = true;
            engine_.wake(weak_from_this());
        }
        pump_reader();
    }

    void on_send_done(std::shared_ptr<SendState> st, std::error_code ec) {
        st->done = true;
        st->ec = ec;
        if (ec) st->detail = st->channel->stream->error_message();
        st->channel->sends_outstanding--;
        sends_outstanding_--;
        engine_.send_done(std::move(st));
    }

    py::object pop_frame() {
        PyFrame pf;
        pf.frame = std::move(ready_.front());
        ready_.pop_front();
        ready_bytes_ -= pf.frame.size();
        // A connection upgraded on its own keeps the semantics it had:
        // frames private and writable, never pinning the sender's memory (a
        // receiver that keeps frames would hold the sender's slabs, and the
        // sender's copied sends wait for their release). One copy out of the
        // peer's memory, where TCP had the kernel's two; explicit
        // transport="shm" keeps the views (zero copies).
        if (next_ && pf.frame.lease().read_only()) {
            proto::Frame own;
            const std::size_t n = pf.frame.size();
            if (proto::Frame::allocate(engine_.pool(false), n, own, pf.frame.flags()) == 0) {
                {
                    py::gil_scoped_release nogil;
                    std::memcpy(own.mutable_payload().data(), pf.frame.payload().data(), n);
                }
                pf.frame = std::move(own);
                upgrade_copied_bytes_ += n;
            }  // else (pool budget used up): the view, read-only
        }
        // A payload on the shm peer's memory: the buffer protocol says so,
        // and a write through a view raises instead of faulting.
        pf.readonly = pf.frame.lease().read_only();
        pump_reader();
        return py::cast(std::move(pf));
    }

    py::object error_closed() const { return make_error({}, peer_, true); }
    // After close() every operation says so, whatever the cancelled reader
    // saw last (shutdown() ends a waiting recv as if the peer had closed).
    py::object error() const {
        if (!closed_ && end_) return make_error(end_, peer_, false, end_detail_);
        return error_closed();
    }

    void finish_close_if_idle() {
        if (!closed_ || reading_ || sends_outstanding_ > 0 || channels_.empty()) return;
        for (const auto& ch : channels_) totals_.add(*ch);
        rx_ = tx_ = next_ = nullptr;
        channels_.clear();  // closes the sockets
        upgrade_handler_ = py::object();  // it may refer to the Connection
        for (py::object& fut : close_waiters_) {
            engine_.waiting_--;
            if (!fut.attr("done")().cast<bool>()) fut.attr("set_result")(py::none());
        }
        close_waiters_.clear();
    }

    py::object engine_ref_;
    Engine& engine_;
    ConnOptions options_;
    std::string peer_;
    // Every live channel (one; two during an upgrade), and the ones frames
    // are read from and written to.
    std::vector<std::unique_ptr<Channel>> channels_;
    Channel* rx_ = nullptr;
    Channel* tx_ = nullptr;
    Channel* next_ = nullptr;  // the shm channel an upgrade moves to
    // Upgrade events for the Python handler: ("control", json), ("switched", "").
    std::vector<std::pair<std::string, std::string>> events_;
    py::object upgrade_handler_;
    Transport transport_ = Transport::tcp;  // tx_'s, kept after close
    Totals totals_;  // of the channels that are gone
    std::deque<proto::Frame> ready_;
    std::size_t ready_bytes_ = 0;
    std::error_code end_;  // why the reader stopped for good (closed: clean)
    std::string end_detail_;  // what the stream said about it (shm: a forged descriptor, ...)
    bool reading_ = false;
    bool pumping_ = false;
    bool closed_ = false;
    bool woken_queued_ = false;
    std::size_t sends_outstanding_ = 0;
    std::size_t writes_outstanding_ = 0;
    std::error_code write_error_;  // the first failed write's, until drain() or write() says it
    std::string write_detail_;
    std::vector<py::object> drain_waiters_;
    std::uint64_t frames_received_ = 0, frames_sent_ = 0;
    std::uint64_t upgrade_copied_bytes_ = 0;  // frames copied out of an upgrade's peer memory
    py::object recv_waiter_;
    std::vector<py::object> close_waiters_;
};

bool Engine::dispatch() {
    bool any = false;
    if (!warnings_.empty()) {
        auto w = std::move(warnings_);
        warnings_.clear();
        for (const std::string& s : w) warn(s);
    }
    // Swap with spare vectors: handlers run during the callbacks below may
    // append again, and steady state allocates nothing.
    while (!sends_done_.empty() || !woken_.empty()) {
        any = true;
        std::swap(sends_done_, sends_spare_);
        for (auto& st : sends_spare_) {
            if (auto c = st->conn.lock()) c->deliver_send(*st);
        }
        sends_spare_.clear();  // drops sent frames and buffer exports, GIL held
        std::swap(woken_, woken_spare_);
        for (auto& w : woken_spare_) {
            if (auto c = w.lock()) c->on_woken();
        }
        woken_spare_.clear();
    }
    return any;
}

py::dict Engine::pool_stats() {
    py::dict out;
    for (auto [name, p] : {std::pair{"tcp", pool_tcp_.get()}, std::pair{"unix", pool_unix_.get()},
                           std::pair{"shm", pool_shm_.get()}}) {
        if (!p) continue;
        engine::PoolStats s = p->stats();
        py::dict d;
        d["leased_buffers"] = s.leased_buffers;
        d["leased_bytes"] = s.leased_bytes;
        d["free_buffers"] = s.free_buffers;
        d["free_bytes"] = s.free_bytes;
        d["mapped_bytes"] = s.mapped_bytes;
        d["registered_bytes"] = s.registered_bytes;
        d["regions"] = s.regions;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        d["failures"] = s.failures;
        d["registration_failed"] = s.registration_failed;
        d["budget_bytes"] = p->options().budget_bytes;
        out[name] = d;
    }
    return out;
}

}  // namespace
}  // namespace ringxfer::python

PYBIND11_MODULE(_core, m) {
    using namespace ringxfer::python;
    namespace engine = ringxfer::engine;
    m.doc() = "ringxfer's engine for Python (use the ringxfer package, not this module)";

    auto frame = py::class_<PyFrame>(m, "Frame", py::buffer_protocol(), R"doc(
A complete received message (or a buffer from Connection.allocate()), in a
pooled buffer. It supports the buffer protocol: memoryview(frame) and
numpy.frombuffer(frame) see its bytes without a copy. The memory goes back to
the pool on release() or when the Frame is collected, never while a view
of it is alive: release() raises BufferError then.)doc");
    frame.attr("__module__") = "ringxfer";
    auto* type = reinterpret_cast<PyTypeObject*>(frame.ptr());
    type->tp_as_buffer->bf_getbuffer = frame_getbuffer;
    type->tp_as_buffer->bf_releasebuffer = frame_releasebuffer;
    frame
        .def("__len__", [](const PyFrame& f) { f.check(); return f.frame.size(); })
        .def_property_readonly("nbytes", [](const PyFrame& f) { f.check(); return f.frame.size(); })
        .def_property_readonly("readonly", [](const PyFrame& f) { return f.readonly; })
        .def_property_readonly("released", [](const PyFrame& f) { return f.released; })
        .def_property_readonly("registered", [](const PyFrame& f) {
            f.check();
            return f.frame.lease().buf_index() >= 0;
        }, "True when the buffer is registered with the kernel (io_uring fixed buffer).")
        .def("release", &PyFrame::release, R"doc(
Gives the buffer back to the pool now. Raises BufferError while a memoryview,
numpy array or other buffer view still uses it; afterwards every access
raises ValueError. Idempotent.)doc")
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__", [](PyFrame& f, py::args) { f.release(); return false; })
        .def("__repr__", [](const PyFrame& f) {
            if (f.released) return std::string("<ringxfer.Frame released>");
            return "<ringxfer.Frame " + std::to_string(f.frame.size()) + " bytes>";
        });

    py::class_<Engine>(m, "Engine")
        .def(py::init([](py::object loop, std::string backend, double busy_poll_us,
                         std::size_t pool_budget, bool register_buffers) {
                 if (busy_poll_us < 0 || busy_poll_us > 1e6)
                     throw py::value_error("busy_poll must be between 0 and 1e6 microseconds");
                 return std::make_unique<Engine>(
                     loop, EngineOptions{backend, busy_poll_us, pool_budget, register_buffers});
             }),
             py::arg("loop"), py::arg("backend") = "auto", py::arg("busy_poll_us") = 0.0,
             py::arg("pool_budget") = std::size_t{4} << 30, py::arg("register_buffers") = true)
        .def("fileno", &Engine::fileno)
        .def("pump", &Engine::pump)
        .def("flush_writes", &Engine::flush_writes)
        .def_property_readonly("backend", &Engine::backend)
        .def("describe", &Engine::describe)
        .def("pool_stats", &Engine::pool_stats);

    py::class_<Conn, std::shared_ptr<Conn>>(m, "Conn")
        .def(py::init([](py::object engine, int fd, std::uint64_t max_frame, bool checksum,
                         std::size_t read_ahead, std::size_t recv_buffer, bool connector) {
                 engine.cast<Engine&>().check_thread();
                 auto c = std::make_shared<Conn>(
                     engine, fd, ConnOptions{max_frame, checksum, read_ahead, recv_buffer},
                     connector);
                 c->start();
                 return c;
             }),
             py::arg("engine"), py::arg("fd"), py::arg("max_frame"), py::arg("checksum"),
             py::arg("read_ahead"), py::arg("recv_buffer"), py::arg("connector") = false)
        .def("recv", &Conn::recv)
        .def("unrecv", &Conn::unrecv)
        .def("send", &Conn::send)
        .def("write", &Conn::write)
        .def("drain", &Conn::drain)
        .def("allocate", &Conn::allocate)
        .def("close", &Conn::close)
        .def("wait_closed", &Conn::wait_closed)
        .def("is_closing", &Conn::is_closing)
        .def("at_eof", &Conn::at_eof)
        .def_property_readonly("peer", &Conn::peer)
        .def_property_readonly("transport", &Conn::transport)
        .def("counters", &Conn::counters)
        .def("set_upgrade_handler", &Conn::set_upgrade_handler)
        .def("send_control", &Conn::send_control)
        .def("prepare_upgrade", &Conn::prepare_upgrade, py::arg("fd"), py::arg("connector"))
        .def("switch_sends", &Conn::switch_sends);

    m.def(
        "listen",
        [](const std::string& address, int backlog) {
            try {
                engine::Endpoint ep = engine::Endpoint::parse(address);
                engine::Fd fd = engine::listen_on(ep, backlog);
                engine::Endpoint bound = engine::local_endpoint(fd.get(), ep.kind);
                py::object where = bound.kind == engine::Endpoint::Kind::tcp
                                       ? py::object(py::make_tuple(bound.host, bound.port))
                                       : py::object(py::str(bound.path));
                return py::make_tuple(fd.release(), where);
            } catch (const engine::Error& e) {
                raise_errno(PyExc_OSError, e.code(), e.what());
            }
        },
        py::arg("address"), py::arg("backlog"),
        "Binds and listens on 'HOST:PORT', '[V6]:PORT' or 'unix:PATH' (a stale socket file "
        "is replaced, a live server's never); returns (fd, bound address).");
}
