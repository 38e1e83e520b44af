#!/usr/bin/env python3
"""The seed's Python stacks as echo and stream peers of bench/compare.

Each stack is written the idiomatic way its documentation suggests, as in
the seed's benchmark (Antoine Pitrou, async-sig, 2017): frames are an 8-byte
little-endian length and a payload, and the receiving side hands each frame
whole to the application as one bytes-like object. Client and server use the
same stack.

  asyncio-protocol   asyncio.Protocol: data_received() chunks kept in a list
                     and joined once a frame is complete
  asyncio-streams    StreamReader.readexactly() / StreamWriter.write()+drain()
  asyncio-buffered   asyncio.BufferedProtocol: get_buffer() hands out the
                     unfilled part of a preallocated bytearray (recv_into)
  uvloop-protocol    the asyncio-protocol code on uvloop's event loop
  uvloop-streams     the asyncio-streams code on uvloop's event loop
  tornado            tornado.iostream.IOStream.read_bytes() / write()
  blocking           plain blocking socket: recv_into() a memoryview of a
                     reused bytearray, sendall()

Two modes, as bench/peers/py_ringxfer.py has them:

  echo    the client keeps one frame in flight: it sends it, waits for the
          whole echo, and repeats; the server reads a whole frame and writes
          it back (the seed's benchmark)
  stream  the client sends frames back to back, each as the stack sends one
          (Protocol clients write and wait while the transport has paused
          writing, as StreamWriter.drain() does; streams write() + drain();
          tornado awaits write(); blocking sendall()); the server receives
          each frame whole, the same code as its echo, and counts it. A
          zero-length frame is a barrier: the server answers it with a frame
          of its count of frames and payload bytes since the previous barrier
          (two little-endian u64), so the clock starts once the warmup frames
          were received and stops once the last measured frame was, and the
          client checks that the server received every measured byte.

The client's first frame says the mode (b"echo" or b"stream"): one server
serves both. Fair, not strawmen: TCP_NODELAY on every TCP socket, receive
buffers reused where the API allows it, payloads built once, warmup frames
excluded from timing, and no per-frame work beyond what the API itself
requires (a data_received() chunk holding several frames is cut at frame
boundaries, each frame joined once).

    py_echo.py serve --stack S --listen HOST:PORT|unix:PATH [--one-off]
                     [--warmup-frames W] [--json FILE]
    py_echo.py bench --stack S HOST:PORT|unix:PATH|- [--mode echo|stream]
                     --frame-size SIZE --frames N [--warmup-frames W] [--json FILE]

`serve` prints "listening ADDR" (the bound port filled in) once it accepts.
`bench -` reads the address from the first line of stdin, so a harness can
start client and server together and pass the address once it is known.
CPU seconds (user + system) cover the measured span only, as ringxfer's do:
the client's from its first measured send to its last echo (echo) or to the
answer of the closing barrier (stream); the server's, written by `serve
--json` of a one-off server, from the echo of its W-th (warmup) frame to the
connection's end (echo) or from its answer to the first barrier to its
answer to the second (stream).
Throughput = payload bytes of measured frames echoed (echo) or received by
the server (stream) / s, in MB/s (10^6 B).
Exit status: 0 ok, 1 transfer failed, 2 usage, 3 the stack's package is missing.
"""
import argparse
import asyncio
import collections
import json
import platform
import socket
import struct
import sys
import time

HEADER = struct.Struct("<Q")
BARRIER_REPLY = struct.Struct("<QQ")  # frames, payload bytes since the previous barrier
STACKS = ("asyncio-protocol", "asyncio-streams", "asyncio-buffered",
          "uvloop-protocol", "uvloop-streams", "tornado", "blocking")
DEFAULT_MAX_FRAME = 1 << 30


class MissingStack(Exception):
    """The stack's Debian package is not installed."""


