"""Dask distributed comm backend for the ``ringxfer://`` scheme.

Registered through the ``distributed.comm.backends`` entry point of the
package's .dist-info, so ``ringxfer://HOST:PORT`` works wherever Dask takes
an address (``dask scheduler --protocol ringxfer``, ``dask worker
ringxfer://...``, ``Client("ringxfer://...")``, ``LocalCluster(protocol=
"ringxfer://")``) with no import by the user.

Addresses have the forms of ``tcp://`` and are answered by the same helpers.
A Dask message (the frames of ``distributed.comm.utils.to_frames``) travels
as ringxfer frames, one per Dask frame; the first also carries the number of
frames (4 bytes, gathered in front of it, not joined)::

    ringxfer frame 0: u32 little-endian N | Dask frame 0 (msgpack header)
    ringxfer frame i: Dask frame i, for i in 1..N-1

Received frames reach deserialisation as the pooled buffers they arrived in
(writable memoryviews of :class:`ringxfer.Frame`): a numpy array is built on
the buffer the kernel wrote, and the buffer goes back to the pool when the
last object using it is collected. Frames of up to a quarter of
``recv_buffer`` (128 KiB by default) arrive several to one shared receive
buffer; they are copied into their own ``bytearray`` so that data Dask keeps
pins nothing else.

Between two processes of one host (a ``LocalCluster``) a comm moves onto
shared memory by itself (the package's same-host upgrade); received frames
are then copied once out of the sender's memory. ``shm_upgrade: false`` in
the config entry below turns it off.

Options: the ``distributed.comm.ringxfer`` Dask config entry, a mapping of
:data:`ringxfer.DEFAULTS` options (``busy_poll_us``, ``max_frame``, ...);
``pool_budget`` defaults to the machine's memory limit here, since a worker
keeps received data as long as Dask's own memory management says.
See docs/dask.md.
"""

import logging
import struct
import weakref

import dask
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import Comm, CommClosedError, Connector, Listener
from distributed.comm.registry import Backend
from distributed.comm.utils import ensure_concrete_host, from_frames, to_frames
from distributed.system import MEMORY_LIMIT
from distributed.utils import ensure_ip, get_ip, get_ipv6, nbytes

from . import _stream
from .errors import ProtocolError

__all__ = ["RingxferBackend", "RingxferComm", "RingxferConnector", "RingxferListener"]

logger = logging.getLogger("distributed.comm.ringxfer")

PREFIX = "ringxfer://"
_COUNT = struct.Struct("<I")
#: Most Dask frames one message may have (a message announcing more is a
#: broken or hostile peer: the comm is closed).
MAX_FRAMES = 1 << 20


def _options():
    """ringxfer options for Dask's comms: the ``distributed.comm.ringxfer``
    config entry over the package's defaults, with ``pool_budget`` raised to
    the memory limit Dask itself works with."""
    opts = {"pool_budget": max(int(MEMORY_LIMIT), _stream.DEFAULTS["pool_budget"])}
    conf = dask.config.get("distributed.comm.ringxfer", default=None) or {}
    if not isinstance(conf, dict):
        raise TypeError(f"distributed.comm.ringxfer must be a mapping of ringxfer "
                        f"options, not {conf!r}")
    # Unknown names and bad values are refused by open_connection() and
    # start_server(), with the option named.
    opts.update({k.replace("-", "_"): v for k, v in conf.items()})
    return opts


def _check_encryption(address, connection_args):
    if connection_args.get("require_encryption"):
        raise RuntimeError(
            "encryption required by Dask configuration, refusing communication "
            f"from/to {PREFIX + address!r}: ringxfer:// does not encrypt (use tls:// "
            "or a trusted network: see ringxfer's docs/dask.md)")


def _address(sockaddr):
    return PREFIX + unparse_host_port(*sockaddr[:2])


def _close_dangling(conn, r):
    if not conn.is_closing():
        logger.warning("Closing dangling comm in %s", r)
        conn.close()


