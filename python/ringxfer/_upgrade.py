"""Same-host upgrade: a TCP or Unix-stream connection whose two ends are
Python ringxfer peers on one host moves onto shared memory by itself.

The agreement (docs/design.md, "Same-host upgrade"), never a byte on the
connection a peer without the feature could see:

1. A server with ``shm_upgrade`` on also listens on an abstract Unix
   ``SOCK_SEQPACKET`` socket named from its address (the *rendezvous*;
   abstract names are per network namespace, so reaching it proves the same
   host and network namespace).
2. A client with ``shm_upgrade`` on whose peer is on its host connects to
   it and sends a claim naming its connection by its two addresses (the
   kernel keeps that pair unique in a network namespace).
3. The server checks the claimant runs as the same user (or root), finds
   that connection, and sends a random one-time token on it, in a control
   frame: only the real client reads it.
4. The client proves it over the rendezvous socket and at once hands that
   socket to its engine as the shm channel (connector); the server, token
   checked, does the same (acceptor) and writes a switch marker as its last
   frame on the old connection, then writes on shared memory. The client,
   reading the marker, writes its own and switches; the server switches
   reading at the client's marker. Both close the old socket.

Any failure before the token is proved leaves the connection as it was
(logged at debug level); every wait is bounded by UPGRADE_TIMEOUT and none
holds up the connection's own frames.
"""

import asyncio
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import stat
import struct
import weakref

logger = logging.getLogger("ringxfer.upgrade")

#: Seconds any step of an upgrade may take before it is given up (the
#: connection stays as it was).
UPGRADE_TIMEOUT = 10.0
_VERSION = 1

#: Upgrades this process took part in, by outcome (diagnostics and tests).
STATS = {"upgraded": 0, "declined": 0, "failed": 0}


def _norm(addr):
    """A socket address as JSON-able text, the same from both ends: an
    IPv4-mapped IPv6 address as IPv4, an abstract Unix name as '@name'."""
    if isinstance(addr, tuple):
        ip = ipaddress.ip_address(addr[0].split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return f"{ip}|{addr[1]}"
    if isinstance(addr, bytes):
        return "@" + addr[1:].decode("latin-1") if addr[:1] == b"\0" else addr.decode("latin-1")
    return addr


def rendezvous_name(kind, address):
    """The abstract socket name of a server's rendezvous: ``kind`` 'tcp'
    (``address`` its port) or 'unix' (its path; a file is named by device
    and inode, the same for every path that reaches it). None: no name."""
    if kind == "tcp":
        ident = f"tcp:{address}"
    elif address.startswith("@"):
        ident = f"unix:{address}"
    else:
        try:
            st = os.stat(address)
        except OSError:
            return None
        if not stat.S_ISSOCK(st.st_mode):
            return None
        ident = f"unix:{st.st_dev}:{st.st_ino}"
    return "\0ringxfer-upgrade-" + hashlib.sha256(ident.encode()).hexdigest()[:32]


def same_host(sockname, peername):
    """True when a TCP connection stays on this host: the peer is on a
    loopback address or on the connection's own local address."""
    if not isinstance(peername, tuple):
        return True  # a Unix socket
    try:
        peer = _norm(peername).split("|")[0]
        return ipaddress.ip_address(peer).is_loopback or peer == _norm(sockname).split("|")[0]
    except ValueError:
        return False


def _peer_uid(sock):
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def _trusted_uid(uid):
    return uid == os.geteuid() or uid == 0


def _settle(conn, upgraded):
    fut = conn._upgrade_done
    if not fut.done():
        fut.set_result(upgraded)


def on_event(ref, kind, payload):
    """The Conn's upgrade handler (the engine calls it with the loop's GIL)."""
    conn = ref()
    if conn is None:
        return
    if kind == "switched":
        STATS["upgraded"] += 1
        logger.debug("%r: now on shared memory", conn)
        _settle(conn, True)
        return
    try:
        msg = json.loads(payload)
    except ValueError:
        msg = {}
    token = conn._upgrade_token
    if msg.get("type") == "shm-ready" and token is not None and not token.done():
        token.set_result(str(msg.get("token", "")))
    else:
        logger.debug("%r: ignored an upgrade message nobody waits for: %r", conn, payload[:80])


# -- the client's side ------------------------------------------------------

async def client_upgrade(conn, kind, server_address):
    """Tries to move `conn` (just connected) onto shared memory; returns once
    it is committed (the token proved) or given up."""
    loop = asyncio.get_running_loop()
    name = rendezvous_name(kind, server_address)
    if name is None:
        _settle(conn, False)
        return
    r = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r.setblocking(False)
    conn._upgrade_token = loop.create_future()
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(r, name), UPGRADE_TIMEOUT)
        except (ConnectionRefusedError, FileNotFoundError):
            # No rendezvous: a server without the feature, or with it off.
            logger.debug("%r: the server offers no shared-memory upgrade", conn)
            STATS["declined"] += 1
            r.close()
            _settle(conn, False)
            return
        if not _trusted_uid(_peer_uid(r)):
            raise PermissionError("the rendezvous belongs to another user")
        claim = {"type": "shm-claim", "v": _VERSION,
                 "conn": [_norm(conn.get_extra_info("sockname")),
                          _norm(conn.get_extra_info("peername"))]}
        r.send(json.dumps(claim).encode())
        token = await asyncio.wait_for(asyncio.shield(conn._upgrade_token), UPGRADE_TIMEOUT)
        if conn.is_closing():
            raise ConnectionAbortedError("closed meanwhile")
        # Proof and channel in one step, nothing awaited in between: the
        # server's switch marker can only follow the token, so the shm
        # channel is ready before it arrives.
        r.send(json.dumps({"type": "shm-token", "token": token}).encode())
        conn._core.prepare_upgrade(r.detach(), True)
    except (OSError, asyncio.TimeoutError, RuntimeError, ValueError,
            asyncio.CancelledError) as e:
        logger.debug("%r: no shared-memory upgrade (%s: %s); the connection stays as it is",
                     conn, type(e).__name__, e)
        STATS["failed"] += 1
        r.close()
        _settle(conn, False)
    finally:
        conn._upgrade_token = None
        conn._upgrade_task = None


