"""Cancellation never loses, tears or leaks a frame.

- A recv() cancelled (asyncio.wait_for timing out, task.cancel()) leaves the
  connection usable: the next recv() returns the next whole frame, also when
  the cancel lands while a frame is half received, or at the very moment its
  frame was handed over.
- A cancelled send() still sends the whole frame, and holds its parts until
  the kernel is done with them.
- Every pooled buffer comes back once frames are released and connections
  closed.
"""
import asyncio
import gc
import os
import random
import socket
import struct

import numpy as np
import pytest

import ringxfer

GUARD = 20  # seconds: a hang guard, never a measurement

# Engines of their own (the engine is picked by pool_budget among others),
# so that each side's pool can be counted alone. The socket transports'
# cancellation (a send the kernel cannot take while nobody reads): no move
# to shared memory, where a copied send completes at once.
CLIENT = dict(pool_budget=(4 << 30) + (1 << 20), shm_upgrade=False)
SERVER = dict(pool_budget=(4 << 30) + (2 << 20), shm_upgrade=False)


@pytest.fixture(params=["tcp", "unix"])
def transport(request):
    return request.param


def _leased(opts):
    pools = ringxfer.engine_info(**opts)["pools"]
    return sum(p["leased_buffers"] for p in pools.values())


def _leased_bytes(opts):
    pools = ringxfer.engine_info(**opts)["pools"]
    return sum(p["leased_bytes"] for p in pools.values())


async def _settle():
    # asyncio keeps a future's result (a Frame) alive until the task step
    # that awaited it ends.
    await asyncio.sleep(0)
    gc.collect()


class _Pair:
    """A client connection `a` and the server's side of it, `b`."""

    async def open(self, transport, sock_dir, client=CLIENT, server=SERVER):
        self.client_opts, self.server_opts = client, server
        self.baseline = (_leased(client), _leased(server))
        accepted = asyncio.Queue()
        self.done = asyncio.Event()

        async def cb(conn):
            await accepted.put(conn)
            await self.done.wait()

        if transport == "tcp":
            self.srv = await ringxfer.start_server(cb, "127.0.0.1", 0, **server)
            self.a = await ringxfer.open_connection(*self.srv.address, **client)
        else:
            path = os.path.join(sock_dir, "s")
            self.srv = await ringxfer.start_server(cb, path=path, **server)
            self.a = await ringxfer.open_connection(path=path, **client)
        self.b = await asyncio.wait_for(accepted.get(), GUARD)
        return self

    async def close_and_check_leaks(self, queued_ok=False):
        """Closes both sides; then every pooled buffer is back. Frames still
        queued unreceived belong to their Connection until it is collected
        (`queued_ok`: the caller dropped its references to a and b)."""
        for c in (self.a, self.b):
            if not queued_ok:
                assert c.counters["frames_queued"] == 0
            c.close()
            await c.wait_closed()
            assert c.counters["sends_in_flight"] == 0
        self.a = self.b = c = None
        self.done.set()
        self.srv.close()
        await self.srv.wait_closed()
        await _settle()
        await _settle()  # the server callback's task ended
        assert (_leased(self.client_opts), _leased(self.server_opts)) == self.baseline


def _stamped(i, size):
    """Frame i: its index in the first 8 bytes, then a pattern of i."""
    assert size >= 8
    body = np.full(size, i % 251, dtype=np.uint8)
    body[:8] = np.frombuffer(struct.pack("<Q", i), np.uint8)
    return body


def _index_of(frame):
    data = np.frombuffer(frame, np.uint8)
    i = struct.unpack("<Q", data[:8].tobytes())[0]
    assert np.all(data[8:] == i % 251), f"frame {i} is torn"
    return i


def test_wait_for_timeout_keeps_the_connection_usable(run, transport, sock_dir):
    async def main():
        p = await _Pair().open(transport, sock_dir)
        a, b = p.a, p.b
        for _ in range(3):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a.recv(), 0.01)  # nothing was sent
        t = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        # Frames sent after the timeouts come whole, in order.
        sizes = [8, 9, 100_000, 3_000_000]
        for i, n in enumerate(sizes):
            await b.send(_stamped(i, n))
        for i, n in enumerate(sizes):
            f = await asyncio.wait_for(a.recv(), GUARD)
            assert len(f) == n and _index_of(f) == i
            f.release()
        del f
        await p.close_and_check_leaks()
    run(main())


def _listen(transport, sock_dir):
    if transport == "tcp":
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        where = dict(host="127.0.0.1", port=ls.getsockname()[1])
    else:
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(sock_dir, "raw")
        ls.bind(path)
        where = dict(path=path)
    ls.listen()
    ls.setblocking(False)
    return ls, where