class RingxferComm(Comm):
    """An established ``ringxfer://`` comm: a :class:`ringxfer.Connection`
    carrying Dask messages."""

    def __init__(self, conn, local_addr, peer_addr, deserialize=True):
        self._closed = False
        super().__init__(deserialize=deserialize)
        self._conn = conn
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        opts = conn._options
        # One Dask frame is one ringxfer frame up to the peer's max_frame
        # (the same default on both sides): larger ones are split by Dask.
        self._split = opts["max_frame"]
        self._copy_upto = opts["recv_buffer"] // 4
        self._finalizer = weakref.finalize(self, _close_dangling, conn, repr(self))
        self._finalizer.atexit = False

    @property
    def local_address(self):
        return self._local_addr

    @property
    def peer_address(self):
        return self._peer_addr

    @property
    def connection(self):
        """The :class:`ringxfer.Connection` underneath (its counters, ...)."""
        return self._conn

    def _lost(self, conn, e):
        self._conn = None
        self._closed = True
        self._finalizer.detach()
        conn.close()
        raise CommClosedError(f"in {self!r}: {type(e).__name__}: {e}") from e

    def _take(self, frame, skip=0):
        """Frame `frame` past its first `skip` bytes, as Dask gets it: a
        writable view of the pooled buffer, or a copy when it is small or a
        read-only view of a shared-memory peer's memory (a worker keeps what
        it receives for as long as Dask says: it must not pin, or outlive,
        the sender's slab, and Dask wants writable arrays)."""
        view = memoryview(frame)
        if len(view) - skip > self._copy_upto and not view.readonly:
            return view[skip:] if skip else view
        with view, view[skip:] as part:
            small = bytearray(part)
        frame.release()
        return small

    async def read(self, deserializers=None):
        conn = self._conn
        if conn is None:
            raise CommClosedError(f"in {self!r}: closed")
        try:
            first = await conn.recv()
            n = _COUNT.unpack_from(first)[0] if len(first) >= _COUNT.size else 0
            if not 0 < n <= MAX_FRAMES:
                raise ProtocolError(
                    f"not a Dask message: its first frame ({len(first)} bytes) does not "
                    f"start with a frame count from 1 to {MAX_FRAMES}", "bad_message")
            frames = [self._take(first, _COUNT.size)]
            for _ in range(n - 1):
                frames.append(self._take(await conn.recv()))
        except (EOFError, ConnectionError, OSError) as e:
            self._lost(conn, e)
        except BaseException:
            # Cancelled (or interrupted) in the middle of a message: the rest
            # of it would be taken for the next one. Like tcp://, abort.
            self.abort()
            raise
        try:
            return await from_frames(frames, deserialize=self.deserialize,
                                     deserializers=deserializers,
                                     allow_offload=self.allow_offload)
        except EOFError:
            # Frames garbled or truncated by the sender (as tcp:// says it).
            self.abort()
            raise CommClosedError(f"in {self!r}: aborted stream on truncated data")

    async def write(self, msg, serializers=None, on_error="message"):
        if self._conn is None:
            raise CommClosedError(f"in {self!r}: closed")
        frames = await to_frames(
            msg,
            allow_offload=self.allow_offload,
            serializers=serializers,
            on_error=on_error,
            context={"sender": self.local_info, "recipient": self.remote_info,
                     **self.handshake_options},
            frame_split_size=self._split,
        )
        conn = self._conn
        if conn is None:
            raise CommClosedError(f"in {self!r}: closed")
        try:
            # Queued in one go (no await between): the frames leave gathered,
            # and two writers' messages never interleave. Like tcp://'s,
            # write() does not wait for the peer to take the bytes (a peer
            # that writes before it reads must not deadlock): the frames'
            # memory is held, not copied, until the kernel has sent it, and
            # a failed send raises from the next write() (or read()).
            conn.write(_COUNT.pack(len(frames)), frames[0])
            for f in frames[1:]:
                conn.write(f)
        except (EOFError, ConnectionError, OSError) as e:
            self._lost(conn, e)
        except BaseException:
            self.abort()
            raise
        return _COUNT.size + sum(nbytes(f) for f in frames)

    async def close(self):
        conn, self._conn = self._conn, None
        self._closed = True
        if conn is None:
            return
        self._finalizer.detach()
        try:
            await conn.drain()  # what was written goes out before the close
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            await conn.wait_closed()

    def abort(self):
        conn, self._conn = self._conn, None
        self._closed = True
        if conn is not None:
            self._finalizer.detach()
            conn.close()

    def closed(self):
        # Closed here, or an error seen by read() or write(); not the peer's
        # close as the engine already knows it (conn.at_eof()). Dask's
        # connection pool drops a comm that says it is closed and dials the
        # peer again, and connect() retries a refused dial for the whole
        # distributed.comm.timeouts.connect (30 s): a worker fetching from a
        # killed worker would wait that long. A comm that reads the peer's
        # end fails at once instead, and the worker asks the scheduler where
        # else the data is (test_dask_cluster.py).
        return self._closed

    @property
    def extra_info(self):
        conn = self._conn
        return {} if conn is None else {"backend": conn.backend}


