"""The asyncio API: start_server(), open_connection(), Connection, Server.

Connections are made by the event loop (loop.sock_connect / sock_accept);
from then on the socket belongs to the engine, which is driven from the same
loop through loop.add_reader() on its completion descriptor. No thread is
started.
"""

import asyncio
import errno
import os
import socket
import stat
import weakref

from . import _core, _upgrade
from .errors import ConnectionClosed, ProtocolError, ShmError

__all__ = ["Connection", "Server", "open_connection", "start_server", "DEFAULTS"]

#: Connection options and their defaults (the CLI's, where it has them).
DEFAULTS = {
    # Longest frame accepted from the peer; a longer one is refused from its
    # header, before anything is allocated (`ringxfer serve --max-frame`).
    "max_frame": 1 << 30,
    # Send a CRC32C of each payload in its header (`bench --checksum`);
    # received checksums are always verified.
    "checksum": False,
    # How long a recv() that finds no frame (or a wake-up that finds
    # nothing) polls the ring before it returns to the event loop, in
    # microseconds (`bench --busy-poll auto|US`); 0: never. It spends the
    # loop's CPU while it waits and saves a sleep and a wake-up per frame
    # that arrives meanwhile. "auto", as the CLI's: 50 when this process may
    # run on two CPUs or more (the waiting loop and its peer each keep one),
    # else 0.
    "busy_poll_us": "auto",
    # io_uring, or epoll where io_uring is unavailable (`--backend`).
    "backend": "auto",
    # Cap on the buffer pool's mapped memory per engine (`--pool-budget`).
    "pool_budget": 4 << 30,
    # Received frames queued ahead of recv() calls, in bytes (at least one
    # frame): beyond it the engine stops reading and TCP pushes back.
    "read_ahead": 8 << 20,
    # Bytes one receive may take (the reader's staging buffer): frames of up
    # to a quarter of it arrive several per receive, as views of it, with no
    # copy. An idle connection holds 4 KiB until its first bytes arrive.
    "recv_buffer": 512 << 10,
    # A TCP or Unix-stream connection between two ringxfer Python peers on
    # one host moves onto shared memory by itself when both ends have this
    # on (docs/python.md, "Same-host upgrade").
    "shm_upgrade": True,
}

_ENGINE_KEYS = ("backend", "busy_poll_us", "pool_budget")

#: busy_poll_us="auto" on a machine with two CPUs or more (the CLI's figure).
AUTO_BUSY_POLL_US = 50


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

# One engine per loop and engine settings. The loop holds an engine through
# its reader callback; the engine holds the loop weakly.
_engines = weakref.WeakKeyDictionary()


def _options(options):
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(
            f"unknown ringxfer option(s): {', '.join(sorted(unknown))} "
            f"(known: {', '.join(DEFAULTS)})")
    merged = dict(DEFAULTS)
    merged.update(options)
    if merged["backend"] not in ("auto", "uring", "io_uring", "epoll"):
        raise ValueError(f"backend must be 'auto', 'uring' or 'epoll', not {merged['backend']!r}")
    if merged["busy_poll_us"] == "auto":
        merged["busy_poll_us"] = AUTO_BUSY_POLL_US if _cpus() >= 2 else 0
    elif isinstance(merged["busy_poll_us"], bool) or not isinstance(merged["busy_poll_us"], (int, float)):
        raise ValueError(f"busy_poll_us must be 'auto' or a number of microseconds, "
                         f"not {merged['busy_poll_us']!r}")
    for name in ("max_frame", "pool_budget", "read_ahead"):
        if not isinstance(merged[name], int) or merged[name] < 0:
            raise ValueError(f"{name} must be a non-negative int (bytes), not {merged[name]!r}")
    if not isinstance(merged["shm_upgrade"], bool):
        raise ValueError(f"shm_upgrade must be True or False, not {merged['shm_upgrade']!r}")
    rb = merged["recv_buffer"]
    if isinstance(rb, bool) or not isinstance(rb, int) or not 4096 <= rb <= 64 << 20:
        raise ValueError(f"recv_buffer must be an int from 4096 to 64 MiB (bytes), not {rb!r}")
    return merged


def _engine(loop, options):
    per_loop = _engines.get(loop)
    if per_loop is None:
        per_loop = _engines[loop] = {}
    key = tuple(options[k] for k in _ENGINE_KEYS)
    eng = per_loop.get(key)
    if eng is None:
        eng = _core.Engine(loop, options["backend"], float(options["busy_poll_us"]),
                           options["pool_budget"])
        loop.add_reader(eng.fileno(), eng.pump)
        per_loop[key] = eng
    return eng