def test_cancel_while_a_frame_is_half_received(run, transport, sock_dir):
    """The cancel lands while the engine holds half of a frame: the next
    recv() returns the whole frame once the rest arrives."""
    async def main():
        loop = asyncio.get_running_loop()
        ls, where = _listen(transport, sock_dir)
        a = await ringxfer.open_connection(**where, **CLIENT)
        peer, _ = await asyncio.wait_for(loop.sock_accept(ls), GUARD)
        try:
            payload = bytes(_stamped(5, 2_000_000))
            head = struct.pack("<2sBBIQ", b"RX", 1, 0, 0, len(payload))
            first = head + payload[:700_000]
            await loop.sock_sendall(peer, first)
            # Wait (for a state, not a time) until the engine read the
            # header and leased the frame's buffer.
            while _leased_bytes(CLIENT) < len(payload):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(a.recv(), 0.001)
            for style in ("wait_for", "cancel"):
                if style == "wait_for":
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(a.recv(), 0.01)
                else:
                    t = asyncio.ensure_future(a.recv())
                    await asyncio.sleep(0)
                    t.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await t
            await loop.sock_sendall(peer, payload[700_000:])
            f = await asyncio.wait_for(a.recv(), GUARD)
            assert bytes(f) == payload
            del f
            # And the connection goes on, both ways.
            await loop.sock_sendall(peer, head[:8] + struct.pack("<Q", 3) + b"end")
            assert bytes(await asyncio.wait_for(a.recv(), GUARD)) == b"end"
            await a.send(b"back")
            got = b""
            while len(got) < 20:
                got += await asyncio.wait_for(loop.sock_recv(peer, 64), GUARD)
            assert got[16:] == b"back"
        finally:
            peer.close()
            ls.close()
            a.close()
            await a.wait_closed()
        await _settle()
        assert _leased(CLIENT) == 0
    run(main())


class _CoreHook:
    """Wraps Connection._core: calls `on_future(fut)` with each future
    recv() returns, before recv() awaits it, and counts unrecv() calls."""

    def __init__(self, core, on_future):
        self._core = core
        self._on_future = on_future
        self.unrecvs = 0

    def recv(self):
        r = self._core.recv()
        if not isinstance(r, ringxfer.Frame):
            self._on_future(r)
        return r

    def unrecv(self, frame):
        self.unrecvs += 1
        return self._core.unrecv(frame)

    def __getattr__(self, name):
        return getattr(self._core, name)


def test_cancel_at_the_moment_the_frame_arrives(run, transport, sock_dir):
    """The exact race: the recv()'s future gets its frame, and the task is
    cancelled before it runs again. The frame must stay queued."""
    async def main():
        p = await _Pair().open(transport, sock_dir)
        a, b = p.a, p.b
        tasks = []

        # Runs as the future's first done callback, i.e. before the task's
        # own wake-up: the frame is handed over, then the cancel lands.
        def cancel_on_delivery(fut):
            fut.add_done_callback(lambda _: tasks[-1].cancel())

        hook = _CoreHook(a._core, cancel_on_delivery)
        a._core = hook
        n = 20
        for i in range(n):
            tasks.append(asyncio.ensure_future(a.recv()))
            await asyncio.sleep(0)  # the task now waits on its future
            await b.send(_stamped(i, 1000 + 50_000 * (i % 4)))
            with pytest.raises(asyncio.CancelledError):
                await tasks[-1]
            assert hook.unrecvs == i + 1  # handed over, then put back
            # The next recv() returns that frame.
            f = await asyncio.wait_for(a.recv(), GUARD)
            assert _index_of(f) == i
            del f
        assert a.counters["frames_queued"] == 0
        a._core = hook._core
        tasks.clear()
        await p.close_and_check_leaks()
    run(main())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_cancels_lose_nothing(run, transport, sock_dir, seed):
    """N frames, recv() tasks cancelled at random points (a seeded RNG):
    every frame is received exactly once, whole and in order."""
    n = 600

    async def main():
        rng = random.Random(seed)
        sizes = [rng.choice([8, 100, 4096, 60_000, 300_000, 1_500_000]) for _ in range(n)]
        p = await _Pair().open(transport, sock_dir)
        a, b = p.a, p.b

        async def sender():
            # Paced by the loop (not by time), so that frames often arrive
            # while a recv() waits, and at random points of its cancel.
            pace = random.Random(seed + 1000)
            for i, size in enumerate(sizes):
                for _ in range(pace.randrange(0, 12)):
                    await asyncio.sleep(0)
                await b.send(_stamped(i, size))

        sending = asyncio.ensure_future(sender())
        got = []
        outcomes = {"frame": 0, "cancelled": 0, "timeout": 0}
        while len(got) < n:
            how = rng.random()
            if how < 0.3:
                try:
                    f = await asyncio.wait_for(a.recv(), rng.choice([0, 0, 1e-5, 1e-4, 1e-3]))
                except asyncio.TimeoutError:
                    outcomes["timeout"] += 1
                    continue
            else:
                t = asyncio.ensure_future(a.recv())
                for _ in range(rng.randrange(0, 6)):
                    await asyncio.sleep(0)
                if how < 0.9:
                    t.cancel()
                try:
                    f = await asyncio.wait_for(t, GUARD)
                except asyncio.CancelledError:
                    outcomes["cancelled"] += 1
                    continue
            outcomes["frame"] += 1
            assert len(f) == sizes[len(got)]
            got.append(_index_of(f))
            f.release()
            del f
        await asyncio.wait_for(sending, GUARD)
        assert got == list(range(n))
        assert outcomes["cancelled"] > 0 and outcomes["timeout"] > 0
        # Nothing more is queued: no frame was received twice.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(a.recv(), 0.01)
        assert a.counters["frames_received"] == n
        await p.close_and_check_leaks()
    run(main())


