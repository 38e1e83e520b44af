#!/usr/bin/env python3
"""The seed's Python stacks as echo peers of bench/compare.

Each stack is written the idiomatic way its documentation suggests, as in
the seed's benchmark (Antoine Pitrou, async-sig, 2017): frames are an 8-byte
little-endian length and a payload; the client keeps one frame in flight,
sends it, waits for the whole echo, and repeats; the server reads a whole
frame and writes it back. Client and server use the same stack.

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

Fair, not strawmen: TCP_NODELAY on every TCP socket, receive buffers reused
where the API allows it, payloads built once, one warmup frame excluded from
timing, and no per-frame work beyond what the API itself requires.

    py_echo.py serve --stack S --listen HOST:PORT|unix:PATH [--one-off]
                     [--warmup-frames W] [--json FILE]
    py_echo.py bench --stack S HOST:PORT|unix:PATH|- --frame-size SIZE --frames N
                     [--warmup-frames W] [--json FILE]

`serve` prints "listening ADDR" (the bound port filled in) once it accepts.
`bench -` reads the address from the first line of stdin, so a harness can
start client and server together and pass the address once it is known.
CPU seconds (user + system) cover the measured span only, as ringxfer's do:
the client's from its first measured send to its last echo; the server's
from the echo of its W-th (warmup) frame to the connection's end, written by
`serve --json` of a one-off server.
Throughput = payload bytes of measured frames echoed / s, in MB/s (10^6 B).
Exit status: 0 ok, 1 transfer failed, 2 usage, 3 the stack's package is missing.
"""
import argparse
import asyncio
import json
import platform
import socket
import struct
import sys
import time

HEADER = struct.Struct("<Q")
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


class ServerSpan:
    """A server's CPU over the client's measured span: from the echo of the
    last warmup frame to the end of the connection."""

    def __init__(self, warmup, report):
        self.left, self.report = warmup, report
        self.start = time.process_time() if warmup == 0 else None

    def frame_done(self):
        if self.left > 0:
            self.left -= 1
            if self.left == 0:
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


# ------------------------------------------------------- asyncio.Protocol --

class JoiningProtocol(asyncio.Protocol):
    """Frames from data_received(): chunks are collected and b''.join()ed once
    the frame is complete (the copy the seed measured); on_frame gets each."""

    def __init__(self, on_frame, on_lost=None):
        self.on_frame, self.on_lost = on_frame, on_lost
        self.chunks, self.have, self.need = [], 0, None

    def connection_made(self, transport):
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))

    def data_received(self, data):
        self.chunks.append(data)
        self.have += len(data)
        while True:
            if self.need is None:
                if self.have < HEADER.size:
                    return
                buf = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
                (self.need,) = HEADER.unpack_from(buf)
                self.chunks, self.have = [memoryview(buf)[HEADER.size:]], self.have - HEADER.size
            if self.have < self.need:
                return
            buf = b"".join(self.chunks)
            frame, rest = buf[:self.need], buf[self.need:]
            self.chunks, self.have, self.need = ([rest] if rest else []), len(rest), None
            self.on_frame(frame)

    def connection_lost(self, exc):
        if self.on_lost:
            self.on_lost(exc, self.have != 0 or self.need is not None)


# ----------------------------------------------- asyncio.BufferedProtocol --

class IntoProtocol(asyncio.BufferedProtocol):
    """Frames received in place: get_buffer() returns the unfilled part of the
    8-byte header, then of a bytearray sized for the payload (reused while
    frames fit), so the event loop recv_into()s straight into it."""

    def __init__(self, on_frame, on_lost=None):
        self.on_frame, self.on_lost = on_frame, on_lost
        self.hdr = bytearray(HEADER.size)
        self.buf = memoryview(bytearray(0))
        self.pos, self.need = 0, None  # need None: reading the header

    def connection_made(self, transport):
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))

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

    def connection_lost(self, exc):
        if self.on_lost:
            self.on_lost(exc, self.pos != 0 or self.need is not None)


async def protocol_server(stack, addr, one_off, max_frame, new_span):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    proto_cls = IntoProtocol if stack == "asyncio-buffered" else JoiningProtocol

    def factory():
        span = new_span()

        def on_frame(frame):
            proto.transport.write(HEADER.pack(len(frame)))
            proto.transport.write(frame)
            span.frame_done()

        def on_lost(exc, mid_frame):
            span.end()
            if not done.done():
                done.set_result("connection closed mid-frame" if mid_frame else exc)
        proto = proto_cls(on_frame, on_lost)
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