def engine_info(loop=None, **options):
    """The engine the current loop uses for these options: its backend, its
    set-up and its buffer pools' statistics (for diagnostics)."""
    loop = loop or asyncio.get_running_loop()
    opts = _options(options)
    eng = _engine(loop, opts)
    return {"backend": eng.backend, "describe": eng.describe(),
            "busy_poll_us": opts["busy_poll_us"], "pools": eng.pool_stats()}


class Connection:
    """A framed, message-oriented connection.

    Made by :func:`open_connection` or handed to a :func:`start_server`
    callback. Frames are whole messages: :meth:`recv` returns one
    :class:`ringxfer.Frame` per :meth:`send` of the peer. Usable as an async
    context manager (closes on exit) and as an async iterator of frames
    (ends at a clean close).

    Not thread-safe: use it from the loop that made it.
    """

    def __init__(self, core, engine, options, sockname=None, peeraddr=None):
        self._core = core
        self._engine = engine
        self._options = options
        self._sockname = sockname
        self._peeraddr = peeraddr
        self._broken = None  # the ProtocolError that ended the stream
        # Same-host upgrade: settled True once on shared memory, False when
        # it will not happen; the token future while a client attempt waits.
        self._upgrade_done = asyncio.get_running_loop().create_future()
        self._upgrade_token = None
        self._upgrade_task = None
        if options["shm_upgrade"] and core.transport != "shm":
            ref = weakref.ref(self)
            core.set_upgrade_handler(lambda kind, payload: _upgrade.on_event(ref, kind, payload))
        else:
            self._upgrade_done.set_result(False)

    # -- receiving --------------------------------------------------------

    async def recv(self):
        """The next whole frame, as a :class:`ringxfer.Frame`.

        Raises :class:`ringxfer.ConnectionClosed` (an ``EOFError``) when the
        peer closed cleanly between frames; :class:`ringxfer.ProtocolError`
        (a ``ConnectionError``) when the stream broke the wire format
        (``cause`` says how: a close inside a frame, a bad header, a frame
        above ``max_frame``, ...); ``ConnectionAbortedError`` after
        :meth:`close`; the errno's ``OSError`` subclass on a transport error.

        Cancellation (``asyncio.wait_for`` timing out, a cancelled task)
        loses nothing: a frame that arrived meanwhile stays queued and the
        next ``recv()`` returns it. One ``recv()`` may wait at a time.
        """
        if self._broken is not None:
            # Closed because of it, not by close(): say it again.
            raise type(self._broken)(str(self._broken), self._broken.cause)
        try:
            r = self._core.recv()
            if type(r) is _core.Frame:
                return r
            try:
                return await r
            except asyncio.CancelledError:
                # The frame may have been handed over just before the cancel
                # landed: put it back, so the next recv() returns it.
                if r.done() and not r.cancelled() and r.exception() is None:
                    self._core.unrecv(r.result())
                raise
        except ProtocolError as e:
            # The stream cannot be resumed: drop the peer, as `ringxfer
            # serve` does; later recv() calls raise the same error.
            self._broken = e
            self.close()
            raise

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    # -- sending ----------------------------------------------------------

    async def send(self, buf, *more):
        """Sends one frame whose payload is ``buf`` followed by ``more``.

        Each part is a bytes-like object (bytes, bytearray, memoryview, a
        C-contiguous numpy array) or a :class:`ringxfer.Frame`. The parts
        are gathered into one send by the kernel, never joined in Python or
        copied by ringxfer: the kernel reads them where they are.

        The caller may reuse or modify the parts' memory as soon as this
        returns: the kernel has taken every byte by then. Until then each
        part is held (a buffer export: a bytearray cannot be resized).
        A cancelled ``send()`` still sends the whole frame (frames are
        never torn) and holds the parts until the kernel is done with
        them; a later ``send()`` returning, or :meth:`wait_closed`,
        says it is.

        Frames from :meth:`allocate` (or received ones) are sent from the
        registered pool buffer itself.
        """
        fut = self._core.send(buf, *more)
        if fut is not None:
            await fut

    def write(self, buf, *more):
        """Queues one frame whose payload is ``buf`` followed by ``more``
        and returns at once, as ``asyncio.StreamWriter.write()`` does.

        The parts are the same as :meth:`send`'s and are not copied either:
        each is held (a buffer export) until the kernel has taken its
        bytes, so **do not modify a written part's memory before**
        ``await conn.drain()`` **returns** (``bytes`` cannot change, so
        bytes may be written and forgotten). Frames written before the loop
        runs its next callback leave together: the kernel is entered once
        for them and gathers up to 128 frames (1 MiB) per SENDMSG, where
        ``await send()`` enters it once per frame. A write that fails
        raises from the next :meth:`drain` or ``write()``."""
        self._core.write(buf, *more)

    async def drain(self):
        """Waits until the kernel has taken every frame written so far: then
        their memory is the caller's again. Raises the error of a failed
        write (``ConnectionResetError``, ...), or ``ConnectionAbortedError``
        after :meth:`close` cut the writes still queued. Cancelling a
        ``drain()`` cancels the wait only: the frames still go out whole."""
        fut = self._core.drain()
        if fut is not None:
            await fut

    def allocate(self, n):
        """A writable pooled buffer of ``n`` bytes (a :class:`ringxfer.Frame`)
        to fill in place (``memoryview(buf)``, ``numpy.frombuffer(buf,
        dtype)``) and pass to :meth:`send` with no copy at all."""
        return self._core.allocate(n)

    # -- closing ----------------------------------------------------------

    def close(self):
        """Closes the connection: a waiting recv() raises
        ``ConnectionAbortedError``; sends still in the kernel are cut.
        Idempotent."""
        if self._upgrade_task is not None:
            self._upgrade_task.cancel()
        self._core.close()

    def is_closing(self):
        return self._core.is_closing()

    def at_eof(self):
        """True when the peer closed cleanly and every frame it sent has
        been returned by :meth:`recv` (``asyncio.StreamReader.at_eof()``)."""
        return self._core.at_eof()

    async def wait_closed(self):
        """Waits until the socket is closed and the kernel holds none of
        this connection's buffers (call after :meth:`close`)."""
        fut = self._core.wait_closed()
        if fut is not None:
            await fut

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
        await self.wait_closed()

    async def wait_upgraded(self, timeout=_upgrade.UPGRADE_TIMEOUT):
        """Waits until the same-host upgrade is settled: True once both
        directions run over shared memory (``transport == "shm"``), False
        when it did not happen within ``timeout`` seconds (off, another
        host, a peer without the feature, a failure: the connection goes on
        as it was). Frames flow meanwhile either way."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._upgrade_done), timeout)
        except asyncio.TimeoutError:
            return False

    # -- information ------------------------------------------------------

    @property
    def peername(self):
        """The peer's address as text (``'127.0.0.1:53122'``, ``'unix'``)."""
        return self._core.peer

    def get_extra_info(self, name, default=None):
        """``'peername'`` and ``'sockname'``: the socket's addresses as the
        ``socket`` module gives them (``(host, port)`` for TCP, a path for
        Unix sockets), like ``asyncio.Transport.get_extra_info()``."""
        return {"peername": self._peeraddr, "sockname": self._sockname}.get(name, default)

    @property
    def transport(self):
        """``'tcp'``, ``'unix'`` or ``'shm'`` (shared memory: connected with
        ``transport="shm"``, or upgraded to it)."""
        return self._core.transport

    @property
    def counters(self):
        """Frames and bytes received and sent; payload bytes ringxfer
        copied in user space (``receive_copied_bytes``: bytes that arrived
        with a header, moved into their frame's buffer;
        ``send_copied_bytes``: lone frames of up to 240 payload bytes, copied
        next to their header into one SEND), as the CLI's JSON counts them;
        frames queued ahead of recv(), sends in flight, written frames the
        kernel has not taken yet (``writes_in_flight``), and frames that
        left in another frame's SENDMSG (``sends_gathered``), and receive
        operations the kernel ran (``recv_ops``)."""
        return self._core.counters()

    @property
    def backend(self):
        return self._engine.backend

    def __repr__(self):
        state = " closing" if self.is_closing() else ""
        return f"<ringxfer.Connection {self.transport} {self.peername}{state}>"