@pytest.mark.parametrize("style", ["cancel", "wait_for"])
def test_cancelled_send_still_sends_the_whole_frame(run, transport, sock_dir, style):
    async def main():
        # The server side queues at most 1 MiB ahead of recv(): with nobody
        # calling b.recv(), a 64 MB send cannot finish.
        p = await _Pair().open(transport, sock_dir, server=dict(SERVER, read_ahead=1 << 20))
        a, b = p.a, p.b
        await a.send(_stamped(0, 1 << 20))
        payload = bytearray(np.random.default_rng(3).integers(0, 256, 64_000_000,
                                                              dtype=np.uint8).tobytes())
        want = bytes(payload)
        if style == "cancel":
            t = asyncio.ensure_future(a.send(payload, b"-tail"))
            while a.counters["sends_in_flight"] == 0:  # the send was submitted
                await asyncio.sleep(0)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a.send(payload, b"-tail"), 0.01)
        # Still in the kernel's hands: the parts are held (a bytearray with
        # an export cannot be resized).
        assert a.counters["sends_in_flight"] == 1
        with pytest.raises(BufferError):
            payload.extend(b"x")
        # A send made meanwhile goes after it, not into it.
        after = asyncio.ensure_future(a.send(b"after"))
        await asyncio.sleep(0)

        f = await asyncio.wait_for(b.recv(), GUARD)
        assert _index_of(f) == 0
        del f
        f = await asyncio.wait_for(b.recv(), GUARD)
        assert len(f) == len(want) + 5 and bytes(f) == want + b"-tail"
        del f
        assert bytes(await asyncio.wait_for(b.recv(), GUARD)) == b"after"
        await asyncio.wait_for(after, GUARD)
        # A later send() returned: the kernel is done with the cancelled
        # one's parts, they are free again.
        assert a.counters["sends_in_flight"] == 0
        payload.extend(b"x")
        # Usable both ways.
        await a.send(b"ping")
        assert bytes(await asyncio.wait_for(b.recv(), GUARD)) == b"ping"
        await b.send(b"pong")
        assert bytes(await asyncio.wait_for(a.recv(), GUARD)) == b"pong"
        assert a.counters["frames_sent"] == 4
        await p.close_and_check_leaks()
    run(main())


def test_cancelled_send_of_pooled_frames_leaks_nothing(run, transport, sock_dir):
    """Frames from allocate() sent and cancelled, frames received and
    dropped mid-way: the pools return to their baselines."""
    async def main():
        p = await _Pair().open(transport, sock_dir, server=dict(SERVER, read_ahead=1 << 20))
        a, b = p.a, p.b
        bufs = []
        for i in range(4):
            buf = a.allocate(20_000_000)
            np.frombuffer(buf, np.uint8)[:] = _stamped(i, 20_000_000)
            bufs.append(buf)
        sends = [asyncio.ensure_future(a.send(buf)) for buf in bufs]
        while a.counters["sends_in_flight"] + a.counters["frames_sent"] < 4:
            await asyncio.sleep(0)  # every send was submitted
        for t in sends:
            t.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        # The Frames themselves may go: the sends keep their memory.
        del bufs, buf, sends, t
        await _settle()
        for i in range(4):
            f = await asyncio.wait_for(b.recv(), GUARD)
            assert len(f) == 20_000_000 and _index_of(f) == i
            del f
        # Some frames received but never taken by recv(), one cancelled
        # recv() waiting: closing frees them all.
        for i in range(3):
            await b.send(_stamped(i, 3_000_000))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.recv(), 0.001)
        await asyncio.wait_for(a.send(b"sync"), GUARD)  # the cancelled sends are done
        del a, b
        await p.close_and_check_leaks(queued_ok=True)
    run(main())


def test_second_concurrent_recv_is_refused(run, transport, sock_dir):
    async def main():
        p = await _Pair().open(transport, sock_dir)
        a, b = p.a, p.b
        first = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="another recv"):
            await a.recv()
        # The refused call took nothing: the first one gets the frame.
        await b.send(b"one")
        assert bytes(await asyncio.wait_for(first, GUARD)) == b"one"
        # Once the waiting recv() is cancelled, a new one may wait.
        first = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0)
        await b.send(b"two")
        assert bytes(await asyncio.wait_for(second, GUARD)) == b"two"
        del first, second
        await p.close_and_check_leaks()
    run(main())