def parse_size(s):
    """Bytes with an optional K/M/G (10^3) or Ki/Mi/Gi (2^10) suffix."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    digits = s.rstrip("KMGi")
    if not digits.isdigit() or s[len(digits):] not in units:
        raise argparse.ArgumentTypeError(f"bad size '{s}'")
    return int(digits) * units[s[len(digits):]]


def parse_address(s):
    """('unix', path) or ('tcp', host, port)."""
    if s.startswith("unix:"):
        return ("unix", s[5:])
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"bad address '{s}': expected HOST:PORT or unix:PATH")
    return ("tcp", host.strip("[]") or "127.0.0.1", int(port))


def set_nodelay(sock):
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_payload(n):
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def announce(addr, bound):
    """Tells the harness the server is accepting, with the real port."""
    if addr[0] == "unix":
        print(f"listening unix:{addr[1]}", flush=True)
    else:
        print(f"listening {addr[1]}:{bound[1]}", flush=True)


class ServerSession:
    """What a server does with one connection's frames, whatever the stack.

    frame(f) takes each received frame and returns what to send back (a
    payload the stack frames and writes), or None; the stack calls replied()
    once that is written. The first frame names the mode. The session also
    keeps the server's CPU over the client's measured span (see the module
    doc) in report["cpu_s"], and in stream what the span received in
    report["received"]."""

    def __init__(self, warmup, report):
        self.warmup, self.report = warmup, report
        self.start = None
        self.frame = self.hello
        self.frames = self.nbytes = self.barriers = 0

    def hello(self, frame):
        mode = bytes(frame)
        if mode == b"echo":
            self.frame, self.replied = self.echo, self.echoed
            if self.warmup == 0:
                self.start = time.process_time()
        elif mode == b"stream":
            self.frame, self.replied = self.count, self.answered
        else:
            raise RuntimeError(f"unknown mode {mode[:20]!r} in the client's first frame")
        return None

    def echo(self, frame):
        return frame

    def echoed(self):
        if self.warmup > 0:
            self.warmup -= 1
            if self.warmup == 0:
                self.start = time.process_time()

    def count(self, frame):
        n = len(frame)
        if n:
            self.frames += 1
            self.nbytes += n
            return None
        # A barrier: everything sent before it has been received.
        self.barriers += 1
        if self.barriers == 2:
            self.end()  # the client's clock stops at this answer
            self.report["received"] = {"frames": self.frames, "bytes": self.nbytes}
        reply = BARRIER_REPLY.pack(self.frames, self.nbytes)
        self.frames = self.nbytes = 0
        return reply

    def answered(self):
        if self.barriers == 1:
            self.start = time.process_time()

    def end(self):
        if self.start is not None and "cpu_s" not in self.report:
            self.report["cpu_s"] = time.process_time() - self.start


def event_loop_policy(stack):
    if stack.startswith("uvloop"):
        try:
            import uvloop
        except ImportError as e:
            raise MissingStack(f"{stack} needs python3-uvloop ({e})") from e
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


# ------------------------------------------ asyncio.Protocol, both kinds --

class FrameProtocol:
    """What the two Protocol framings share: on_frame gets each frame,
    on_lost(exc, mid_frame) the end; and writer flow control as
    StreamWriter.drain() does it: the transport calls pause_writing() once
    its buffer is over the high-water mark and resume_writing() once it is
    under the low one, and drain() waits for that."""

    paused, resumed = False, None

    def __init__(self, on_frame, on_lost=None):
        self.on_frame, self.on_lost = on_frame, on_lost

    def connection_made(self, transport):
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    async def drain(self):
        if self.paused:
            self.resumed = asyncio.get_running_loop().create_future()
            await self.resumed

    def connection_lost(self, exc):
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_exception(ConnectionError("connection lost while writing"))
        if self.on_lost:
            self.on_lost(exc, self.mid_frame())


class JoiningProtocol(FrameProtocol, asyncio.Protocol):
    """Frames from data_received(): the chunks of a frame (memoryviews of the
    received bytes) are collected and b''.join()ed once the frame is complete
    (the copy the seed measured), one join per frame however the frames and
    chunks fall."""

    def __init__(self, on_frame, on_lost=None):
        super().__init__(on_frame, on_lost)
        self.hdr = bytearray()
        self.chunks, self.have, self.need = [], 0, None  # need None: reading the header

    def data_received(self, data):
        view, pos, end = memoryview(data), 0, len(data)
        while True:
            if self.need is None:
                if not self.hdr and end - pos >= HEADER.size:  # the header is in this chunk
                    (self.need,) = HEADER.unpack_from(data, pos)
                    pos += HEADER.size
                else:  # collect a header split across chunks
                    take = min(HEADER.size - len(self.hdr), end - pos)
                    if take == 0:
                        return
                    self.hdr += view[pos:pos + take]
                    pos += take
                    if len(self.hdr) < HEADER.size:
                        return
                    (self.need,) = HEADER.unpack(self.hdr)
                    self.hdr.clear()
            take = min(self.need - self.have, end - pos)
            if take:
                self.chunks.append(view[pos:pos + take])
                self.have += take
                pos += take
            if self.have < self.need:
                return
            frame = b"".join(self.chunks)
            self.chunks, self.have, self.need = [], 0, None
            self.on_frame(frame)

    def mid_frame(self):
        return bool(self.hdr) or self.need is not None


class IntoProtocol(FrameProtocol, asyncio.BufferedProtocol):
    """Frames received in place: get_buffer() returns the unfilled part of the
    8-byte header, then of a bytearray sized for the payload (reused while
    frames fit), so the event loop recv_into()s straight into it. A frame is
    a memoryview of that bytearray, valid until the next frame arrives."""

    def __init__(self, on_frame, on_lost=None):
        super().__init__(on_frame, on_lost)
        self.hdr = bytearray(HEADER.size)
        self.buf = memoryview(bytearray(0))
        self.pos, self.need = 0, None  # need None: reading the header

    def get_buffer(self, sizehint):
        if self.need is None:
            return memoryview(self.hdr)[self.pos:]
        return self.buf[self.pos:self.need]

    def buffer_updated(self, nbytes):
        self.pos += nbytes
        if self.need is None:
            if self.pos < HEADER.size:
                return
            (self.need,) = HEADER.unpack(self.hdr)
            self.pos = 0
            if len(self.buf) < self.need:
                self.buf = memoryview(bytearray(self.need))
        if self.pos == self.need:
            frame, self.pos, self.need = self.buf[:self.need], 0, None
            self.on_frame(frame)

    def mid_frame(self):
        return self.pos != 0 or self.need is not None


def protocol_class(stack):
    return IntoProtocol if stack == "asyncio-buffered" else JoiningProtocol


async def protocol_server(stack, addr, one_off, max_frame, new_session):
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def factory():
        session = new_session()

        def on_frame(frame):
            reply = session.frame(frame)
            if reply is not None:
                proto.transport.write(HEADER.pack(len(reply)))
                proto.transport.write(reply)
                session.replied()

        def on_lost(exc, mid_frame):
            session.end()
            if not done.done():
                done.set_result("connection closed mid-frame" if mid_frame else exc)
        proto = protocol_class(stack)(on_frame, on_lost)
        return proto

    if addr[0] == "unix":
        server = await loop.create_unix_server(factory, addr[1])
    else:
        server = await loop.create_server(factory, addr[1], addr[2])
    announce(addr, server.sockets[0].getsockname())
    async with server:
        if not one_off:
            await server.serve_forever()
        result = await done
    if result is not None:
        raise RuntimeError(f"server: {result}")


class Inbox:
    """The frames a Protocol client received, for recv() to await in turn."""

    def __init__(self, loop):
        self.loop, self.frames, self.waiter, self.error = loop, collections.deque(), None, None

    def put(self, frame):
        if self.waiter is None:
            self.frames.append(frame)
        else:
            self.waiter.set_result(frame)
            self.waiter = None

    def lost(self, exc, mid_frame):
        self.error = ConnectionError("connection closed mid-frame" if mid_frame
                                     else f"connection closed ({exc or 'by the server'})")
        if self.waiter is not None:
            self.waiter.set_exception(self.error)
            self.waiter = None

    async def get(self):
        if self.frames:
            return self.frames.popleft()
        if self.error is not None:
            raise self.error
        self.waiter = self.loop.create_future()
        return await self.waiter


Link = collections.namedtuple("Link", "send recv close")
Link.__doc__ = """A client connection of one stack: `await send(header, payload)` sends
a frame as the stack does; `await recv()` returns the next frame whole;
`await close()`."""


async def protocol_link(stack, addr, max_frame):
    loop = asyncio.get_running_loop()
    inbox = Inbox(loop)

    def factory():
        return protocol_class(stack)(inbox.put, inbox.lost)

    if addr[0] == "unix":
        transport, proto = await loop.create_unix_connection(factory, addr[1])
    else:
        transport, proto = await loop.create_connection(factory, addr[1], addr[2])

    async def send(hdr, payload):
        transport.write(hdr)
        transport.write(payload)
        if proto.paused:
            await proto.drain()

    async def close():
        transport.close()

    return Link(send, inbox.get, close)


# -------------------------------------------------------- asyncio streams --

async def streams_server(stack, addr, one_off, max_frame, new_session):
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def handle(reader, writer):
        set_nodelay(writer.get_extra_info("socket"))
        session = new_session()
        error = None
        try:
            while True:
                try:
                    hdr = await reader.readexactly(HEADER.size)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise
                    break  # clean close at a frame boundary
                (n,) = HEADER.unpack(hdr)
                if n > max_frame:
                    raise RuntimeError(f"frame of {n} B exceeds --max-frame")
                reply = session.frame(await reader.readexactly(n))
                if reply is not None:
                    writer.write(HEADER.pack(len(reply)))
                    writer.write(reply)
                    await writer.drain()
                    session.replied()
        except Exception as e:  # reported by the one-off server's exit status
            error = e
        finally:
            session.end()
            writer.close()
            if not done.done():
                done.set_result(error)

    if addr[0] == "unix":
        server = await asyncio.start_unix_server(handle, addr[1])
    else:
        server = await asyncio.start_server(handle, addr[1], addr[2])
    announce(addr, server.sockets[0].getsockname())
    async with server:
        if not one_off:
            await server.serve_forever()
        error = await done
    if error is not None:
        raise RuntimeError(f"server: {error}")


async def streams_link(stack, addr, max_frame):
    if addr[0] == "unix":
        reader, writer = await asyncio.open_unix_connection(addr[1])
    else:
        reader, writer = await asyncio.open_connection(addr[1], addr[2])
    set_nodelay(writer.get_extra_info("socket"))

    async def send(hdr, payload):
        writer.write(hdr)
        writer.write(payload)
        await writer.drain()

    async def recv():
        (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        return await reader.readexactly(n)

    async def close():
        writer.close()
        await writer.wait_closed()

    return Link(send, recv, close)


# ---------------------------------------------------------------- tornado --

def tornado_modules():
    try:
        import tornado
        from tornado import iostream, netutil, tcpclient, tcpserver
    except ImportError as e:
        raise MissingStack(f"tornado needs python3-tornado ({e})") from e
    return tornado, iostream, netutil, tcpclient, tcpserver


async def tornado_server(stack, addr, one_off, max_frame, new_session):
    _, iostream, netutil, _, tcpserver = tornado_modules()
    done = asyncio.get_running_loop().create_future()

    class FrameServer(tcpserver.TCPServer):
        async def handle_stream(self, stream, address):
            stream.set_nodelay(True)
            session = new_session()
            error = None
            try:
                while True:
                    try:
                        hdr = await stream.read_bytes(HEADER.size)
                    except iostream.StreamClosedError:
                        break  # closed at a frame boundary
                    (n,) = HEADER.unpack(hdr)
                    reply = session.frame(await stream.read_bytes(n))
                    if reply is not None:
                        stream.write(HEADER.pack(len(reply)))
                        await stream.write(reply)
                        session.replied()
            except Exception as e:
                error = e
            finally:
                session.end()
                stream.close()
                if not done.done():
                    done.set_result(error)

    # max_buffer_size defaults to 100 MiB; allow the largest accepted frame.
    server = FrameServer(max_buffer_size=max_frame + 2 * HEADER.size)
    if addr[0] == "unix":
        sock = netutil.bind_unix_socket(addr[1])
        server.add_socket(sock)
        bound = None
    else:
        socks = netutil.bind_sockets(addr[2], address=addr[1], family=socket.AF_INET)
        server.add_sockets(socks)
        bound = socks[0].getsockname()
    announce(addr, bound)
    if not one_off:
        await asyncio.Event().wait()
    error = await done
    server.stop()
    if error is not None:
        raise RuntimeError(f"server: {error}")


async def tornado_link(stack, addr, max_frame):
    _, iostream, _, tcpclient, _ = tornado_modules()
    max_buffer = max_frame + 2 * HEADER.size
    if addr[0] == "unix":
        stream = iostream.IOStream(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
                                   max_buffer_size=max_buffer)
        await stream.connect(addr[1])
    else:
        stream = await tcpclient.TCPClient().connect(addr[1], addr[2], max_buffer_size=max_buffer)
        stream.set_nodelay(True)

    async def send(hdr, payload):
        stream.write(hdr)
        await stream.write(payload)

    async def recv():
        (n,) = HEADER.unpack(await stream.read_bytes(HEADER.size))
        return await stream.read_bytes(n)

    async def close():
        stream.close()

    return Link(send, recv, close)


# --------------------------------------------------------------- blocking --

def recv_exact(sock, view):
    """Fills the memoryview; False on a clean EOF before its first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise RuntimeError("connection closed mid-frame")
        got += n
    return True