_TRANSPORTS = ("tcp", "unix", "shm")


def _pick_address(host, port, path, transport):
    """(kind, where): ("tcp", (host, port)), or ("unix" | "shm", path)."""
    if transport is not None and transport not in _TRANSPORTS:
        raise ValueError(f"transport must be 'tcp', 'unix' or 'shm', not {transport!r}")
    if path is not None:
        if host is not None or port is not None:
            raise TypeError("give either host/port or path, not both")
        if transport == "tcp":
            raise TypeError("transport='tcp' takes host and port, not path=")
        return transport or "unix", os.fspath(path)
    if transport in ("unix", "shm"):
        raise TypeError(f"transport={transport!r} needs path= (a socket path, '@name' for "
                        f"the abstract namespace)")
    if port is None:
        raise TypeError("a TCP address needs a port (or use path= for a Unix socket)")
    return "tcp", (host, int(port))


def _unix_sockaddr(path):
    return "\0" + path[1:] if path.startswith("@") else path


def _require_shm(eng):
    if eng.backend != "io_uring":
        raise ShmError(errno.EOPNOTSUPP,
                       f"the shm transport needs the io_uring backend, and this engine runs "
                       f"on {eng.backend} (io_uring is blocked here, or backend='epoll' was "
                       f"asked for): use transport='unix' or 'tcp'")


