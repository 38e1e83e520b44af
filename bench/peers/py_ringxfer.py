#!/usr/bin/env python3
"""The ringxfer Python package as a peer of bench/compare (`py-ringxfer`).

Written the way a user of the package writes it, with its public API only
(ringxfer.start_server, open_connection, Connection.send / recv / async for);
frames are ringxfer's own wire format, so nothing is framed in Python.

  echo    the client sends one frame and awaits its echo, one frame in flight
          (the seed's benchmark, like bench/peers/py_echo.py); the server is
          `async for frame in conn: await conn.send(frame)`, which sends the
          received pooled buffer back as it is (no copy in Python)
  stream  the client sends frames back to back: `for ...: await
          conn.send(payload)`. That is how a user streams with this API, and
          it keeps the socket full: send() returns as soon as the kernel has
          taken the frame's bytes into the socket buffer (at once while there
          is room, without a trip through the event loop), so one send is in
          flight at a time and the kernel always has the socket buffer's worth
          queued; a window of send() tasks (asyncio.gather) only adds a Task
          per frame (`--window N` measures that variant). Frames under 1 MiB
          are written instead, as docs/python.md advises: `conn.write(payload)`
          per frame and `await conn.drain()` per MiB, so they leave gathered,
          many per SENDMSG (`--send send|write` forces one way). The server is
          `async for frame in conn:` counting len(frame) and releasing each
          frame at once. A zero-length frame is a barrier, as in
          bench/blocking_echo and bench/peers/epoll_echo: the server answers
          it with its count of frames and payload bytes received since the
          previous barrier, so the clock starts once the warmup frames were
          consumed and stops once the last measured frame was, and the client
          checks that the server received every measured byte.

The client's first frame says the mode (b"echo" or b"stream"): one server
serves both, as `ringxfer serve` does. The payload is built once, as bytes,
and sent from where it is (send() gathers it by reference, no copy).

    py_ringxfer.py serve --listen HOST:PORT|unix:PATH [--one-off]
                         [--warmup-frames W] [--json FILE] [--loop asyncio|uvloop]
                         [--backend auto|uring|epoll] [--busy-poll US]
    py_ringxfer.py bench HOST:PORT|unix:PATH|- --mode echo|stream --frame-size SIZE
                         --frames N [--warmup-frames W] [--json FILE]
                         [--loop asyncio|uvloop] [--backend auto|uring|epoll] [--busy-poll US] [--window N]
    (both)               [--rss-at N[,N...]]: VmRSS after the N-th frame, into the JSON

Every option of the package is left at its default (bench/compare passes
none of --loop, --backend, --busy-poll, --window); they are there to look into a result.

`serve` prints "listening ADDR" (the bound port filled in) once it accepts.
`bench -` reads the address from the first line of stdin. CPU seconds (user
+ system, time.process_time()) cover the measured span only: the client's
from its first measured send to its last echo (echo) or to the answer of the
closing barrier (stream); the server's, written by `serve --json` of a
one-off server, from the echo of its W-th frame to the connection's end
(echo) or from its answer to the first barrier to its answer to the second
(stream). Throughput = payload bytes of measured frames echoed (echo) or
received by the server (stream) / s, in MB/s (10^6 B).

The package is imported from PYTHONPATH when it is there (bench/compare
passes its snapshot of the build's python/ folder), else from
REPO/build/python. Exit status: 0 ok, 1 transfer failed, 2 usage, 3 the
package (or uvloop) cannot be imported.
"""
import argparse
import asyncio
import json
import os
import platform
import struct
import sys
import time

# The seed's stacks' peer parses sizes and addresses the same way.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from py_echo import parse_address, parse_size  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BARRIER_REPLY = struct.Struct("<QQ")  # frames, payload bytes since the previous barrier
MODES = (b"echo", b"stream")


class Missing(Exception):
    """The ringxfer package or the asked event loop cannot be imported."""


def import_ringxfer():
    try:
        import ringxfer
    except ImportError:
        build = os.path.join(REPO, "build", "python")
        if build in sys.path:
            raise
        sys.path.append(build)
        try:
            import ringxfer
        except ImportError as e:
            raise Missing(f"cannot import ringxfer (PYTHONPATH or {build}): {e}; "
                          "build it with `ninja -C build`") from e
    return ringxfer


def make_payload(n):
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def event_loop_policy(name):
    if name == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            raise Missing(f"--loop uvloop needs python3-uvloop ({e})") from e
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


# ----------------------------------------------------------------- server --

class RssMarks:
    """The process's resident set (VmRSS) after given frame counts, for the
    memory row of bench/rows: `--rss-at 20,300` records it after the 20th
    and the 300th frame (warmup frames included) into the JSON's rss_bytes."""

    def __init__(self, at):
        self.at, self.frames, self.rss = set(at), 0, {}

    def tick(self):
        self.frames += 1
        if self.frames in self.at:
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            self.rss[str(self.frames)] = kib * 1024