def blocking_open(addr, listening):
    family = socket.AF_UNIX if addr[0] == "unix" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    target = addr[1] if addr[0] == "unix" else (addr[1], addr[2])
    if listening:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(16)
    else:
        sock.connect(target)
        set_nodelay(sock)
    return sock


class BlockingReceiver:
    """Whole frames from a blocking socket into a reused bytearray (grown
    only for bigger frames); a frame is a memoryview of it, valid until the
    next. next() returns None on a clean close at a frame boundary."""

    def __init__(self, sock, max_frame):
        self.sock, self.max_frame = sock, max_frame
        self.hdr = memoryview(bytearray(HEADER.size))
        self.buf = memoryview(bytearray(0))

    def next(self):
        if not recv_exact(self.sock, self.hdr):
            return None
        (n,) = HEADER.unpack(self.hdr)
        if n > self.max_frame:
            raise RuntimeError(f"frame of {n} B exceeds --max-frame")
        if len(self.buf) < n:
            self.buf = memoryview(bytearray(n))
        if not recv_exact(self.sock, self.buf[:n]) and n:
            raise RuntimeError("connection closed mid-frame")
        return self.buf[:n]


def blocking_server(addr, one_off, max_frame, new_session):
    lsock = blocking_open(addr, listening=True)
    announce(addr, lsock.getsockname())
    while True:
        conn, _ = lsock.accept()
        set_nodelay(conn)
        session = new_session()
        frames = BlockingReceiver(conn, max_frame)
        try:
            while (frame := frames.next()) is not None:
                reply = session.frame(frame)
                if reply is not None:
                    conn.sendall(HEADER.pack(len(reply)))
                    conn.sendall(reply)
                    session.replied()
        finally:
            session.end()
            conn.close()
        if one_off:
            return