def _wrong_socket_kind(path, kind):
    if kind == "shm":
        return ShmError(errno.EPROTOTYPE,
                        f"{path!r} is a Unix stream socket, not an shm rendezvous (its server "
                        f"was started without transport='shm'): connect with "
                        f"transport='unix', or start the server with transport='shm'")
    return ShmError(errno.EPROTOTYPE,
                    f"{path!r} is an shm rendezvous (its server was started with "
                    f"transport='shm'), not a Unix stream socket: connect with transport='shm'")


async def _connect_unix(loop, path, kind, named=False):
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_SEQPACKET if kind == "shm" else socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if named:
            # An abstract name the kernel picks, unique on this host: what
            # an upgrade claim names the connection by (the server sees it
            # as the peer's name).
            sock.bind("")
        await loop.sock_connect(sock, _unix_sockaddr(path))
    except OSError as e:
        sock.close()
        if e.errno == errno.EPROTOTYPE:
            raise _wrong_socket_kind(path, kind) from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(host=None, port=None, *, path=None, transport=None, **options):
    """Connects to a ringxfer peer (``ringxfer serve``, :func:`start_server`,
    any wire-format-v1 program) at ``host:port`` over TCP or at the Unix
    socket ``path`` (``'@name'``: abstract namespace). ``transport="shm"``
    with ``path``: the same-host shared-memory transport, to a server started
    with ``transport="shm"`` (or ``ringxfer serve --listen shm:PATH``).
    Returns a :class:`Connection`. Options: see :data:`DEFAULTS`."""
    loop = asyncio.get_running_loop()
    opts = _options(options)
    kind, where = _pick_address(host, port, path, transport)
    eng = _engine(loop, opts)
    if kind == "shm":
        _require_shm(eng)
    upgrade = opts["shm_upgrade"] and kind != "shm" and eng.backend == "io_uring"
    if kind == "tcp":
        sock = await _connect_tcp(loop, where[0] or "localhost", where[1])
    else:
        sock = await _connect_unix(loop, where, kind, named=upgrade)
    try:
        sockname, peeraddr = sock.getsockname(), sock.getpeername()
    except BaseException:  # reset between connect and here
        sock.close()
        raise
    fd = sock.detach()
    core = _core.Conn(eng, fd, opts["max_frame"], bool(opts["checksum"]), opts["read_ahead"],
                      opts["recv_buffer"], connector=True)
    conn = Connection(core, eng, opts, sockname, peeraddr)
    if upgrade and _upgrade.same_host(sockname, peeraddr):
        # In the background: the server's token arrives in order with its
        # frames, behind whatever it sent first, and the caller may have to
        # read those before it can.
        conn._upgrade_task = loop.create_task(
            _upgrade.client_upgrade(conn, kind, peeraddr[1] if kind == "tcp" else where))
    else:
        _upgrade._settle(conn, False)
    return conn


async def _connect_tcp(loop, host, port):
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no addresses")
    errors = []
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as e:
            sock.close()
            errors.append(e)
        except BaseException:
            sock.close()
            raise
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"cannot connect to {host}:{port}: " + "; ".join(str(e) for e in errors))