# -- the server's side ------------------------------------------------------

class Rendezvous:
    """A server's upgrade rendezvous: the abstract socket and the server's
    connections a claim may name."""

    def __init__(self, loop, kind, address):
        self._loop = loop
        self._conns = weakref.WeakValueDictionary()  # (peer, local) -> Connection
        self._tasks = set()
        self._sock = None
        self._accepting = None
        name = rendezvous_name(kind, address)
        if name is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(name)
            sock.listen(128)
        except OSError as e:
            # Another server holds it (the same port in another address family).
            logger.debug("no shared-memory upgrade for %r: its rendezvous is taken (%s)",
                         address, e)
            sock.close()
            return
        sock.setblocking(False)
        self._sock = sock
        self._accepting = loop.create_task(self._accept_loop())

    def add(self, conn):
        if self._sock is None:
            return
        try:
            key = (_norm(conn.get_extra_info("peername")),
                   _norm(conn.get_extra_info("sockname")))
        except ValueError:
            return
        if key[0] in ("", "@"):
            return  # an unnamed Unix client cannot name its connection
        self._conns[key] = conn

    async def _accept_loop(self):
        try:
            while True:
                r, _ = await self._loop.sock_accept(self._sock)
                task = self._loop.create_task(self._serve(r))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.CancelledError, OSError):
            pass

    async def _serve(self, r):
        conn = None
        try:
            r.setblocking(False)
            if not _trusted_uid(_peer_uid(r)):
                raise PermissionError("the claimant runs as another user")
            claim = json.loads(await asyncio.wait_for(self._loop.sock_recv(r, 4096),
                                                      UPGRADE_TIMEOUT))
            if claim.get("type") != "shm-claim" or claim.get("v") != _VERSION:
                raise ValueError(f"not a claim of this version: {claim!r}")
            client_end, server_end = claim["conn"]  # as the client sees them
            conn = self._conns.pop((client_end, server_end), None)
            if conn is None or conn.is_closing() or conn._upgrade_done.done():
                conn = None
                raise LookupError("no such connection waiting for an upgrade")
            token = secrets.token_hex(16)
            conn._core.send_control(json.dumps({"type": "shm-ready", "token": token},
                                               separators=(",", ":")))
            proof = json.loads(await asyncio.wait_for(self._loop.sock_recv(r, 4096),
                                                      UPGRADE_TIMEOUT))
            if not hmac.compare_digest(str(proof.get("token", "")), token):
                raise PermissionError("wrong token")
            if conn.is_closing():
                raise ConnectionAbortedError("closed meanwhile")
            conn._core.prepare_upgrade(r.detach(), False)
            conn._core.switch_sends()
        except (OSError, asyncio.TimeoutError, RuntimeError, ValueError, LookupError,
                KeyError, TypeError) as e:
            logger.debug("refused a shared-memory upgrade claim (%s: %s)", type(e).__name__, e)
            r.close()
            if conn is not None:
                STATS["failed"] += 1
                _settle(conn, False)

    def close(self):
        if self._sock is None:
            return
        self._accepting.cancel()
        for t in self._tasks:
            t.cancel()
        self._sock.close()
        self._sock = None