def parse_counts(s):
    try:
        counts = [int(x) for x in s.split(",") if x]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"bad frame counts '{s}': expected N[,N...], N >= 1")
    return counts


class ServerSpan:
    """The server's CPU over the client's measured span (see the module doc)."""

    def __init__(self, report):
        self.report, self.start = report, None

    def begin(self):
        self.start = time.process_time()

    def end(self):
        if self.start is not None and "cpu_s" not in self.report:
            self.report["cpu_s"] = time.process_time() - self.start


async def serve_echo(conn, warmup, span, marks):
    left = warmup
    if left == 0:
        span.begin()
    async for frame in conn:
        await conn.send(frame)
        marks.tick()
        if left > 0:
            left -= 1
            if left == 0:
                span.begin()


async def serve_stream(conn, span, report, marks):
    frames = nbytes = barriers = 0
    async for frame in conn:
        n = len(frame)
        frame.release()
        if n:
            marks.tick()
            frames += 1
            nbytes += n
            continue
        # A barrier: everything sent before it has been received.
        barriers += 1
        if barriers == 2:
            span.end()  # the client's clock stops at this answer
            report["frames"], report["bytes"] = frames, nbytes
        await conn.send(BARRIER_REPLY.pack(frames, nbytes))
        if barriers == 1:
            span.begin()
        frames = nbytes = 0


async def server_main(ringxfer, addr, one_off, warmup, options, report, marks):
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def handle(conn):
        span = ServerSpan(report)
        error = None
        try:
            async with conn:
                hello = await conn.recv()
                mode = bytes(hello)
                hello.release()
                if mode == b"echo":
                    await serve_echo(conn, warmup, span, marks)
                elif mode == b"stream":
                    await serve_stream(conn, span, report, marks)
                else:
                    raise RuntimeError(f"unknown mode {mode[:20]!r} in the client's first frame")
        except Exception as e:  # reported by the one-off server's exit status
            error = e
        finally:
            span.end()
            if not done.done():
                done.set_result(error)

    if addr[0] == "unix":
        server = await ringxfer.start_server(handle, path=addr[1], **options)
        print(f"listening unix:{server.address}", flush=True)
    else:
        server = await ringxfer.start_server(handle, addr[1], addr[2], **options)
        print(f"listening {addr[1]}:{server.address[1]}", flush=True)
    async with server:
        if not one_off:
            await server.serve_forever()
        error = await done
    if error is not None:
        raise RuntimeError(f"server: {type(error).__name__}: {error}")


# ----------------------------------------------------------------- client --

async def connect(ringxfer, addr, options):
    if addr[0] == "unix":
        return await ringxfer.open_connection(path=addr[1], **options)
    return await ringxfer.open_connection(addr[1], addr[2], **options)


async def echo_client(conn, payload, frames, warmup, marks):
    size = len(payload)

    async def one():
        await conn.send(payload)
        frame = await conn.recv()
        if len(frame) != size:
            raise RuntimeError(f"bad echo: {len(frame)} bytes back for {size} sent")
        frame.release()
        marks.tick()

    for _ in range(warmup):
        await one()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(frames):
        await one()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, frames * size


WRITE_BELOW = 1 << 20    # --send auto: write() + drain() for frames under this
DRAIN_EVERY = 1 << 20    # bytes written between drain()s: one SENDMSG's worth