class Server:
    """A listening ringxfer server (:func:`start_server`)."""

    def __init__(self, loop, lsock, address, callback, engine, options, rendezvous=None):
        self._loop = loop
        self._rendezvous = rendezvous
        self._lsock = lsock
        self._address = address
        self._callback = callback
        self._engine = engine
        self._options = options
        self._unix_inode = None
        if isinstance(address, str) and not address.startswith("@"):
            try:
                self._unix_inode = os.stat(address).st_ino
            except OSError:
                pass
        self._tasks = set()
        self._closed = loop.create_future()
        self._accepting = loop.create_task(self._accept_loop())
        # Not in the loop's `finally`: a task cancelled before it first ran
        # never runs its body, and wait_closed() would wait forever.
        self._accepting.add_done_callback(self._stopped)

    @property
    def address(self):
        """``(host, port)`` for TCP (the real port when 0 was asked), the
        socket path for a Unix socket."""
        return self._address

    @property
    def sockets(self):
        return () if self._lsock is None else (self._lsock,)

    def is_serving(self):
        return self._lsock is not None

    async def _accept_loop(self):
        try:
            while True:
                sock, peeraddr = await self._loop.sock_accept(self._lsock)
                try:
                    sockname = sock.getsockname()
                except OSError:  # reset before we looked: nothing to serve
                    sock.close()
                    continue
                fd = sock.detach()
                try:
                    core = _core.Conn(self._engine, fd, self._options["max_frame"],
                                      bool(self._options["checksum"]),
                                      self._options["read_ahead"],
                                      self._options["recv_buffer"])
                except Exception as e:  # the engine owned (and closed) the fd
                    self._loop.call_exception_handler(
                        {"message": "ringxfer: cannot serve an accepted connection",
                         "exception": e})
                    continue
                conn = Connection(core, self._engine, self._options, sockname, peeraddr)
                if self._rendezvous is not None:
                    self._rendezvous.add(conn)
                task = self._loop.create_task(self._serve(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except asyncio.CancelledError:
            pass
        except OSError as e:
            if self._lsock is not None:
                self._loop.call_exception_handler(
                    {"message": "ringxfer: accept failed; the server stopped accepting",
                     "exception": e})

    async def _serve(self, conn):
        try:
            await self._callback(conn)
        except Exception as e:
            # Like asyncio.start_server: the error is reported with the peer,
            # the connection is closed, every other client is served on.
            conn.close()
            self._loop.call_exception_handler({
                "message": f"ringxfer: unhandled exception in client_connected_cb "
                           f"(peer {conn.peername}); connection closed",
                "exception": e,
                "connection": conn,
            })

    def _stopped(self, _task):
        if not self._closed.done():
            self._closed.set_result(None)

    def close(self):
        """Stops accepting and closes the listening socket (and removes the
        Unix socket file this server created). Connections already made
        stay open."""
        if self._lsock is None:
            return
        self._accepting.cancel()
        if self._rendezvous is not None:
            self._rendezvous.close()
        lsock, self._lsock = self._lsock, None
        lsock.close()
        if self._unix_inode is not None:
            try:
                if os.stat(self._address).st_ino == self._unix_inode and \
                        stat.S_ISSOCK(os.stat(self._address).st_mode):
                    os.unlink(self._address)
            except OSError:
                pass

    async def wait_closed(self):
        """Waits until the server has stopped accepting."""
        await asyncio.shield(self._closed)

    async def serve_forever(self):
        try:
            await asyncio.shield(self._closed)
        finally:
            self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()
        await self.wait_closed()

    def __repr__(self):
        return f"<ringxfer.Server {self._address!r}{'' if self.is_serving() else ' closed'}>"


async def start_server(client_connected_cb, host=None, port=None, *, path=None,
                       transport=None, backlog=4096, **options):
    """Listens on ``host:port`` (TCP; ``host=None``: every IPv4 interface,
    ``port=0``: a free port) or on the Unix socket ``path`` (with
    ``transport="shm"``: the rendezvous of the same-host shared-memory
    transport), and runs ``await client_connected_cb(conn)`` in a task of
    its own for each connection. Returns a :class:`Server`;
    ``server.address`` says where it listens. Options: see :data:`DEFAULTS`."""
    loop = asyncio.get_running_loop()
    opts = _options(options)
    if path is None and port is None:
        raise TypeError("start_server needs a port (0: any free one) or path=")
    kind, where = _pick_address(host, port, path, transport)
    if kind == "tcp":
        h = where[0] or "0.0.0.0"
        address = f"[{h}]:{where[1]}" if ":" in h else f"{h}:{where[1]}"
    else:
        address = f"{kind}:{where}"
    eng = _engine(loop, opts)
    if kind == "shm":
        _require_shm(eng)
    fd, bound = _core.listen(address, backlog)
    lsock = socket.socket(fileno=fd)
    lsock.setblocking(False)
    rendezvous = None
    if opts["shm_upgrade"] and kind != "shm" and eng.backend == "io_uring":
        rendezvous = _upgrade.Rendezvous(loop, kind, bound[1] if kind == "tcp" else bound)
    return Server(loop, lsock, bound, client_connected_cb, eng, opts, rendezvous)