async def blocking_link(stack, addr, max_frame):
    """Blocking calls in coroutines that never suspend: the event loop only
    runs the client's loop, it waits for nothing."""
    sock = blocking_open(addr, listening=False)
    frames = BlockingReceiver(sock, max_frame)

    async def send(hdr, payload):
        sock.sendall(hdr)
        sock.sendall(payload)

    async def recv():
        frame = frames.next()
        if frame is None:
            raise RuntimeError("connection closed by the server")
        return frame

    async def close():
        sock.close()

    return Link(send, recv, close)


# ----------------------------------------------------------------- client --

async def echo_run(link, payload, frames, warmup):
    hdr = HEADER.pack(len(payload))

    async def one():
        await link.send(hdr, payload)
        if len(await link.recv()) != len(payload):
            raise RuntimeError("bad echo: payload length mismatch")

    for _ in range(warmup):
        await one()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames):
        await one()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, frames * len(payload)


async def stream_run(link, payload, frames, warmup):
    hdr, barrier_hdr = HEADER.pack(len(payload)), HEADER.pack(0)

    async def send_frames(n):
        for _ in range(n):
            await link.send(hdr, payload)

    async def barrier():
        await link.send(barrier_hdr, b"")
        reply = await link.recv()
        if len(reply) != BARRIER_REPLY.size:
            raise RuntimeError(f"bad barrier answer: {len(reply)} B")
        return BARRIER_REPLY.unpack(reply)

    await send_frames(warmup)
    await barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    await send_frames(frames)
    got_frames, got_bytes = await barrier()
    t1, c1 = time.perf_counter(), time.process_time()
    if (got_frames, got_bytes) != (frames, frames * len(payload)):
        raise RuntimeError(f"the server received {got_frames} frames, {got_bytes} B; "
                           f"sent {frames} frames, {frames * len(payload)} B")
    return t1 - t0, c1 - c0, got_bytes