async def protocol_client(stack, addr, payload, frames, warmup):
    loop = asyncio.get_running_loop()
    waiter = None

    def on_frame(frame):
        waiter.set_result(len(frame))

    proto_cls = IntoProtocol if stack == "asyncio-buffered" else JoiningProtocol
    if addr[0] == "unix":
        transport, _ = await loop.create_unix_connection(lambda: proto_cls(on_frame), addr[1])
    else:
        transport, _ = await loop.create_connection(lambda: proto_cls(on_frame), addr[1], addr[2])
    hdr = HEADER.pack(len(payload))

    async def one():
        nonlocal waiter
        waiter = loop.create_future()
        transport.write(hdr)
        transport.write(payload)
        if await waiter != len(payload):
            raise RuntimeError("bad echo: payload length mismatch")

    for _ in range(warmup):
        await one()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames):
        await one()
    t1, c1 = time.perf_counter(), time.process_time()
    transport.close()
    return t1 - t0, c1 - c0


# -------------------------------------------------------- asyncio streams --

async def streams_server(stack, addr, one_off, max_frame, new_span):
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def handle(reader, writer):
        set_nodelay(writer.get_extra_info("socket"))
        span = new_span()
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
                data = await reader.readexactly(n)
                writer.write(hdr)
                writer.write(data)
                await writer.drain()
                span.frame_done()
        except Exception as e:  # reported by the one-off server's exit status
            error = e
        finally:
            span.end()
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


async def streams_client(stack, addr, payload, frames, warmup):
    if addr[0] == "unix":
        reader, writer = await asyncio.open_unix_connection(addr[1])
    else:
        reader, writer = await asyncio.open_connection(addr[1], addr[2])
    set_nodelay(writer.get_extra_info("socket"))
    hdr = HEADER.pack(len(payload))

    async def one():
        writer.write(hdr)
        writer.write(payload)
        await writer.drain()
        (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if len(await reader.readexactly(n)) != len(payload):
            raise RuntimeError("bad echo: payload length mismatch")

    for _ in range(warmup):
        await one()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames):
        await one()
    t1, c1 = time.perf_counter(), time.process_time()
    writer.close()
    await writer.wait_closed()
    return t1 - t0, c1 - c0


# ---------------------------------------------------------------- tornado --

def tornado_modules():
    try:
        import tornado
        from tornado import iostream, netutil, tcpclient, tcpserver
    except ImportError as e:
        raise MissingStack(f"tornado needs python3-tornado ({e})") from e
    return tornado, iostream, netutil, tcpclient, tcpserver


async def tornado_server(stack, addr, one_off, max_frame, new_span):
    _, iostream, netutil, _, tcpserver = tornado_modules()
    done = asyncio.get_running_loop().create_future()

    class EchoServer(tcpserver.TCPServer):
        async def handle_stream(self, stream, address):
            stream.set_nodelay(True)
            span = new_span()
            error = None
            try:
                while True:
                    try:
                        hdr = await stream.read_bytes(HEADER.size)
                    except iostream.StreamClosedError:
                        break  # closed at a frame boundary
                    (n,) = HEADER.unpack(hdr)
                    data = await stream.read_bytes(n)
                    stream.write(hdr)
                    await stream.write(data)
                    span.frame_done()
            except Exception as e:
                error = e
            finally:
                span.end()
                stream.close()
                if not done.done():
                    done.set_result(error)

    # max_buffer_size defaults to 100 MiB; allow the largest accepted frame.
    server = EchoServer(max_buffer_size=max_frame + 2 * HEADER.size)
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