async def stream_client(conn, payload, frames, warmup, window, marks, how):
    if how == "auto":
        how = "write" if len(payload) < WRITE_BELOW else "send"
    every = max(1, DRAIN_EVERY // max(1, len(payload)))

    async def send_frames(n):
        if how == "write":
            for i in range(n):
                conn.write(payload)
                marks.tick()
                if i % every == every - 1:
                    await conn.drain()
            await conn.drain()
            return
        if window <= 1:
            for _ in range(n):
                await conn.send(payload)
                marks.tick()
            return
        while n > 0:
            k = min(window, n)
            await asyncio.gather(*[conn.send(payload) for _ in range(k)])
            for _ in range(k):
                marks.tick()
            n -= k

    async def barrier():
        await conn.send(b"")
        reply = await conn.recv()
        got = BARRIER_REPLY.unpack(reply)
        reply.release()
        return got

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


async def client_main(ringxfer, args, payload, marks):
    conn = await connect(ringxfer, args.address, conn_options(args))
    args.backend_used = conn.backend
    async with conn:
        await conn.send(args.mode.encode())
        if args.mode == "echo":
            return await echo_client(conn, payload, args.frames, args.warmup_frames, marks)
        return await stream_client(conn, payload, args.frames, args.warmup_frames, args.window,
                                   marks, args.send)


# ------------------------------------------------------------------- main --

def versions(ringxfer, loop):
    v = {"python": platform.python_version(), "ringxfer": ringxfer.__version__, "loop": loop}
    if loop == "uvloop":
        import uvloop
        v["uvloop"] = uvloop.__version__
    return v


def conn_options(args):
    """The package's options this run sets; everything else is its default."""
    opts = {"max_frame": args.max_frame}
    if args.backend != "auto":
        opts["backend"] = args.backend
    if args.busy_poll is not None:
        opts["busy_poll_us"] = args.busy_poll
    return opts


def serve(args):
    ringxfer = import_ringxfer()
    asyncio.set_event_loop_policy(event_loop_policy(args.loop))
    report = {}
    marks = RssMarks(args.rss_at)
    asyncio.run(server_main(ringxfer, args.listen, args.one_off, args.warmup_frames,
                            conn_options(args), report, marks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": {"total_s": report.get("cpu_s")},
                       "received": {"frames": report.get("frames"),
                                    "bytes": report.get("bytes")},
                       "rss_bytes": marks.rss}, f)
            f.write("\n")


def bench(args):
    ringxfer = import_ringxfer()
    asyncio.set_event_loop_policy(event_loop_policy(args.loop))
    payload = make_payload(args.frame_size)
    if args.mode == "stream" and args.frame_size == 0:
        raise RuntimeError("--mode stream needs --frame-size of at least 1 "
                           "(a zero-length frame is the barrier)")
    marks = RssMarks(args.rss_at)
    secs, cpu, nbytes = asyncio.run(client_main(ringxfer, args, payload, marks))
    mbps = nbytes / secs / 1e6 if secs > 0 else 0.0
    print(f"py_ringxfer ({args.loop}, {args.backend_used}): {args.mode} {args.frames} frames x {args.frame_size} B "
          f"in {secs:.3f} s = {mbps:.1f} MB/s")
    if args.json:
        result = {
            "schema_version": 1,
            "tool": {"name": "py_ringxfer", "stack": "ringxfer", **versions(ringxfer, args.loop),
                     "backend": args.backend_used},
            "params": {"mode": args.mode, "frame_bytes": args.frame_size, "frames": args.frames,
                       "transport": args.address[0], "warmup_frames": args.warmup_frames,
                       "window": args.window if args.mode == "stream" else 1,
                       "send": args.send},
            "results": {"frames": args.frames, "bytes": nbytes, "seconds": secs,
                        "throughput_mbps": mbps, "errors": 0,
                        "cpu": {"client": {"total_s": cpu}}, "rss_bytes": marks.rss},
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", type=parse_address, required=True)
    s.add_argument("--one-off", action="store_true", help="exit after the first connection")
    s.add_argument("--max-frame", type=parse_size, default=1 << 30)
    s.add_argument("--warmup-frames", type=int, default=1,
                   help="echo: frames echoed before the CPU span starts (match the client's)")
    s.add_argument("--json", help="write the server's CPU over the span here at exit")
    s.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    s.add_argument("--backend", choices=("auto", "uring", "epoll"), default="auto",
                   help="the package's backend option (default: its own choice)")
    s.add_argument("--busy-poll", type=float, metavar="US",
                   help="the package's busy_poll_us option (default: its own, auto)")
    s.add_argument("--rss-at", type=parse_counts, default=[], metavar="N[,N...]",
                   help="record VmRSS after these frame counts (the JSON's rss_bytes)")
    b = sub.add_parser("bench")
    b.add_argument("address", help="HOST:PORT, unix:PATH, or - to read it from stdin")
    b.add_argument("--mode", choices=("echo", "stream"), default="echo")
    b.add_argument("--frame-size", type=parse_size, required=True)
    b.add_argument("--frames", type=int, required=True)
    b.add_argument("--warmup-frames", type=int, default=1)
    b.add_argument("--max-frame", type=parse_size, default=1 << 30)
    b.add_argument("--json")
    b.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    b.add_argument("--backend", choices=("auto", "uring", "epoll"), default="auto",
                   help="the package's backend option (default: its own choice)")
    b.add_argument("--busy-poll", type=float, metavar="US",
                   help="the package's busy_poll_us option (default: its own, auto)")
    b.add_argument("--window", type=int, default=1,
                   help="stream: send() calls in flight at once (1: await each; "
                        "N: asyncio.gather of N sends)")
    b.add_argument("--send", choices=("auto", "send", "write"), default="auto",
                   help="stream: `await conn.send()` per frame, or `conn.write()` with an "
                        "`await conn.drain()` per MiB (auto: write below 1 MiB, as "
                        "docs/python.md advises)")
    b.add_argument("--rss-at", type=parse_counts, default=[], metavar="N[,N...]",
                   help="record VmRSS after these frame counts (the JSON's rss_bytes)")
    args = ap.parse_args()
    if args.cmd == "bench":
        try:
            args.address = parse_address(sys.stdin.readline().strip() if args.address == "-"
                                         else args.address)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
        if args.frames < 0 or args.warmup_frames < 0 or args.window < 1:
            ap.error("--frames and --warmup-frames must not be negative, --window at least 1")
    try:
        serve(args) if args.cmd == "serve" else bench(args)
    except Missing as e:
        print(f"py_ringxfer: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # OSError, ringxfer's errors, RuntimeError, ...
        print(f"py_ringxfer: {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