async def client(args, payload):
    open_link = {"tornado": tornado_link, "blocking": blocking_link}.get(
        args.stack, streams_link if args.stack.endswith("streams") else protocol_link)
    link = await open_link(args.stack, args.address, max(len(payload), BARRIER_REPLY.size))
    mode = args.mode.encode()
    await link.send(HEADER.pack(len(mode)), mode)
    run = echo_run if args.mode == "echo" else stream_run
    result = await run(link, payload, args.frames, args.warmup_frames)
    await link.close()
    return result


# ------------------------------------------------------------------- main --

def stack_versions(stack):
    v = {"python": platform.python_version()}
    if stack.startswith("uvloop"):
        import uvloop
        v["uvloop"] = uvloop.__version__
    if stack == "tornado":
        v["tornado"] = tornado_modules()[0].version
    return v


def serve(args):
    addr, report = args.listen, {}

    def new_session():  # one per connection; a one-off server has just one
        return ServerSession(args.warmup_frames, report)

    if args.stack == "blocking":
        blocking_server(addr, args.one_off, args.max_frame, new_session)
    else:
        impl = {"tornado": tornado_server}.get(
            args.stack, streams_server if args.stack.endswith("streams") else protocol_server)
        asyncio.set_event_loop_policy(event_loop_policy(args.stack))
        asyncio.run(impl(args.stack, addr, args.one_off, args.max_frame, new_session))
    if args.json:
        result = {"cpu": {"total_s": report.get("cpu_s")}}
        if "received" in report:
            result["received"] = report["received"]
        with open(args.json, "w") as f:
            json.dump(result, f)
            f.write("\n")