async def tornado_client(stack, addr, payload, frames, warmup):
    _, iostream, _, tcpclient, _ = tornado_modules()
    max_buffer = len(payload) + 2 * HEADER.size
    if addr[0] == "unix":
        stream = iostream.IOStream(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
                                   max_buffer_size=max_buffer)
        await stream.connect(addr[1])
    else:
        stream = await tcpclient.TCPClient().connect(addr[1], addr[2], max_buffer_size=max_buffer)
        stream.set_nodelay(True)
    hdr = HEADER.pack(len(payload))

    async def one():
        stream.write(hdr)
        await stream.write(payload)
        (n,) = HEADER.unpack(await stream.read_bytes(HEADER.size))
        if len(await stream.read_bytes(n)) != len(payload):
            raise RuntimeError("bad echo: payload length mismatch")

    for _ in range(warmup):
        await one()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames):
        await one()
    t1, c1 = time.perf_counter(), time.process_time()
    stream.close()
    return t1 - t0, c1 - c0


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


def blocking_server(addr, one_off, max_frame, new_span):
    lsock = blocking_open(addr, listening=True)
    announce(addr, lsock.getsockname())
    while True:
        conn, _ = lsock.accept()
        set_nodelay(conn)
        span = new_span()
        hdr = bytearray(HEADER.size)
        buf = memoryview(bytearray(0))  # reused; grown only for bigger frames
        try:
            while recv_exact(conn, memoryview(hdr)):
                (n,) = HEADER.unpack(hdr)
                if n > max_frame:
                    raise RuntimeError(f"frame of {n} B exceeds --max-frame")
                if len(buf) < n:
                    buf = memoryview(bytearray(n))
                if not recv_exact(conn, buf[:n]) and n:
                    raise RuntimeError("connection closed mid-frame")
                conn.sendall(hdr)
                conn.sendall(buf[:n])
                span.frame_done()
        finally:
            span.end()
            conn.close()
        if one_off:
            return


def blocking_client(addr, payload, frames, warmup):
    sock = blocking_open(addr, listening=False)
    hdr = HEADER.pack(len(payload))
    rhdr = memoryview(bytearray(HEADER.size))
    rx = memoryview(bytearray(len(payload)))

    def one():
        sock.sendall(hdr)
        sock.sendall(payload)
        if not recv_exact(sock, rhdr) or HEADER.unpack(rhdr)[0] != len(payload):
            raise RuntimeError("bad echo: payload length mismatch")
        if not recv_exact(sock, rx) and len(payload):
            raise RuntimeError("connection closed mid-frame")

    for _ in range(warmup):
        one()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames):
        one()
    t1, c1 = time.perf_counter(), time.process_time()
    sock.close()
    return t1 - t0, c1 - c0


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

    def new_span():  # one per connection; a one-off server has just one
        return ServerSpan(args.warmup_frames, report)

    if args.stack == "blocking":
        blocking_server(addr, args.one_off, args.max_frame, new_span)
    else:
        impl = {"tornado": tornado_server}.get(
            args.stack, streams_server if args.stack.endswith("streams") else protocol_server)
        asyncio.set_event_loop_policy(event_loop_policy(args.stack))
        asyncio.run(impl(args.stack, addr, args.one_off, args.max_frame, new_span))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": {"total_s": report.get("cpu_s")}}, f)
            f.write("\n")


def bench(args):
    payload = make_payload(args.frame_size)
    if args.stack == "blocking":
        secs, cpu = blocking_client(args.address, payload, args.frames, args.warmup_frames)
    else:
        impl = {"tornado": tornado_client}.get(
            args.stack, streams_client if args.stack.endswith("streams") else protocol_client)
        asyncio.set_event_loop_policy(event_loop_policy(args.stack))
        secs, cpu = asyncio.run(impl(args.stack, args.address, payload, args.frames,
                                     args.warmup_frames))
    nbytes = args.frames * args.frame_size
    mbps = nbytes / secs / 1e6 if secs > 0 else 0.0
    print(f"py_echo {args.stack}: echo {args.frames} frames x {args.frame_size} B "
          f"in {secs:.3f} s = {mbps:.1f} MB/s")
    if args.json:
        result = {
            "schema_version": 1,
            "tool": {"name": "py_echo", "stack": args.stack, **stack_versions(args.stack)},
            "params": {"mode": "echo", "frame_bytes": args.frame_size, "frames": args.frames,
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
                   help="frames echoed before the CPU span starts (match the client's)")
    s.add_argument("--json", help="write the server's CPU over the span here at exit")
    b = sub.add_parser("bench")
    b.add_argument("--stack", choices=STACKS, required=True)
    b.add_argument("address", help="HOST:PORT, unix:PATH, or - to read it from stdin")
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