class RingxferConnector(Connector):
    prefix = PREFIX

    async def connect(self, address, deserialize=True, **connection_args):
        _check_encryption(address, connection_args)
        host, port = parse_host_port(address)
        try:
            conn = await _stream.open_connection(host, port, **_options())
        except OSError as e:
            raise CommClosedError(f"in {self!r}: {type(e).__name__}: {e}") from e
        return RingxferComm(conn, _address(conn.get_extra_info("sockname")),
                            PREFIX + address, deserialize)


class RingxferListener(Listener):
    prefix = PREFIX  # Dask's workers log their address with it

    def __init__(self, address, comm_handler, deserialize=True, allow_offload=True,
                 default_host=None, default_port=0, **connection_args):
        _check_encryption(address, connection_args)
        self.ip, self.port = parse_host_port(address, default_port)
        self.default_host = default_host
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self.server = None
        self.bound_address = None

    async def start(self):
        backlog = int(dask.config.get("distributed.comm.socket-backlog"))
        self.server = await _stream.start_server(self._on_connection, self.ip or None,
                                                 self.port, backlog=backlog, **_options())
        self.bound_address = self.server.address

    def stop(self):
        server, self.server = self.server, None
        if server is not None:
            server.close()

    async def _on_connection(self, conn):
        peer = conn.get_extra_info("peername")
        address = _address(peer)
        comm = RingxferComm(conn, _address(conn.get_extra_info("sockname")), address,
                            self.deserialize)
        comm.allow_offload = self.allow_offload
        try:
            await self.on_connection(comm)
        except CommClosedError as e:
            cause = e
            while cause is not None and not isinstance(cause, ProtocolError):
                cause = cause.__cause__
            if cause is not None:
                logger.warning("Listener on %s: refused %s: not a ringxfer:// Dask peer "
                               "(%s: %s); connection closed", self.listen_address, address,
                               cause.cause, cause)
            else:
                logger.info("Connection from %s closed before handshake completed", address)
            return
        await self.comm_handler(comm)

    def get_host_port(self):
        if self.bound_address is None:
            raise ValueError("invalid operation on a RingxferListener not started")
        return self.bound_address[:2]

    @property
    def listen_address(self):
        return PREFIX + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self):
        host, port = self.get_host_port()
        host = ensure_concrete_host(host, default_host=self.default_host)
        return PREFIX + unparse_host_port(host, port)


class RingxferBackend(Backend):
    """The ``ringxfer`` scheme (``distributed.comm.backends`` entry point)."""

    def get_connector(self):
        return RingxferConnector()

    def get_listener(self, loc, handle_comm, deserialize, **connection_args):
        return RingxferListener(loc, handle_comm, deserialize, **connection_args)

    # Address handling: the same answers as tcp://.

    def get_address_host(self, loc):
        return parse_host_port(loc)[0]

    def get_address_host_port(self, loc):
        return parse_host_port(loc)

    def resolve_address(self, loc):
        host, port = parse_host_port(loc)
        return unparse_host_port(ensure_ip(host), port)

    def get_local_address_for(self, loc):
        host, port = parse_host_port(loc)
        host = ensure_ip(host)
        local_host = get_ipv6(host) if ":" in host else get_ip(host)
        return unparse_host_port(local_host, None)