def bench(args):
    payload = make_payload(args.frame_size)
    if args.mode == "stream" and args.frame_size == 0:
        raise RuntimeError("--mode stream needs --frame-size of at least 1 "
                           "(a zero-length frame is the barrier)")
    asyncio.set_event_loop_policy(event_loop_policy(args.stack))
    secs, cpu, nbytes = asyncio.run(client(args, payload))
    mbps = nbytes / secs / 1e6 if secs > 0 else 0.0
    print(f"py_echo {args.stack}: {args.mode} {args.frames} frames x {args.frame_size} B "
          f"in {secs:.3f} s = {mbps:.1f} MB/s")
    if args.json:
        result = {
            "schema_version": 1,
            "tool": {"name": "py_echo", "stack": args.stack, **stack_versions(args.stack)},
            "params": {"mode": args.mode, "frame_bytes": args.frame_size, "frames": args.frames,
                       "transport": args.address[0], "warmup_frames": args.warmup_frames},
            "results": {"frames": args.frames, "bytes": nbytes, "seconds": secs,
                        "throughput_mbps": mbps, "errors": 0,
                        "cpu": {"client": {"total_s": cpu}}},
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--stack", choices=STACKS, required=True)
    s.add_argument("--listen", type=parse_address, required=True)
    s.add_argument("--one-off", action="store_true", help="exit after the first connection")
    s.add_argument("--max-frame", type=parse_size, default=DEFAULT_MAX_FRAME)
    s.add_argument("--warmup-frames", type=int, default=1,
                   help="echo: frames echoed before the CPU span starts (match the client's)")
    s.add_argument("--json", help="write the server's CPU over the span here at exit")
    b = sub.add_parser("bench")
    b.add_argument("--stack", choices=STACKS, required=True)
    b.add_argument("address", help="HOST:PORT, unix:PATH, or - to read it from stdin")
    b.add_argument("--mode", choices=("echo", "stream"), default="echo")
    b.add_argument("--frame-size", type=parse_size, required=True)
    b.add_argument("--frames", type=int, required=True)
    b.add_argument("--warmup-frames", type=int, default=1)
    b.add_argument("--json")
    args = ap.parse_args()
    if args.cmd == "bench":
        try:
            args.address = parse_address(sys.stdin.readline().strip() if args.address == "-"
                                         else args.address)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    try:
        serve(args) if args.cmd == "serve" else bench(args)
    except MissingStack as e:
        print(f"py_echo: {e}", file=sys.stderr)
        return 3
    except (OSError, RuntimeError, asyncio.IncompleteReadError, EOFError) as e:
        print(f"py_echo: {args.cmd} {args.stack}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # tornado's StreamClosedError and the like
        print(f"py_echo: {args.cmd} {args.stack}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
