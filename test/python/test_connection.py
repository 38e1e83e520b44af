"""Connections: open_connection / start_server over TCP and Unix sockets,
gathered sends, async iteration, close, counters."""
import asyncio
import os

import numpy as np
import pytest

import ringxfer
from conftest import echo_handler


@pytest.fixture(params=["tcp", "unix"])
def transport(request):
    return request.param


async def _serve(transport, sock_dir, handler=echo_handler, **options):
    if transport == "tcp":
        srv = await ringxfer.start_server(handler, "127.0.0.1", 0, **options)
        host, port = srv.address
        return srv, dict(host=host, port=port)
    path = os.path.join(sock_dir, "s")
    srv = await ringxfer.start_server(handler, path=path, **options)
    assert srv.address == path
    return srv, dict(path=path)


def test_echo_sizes(run, transport, sock_dir):
    async def main():
        srv, where = await _serve(transport, sock_dir)
        async with srv:
            async with await ringxfer.open_connection(**where) as conn:
                assert conn.transport == transport
                rng = np.random.default_rng(1)
                for size in (0, 1, 15, 16, 4095, 4096, 65536, 1 << 20, 10_000_003):
                    data = rng.integers(0, 256, size, dtype=np.uint8)
                    await conn.send(data)
                    frame = await conn.recv()
                    assert len(frame) == size
                    assert np.array_equal(np.frombuffer(frame, np.uint8), data)
    run(main())


def test_gathered_send_is_one_frame(run, transport, sock_dir):
    async def main():
        srv, where = await _serve(transport, sock_dir)
        async with srv:
            async with await ringxfer.open_connection(**where, checksum=True) as conn:
                parts = [b"head", bytearray(b"-mid-"), memoryview(b"xtail")[1:],
                         np.arange(4, dtype="<u2")]
                await conn.send(*parts)
                frame = await conn.recv()
                assert bytes(frame) == b"head-mid-tail" + np.arange(4, dtype="<u2").tobytes()
                # A received frame can be sent on as a part, with others.
                await conn.send(frame, b"!")
                again = await conn.recv()
                assert bytes(again) == bytes(frame) + b"!"
    run(main())


def test_many_small_frames_in_order(run, transport, sock_dir):
    async def main():
        srv, where = await _serve(transport, sock_dir)
        async with srv:
            async with await ringxfer.open_connection(**where) as conn:
                async def sender():
                    for i in range(5000):
                        await conn.send(i.to_bytes(4, "little") * (i % 7 + 1))
                task = asyncio.ensure_future(sender())
                for i in range(5000):
                    f = await conn.recv()
                    assert bytes(f) == i.to_bytes(4, "little") * (i % 7 + 1)
                await task
                c = conn.counters
                assert c["frames_received"] == 5000 and c["frames_sent"] == 5000
    run(main())


def test_async_for_ends_at_clean_close(run, transport, sock_dir):
    async def producer(conn):
        async with conn:
            for i in range(10):
                await conn.send(bytes([i]) * 100)

    async def main():
        srv, where = await _serve(transport, sock_dir, producer)
        async with srv:
            conn = await ringxfer.open_connection(**where)
            got = [bytes(f)[0] async for f in conn]
            assert got == list(range(10))
            with pytest.raises(ringxfer.ConnectionClosed):
                await conn.recv()
            with pytest.raises(EOFError):  # the builtin users catch
                await conn.recv()
            conn.close()
            await conn.wait_closed()
    run(main())


def test_close_wakes_a_waiting_recv(run, transport, sock_dir):
    async def silent(conn):
        with pytest.raises(ringxfer.ConnectionClosed):
            await conn.recv()  # nothing is sent; ends when the client closes

    async def main():
        srv, where = await _serve(transport, sock_dir, silent)
        async with srv:
            conn = await ringxfer.open_connection(**where)
            waiter = asyncio.ensure_future(conn.recv())
            await asyncio.sleep(0.01)
            conn.close()
            with pytest.raises(ConnectionAbortedError):
                await waiter
            await conn.wait_closed()
            with pytest.raises(ConnectionAbortedError):
                await conn.send(b"late")
            with pytest.raises(ConnectionAbortedError):
                await conn.recv()
            assert conn.is_closing()
    run(main())


def test_server_address_and_close(run, sock_dir):
    async def main():
        srv = await ringxfer.start_server(echo_handler, port=0)
        host, port = srv.address
        assert host == "0.0.0.0" and port > 0
        conn = await ringxfer.open_connection("127.0.0.1", port)
        srv.close()
        await srv.wait_closed()
        assert not srv.is_serving()
        # The connection made before close() is still served.
        await conn.send(b"still here")
        assert bytes(await conn.recv()) == b"still here"
        conn.close()
        with pytest.raises(ConnectionRefusedError):
            await ringxfer.open_connection("127.0.0.1", port)
        path = os.path.join(sock_dir, "gone")
        srv = await ringxfer.start_server(echo_handler, path=path)
        assert os.path.exists(path)
        srv.close()
        assert not os.path.exists(path)  # the server removes its socket file
    run(main())


def test_bad_options_are_refused_clearly(run):
    async def main():
        with pytest.raises(TypeError, match="unknown ringxfer option"):
            await ringxfer.open_connection("127.0.0.1", 1, max_frames=3)
        with pytest.raises(ValueError, match="busy_poll_us must be 'auto' or a number"):
            await ringxfer.open_connection("127.0.0.1", 1, busy_poll_us="fast")
        info = ringxfer.engine_info()
        assert info["busy_poll_us"] == (50 if len(os.sched_getaffinity(0)) >= 2 else 0)
        assert ringxfer.engine_info(busy_poll_us=7)["busy_poll_us"] == 7
        with pytest.raises(ValueError, match="backend"):
            await ringxfer.open_connection("127.0.0.1", 1, backend="kqueue")
        with pytest.raises(ValueError, match="recv_buffer must be an int from 4096 to 64 MiB"):
            await ringxfer.open_connection("127.0.0.1", 1, recv_buffer=100)
        with pytest.raises(TypeError, match="either host/port or path"):
            await ringxfer.open_connection("127.0.0.1", 1, path="/tmp/x")
    run(main())


def test_epoll_backend(run, transport, sock_dir):
    async def main():
        srv, where = await _serve(transport, sock_dir, backend="epoll")
        async with srv:
            async with await ringxfer.open_connection(**where, backend="epoll") as conn:
                assert conn.backend == "epoll"
                await conn.send(b"e" * 3_000_000)
                assert bytes(await conn.recv()) == b"e" * 3_000_000
    run(main())


def test_send_from_another_thread_is_refused(run):
    async def main():
        srv = await ringxfer.start_server(echo_handler, "127.0.0.1", 0)
        async with srv:
            async with await ringxfer.open_connection(*srv.address) as conn:
                loop = asyncio.get_running_loop()
                with pytest.raises(RuntimeError, match="thread"):
                    await loop.run_in_executor(None, lambda: conn._core.send(b"x"))
    run(main())


SERVER_SCRIPT = r"""
import asyncio, sys, ringxfer
async def echo(conn):
    async for frame in conn:
        await conn.send(frame)
async def main():
    srv = await ringxfer.start_server(echo, "127.0.0.1", 0)
    print(srv.address[1], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_ping_pong_with_another_process_never_waits_for_a_lost_wakeup(run):
    # Between two processes each side sleeps in its event loop until the
    # ring's eventfd says a completion is there. A completion left
    # unsignalled (DEFER_TASKRUN task work, see python/src/core.cpp) showed
    # up as ~30 round trips/s: 2000 of them would take over a minute and
    # hit the deadline; signalled, they take well under a second.
    import subprocess, sys
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], stdout=subprocess.PIPE,
                            env=dict(os.environ))
    try:
        port = int(proc.stdout.readline())

        async def main():
            async with await ringxfer.open_connection("127.0.0.1", port) as conn:
                for i in range(2000):
                    await conn.send(i.to_bytes(8, "little") * 512)
                    frame = await conn.recv()
                    assert bytes(memoryview(frame)[:8]) == i.to_bytes(8, "little")
        run(main(), limit=30)
    finally:
        proc.kill()
        proc.wait()


def test_busy_polling_recv_takes_a_frame_that_arrives_while_it_polls(run):
    # busy_poll_us: a recv() that finds nothing polls the ring before it
    # hands the loop a future. A peer thread writes a frame 50 ms after the
    # trigger; with a 1 s polling window, the engine's own recv() returns the
    # Frame itself (it never had to wait in the loop). Without polling it
    # returns a future: the second half checks that the first can tell.
    import socket, struct, threading
    header = struct.Struct("<2sBBIQ")

    def peer(lsock, go):
        s, _ = lsock.accept()
        with s:
            go.wait(10)
            import time
            time.sleep(0.05)
            s.sendall(header.pack(b"RX", 1, 0, 0, 5) + b"hello")
            s.recv(1)  # until the client closes

    async def once(busy_poll_us):
        lsock = socket.create_server(("127.0.0.1", 0))
        go = threading.Event()
        t = threading.Thread(target=peer, args=(lsock, go), daemon=True)
        t.start()
        try:
            conn = await ringxfer.open_connection(*lsock.getsockname(), busy_poll_us=busy_poll_us)
            async with conn:
                go.set()
                r = conn._core.recv()
                got = r if isinstance(r, ringxfer.Frame) else await r
                assert bytes(got) == b"hello"
                return isinstance(r, ringxfer.Frame)
        finally:
            t.join(10)
            lsock.close()

    async def main():
        assert await once(1_000_000), "the polling recv() did not take the frame itself"
        assert not await once(0)
    run(main())


def test_copies_are_counted_as_docs_design_md_says(run, transport, sock_dir):
    # docs/design.md "Copies per payload byte", the Python rows: a part of the
    # caller's memory or a pooled buffer is sent where it is (0 copies); a
    # lone frame of up to 240 bytes is copied next to its header once; a
    # large frame after a large one is received straight into its buffer.
    async def main():
        # The copies of TCP and Unix sockets: no move to shared memory.
        srv, where = await _serve(transport, sock_dir, shm_upgrade=False)
        async with srv:
            async with await ringxfer.open_connection(**where, shm_upgrade=False) as conn:
                big = np.arange(2_000_000, dtype="<u4")  # 8 MB
                for _ in range(3):
                    await conn.send(big)
                    (await conn.recv()).release()
                buf = conn.allocate(1_000_000)
                await conn.send(buf)
                (await conn.recv()).release()
                c = conn.counters
                assert c["send_copied_bytes"] == 0
                # only bytes that came with a header: well under one frame
                assert c["receive_copied_bytes"] < 3 * 65536, c
                await conn.send(b"x" * 100)
                (await conn.recv()).release()
                assert conn.counters["send_copied_bytes"] == 100
    run(main())


def test_written_frames_leave_gathered_in_order(run, transport, sock_dir):
    # write() queues without entering the kernel: frames written before the
    # loop runs again leave together, many per SENDMSG (sends_gathered),
    # in order, interleaved with send() as they were called.
    async def main():
        srv, where = await _serve(transport, sock_dir)
        async with srv:
            async with await ringxfer.open_connection(**where) as conn:
                assert await conn.drain() is None  # nothing written
                n = 300
                for i in range(n):
                    conn.write(i.to_bytes(4, "little") * 256)  # 1 KiB: no inline copy
                assert conn.counters["writes_in_flight"] == n
                await conn.send(b"after the writes")
                conn.write(b"last", memoryview(b" part"))
                await conn.drain()
                c = conn.counters
                assert c["writes_in_flight"] == 0
                assert c["sends_gathered"] >= n // 2, c
                for i in range(n):
                    with await conn.recv() as f:
                        assert bytes(f) == i.to_bytes(4, "little") * 256
                assert bytes(await conn.recv()) == b"after the writes"
                assert bytes(await conn.recv()) == b"last part"
                assert c["send_copied_bytes"] == 0
    run(main())


def test_a_written_buffer_is_held_until_drained(run, sock_dir):
    async def main():
        srv, where = await _serve("unix", sock_dir)
        async with srv:
            async with await ringxfer.open_connection(**where) as conn:
                buf = bytearray(b"x" * 100_000)
                conn.write(buf)
                with pytest.raises(BufferError):
                    buf.extend(b"more")  # still exported: the kernel may read it
                await conn.drain()
                buf.extend(b"more")  # the caller's again
                assert len(await conn.recv()) == 100_000
                with pytest.raises(TypeError):
                    conn.write("not bytes")
                assert conn.counters["writes_in_flight"] == 0
    run(main())


def test_close_cuts_queued_writes_and_drain_says_so(run, sock_dir):
    async def main():
        release = asyncio.Event()

        async def stalled(conn):  # reads nothing until told: the socket fills up
            await release.wait()
            conn.close()

        srv, where = await _serve("unix", sock_dir, handler=stalled)
        async with srv:
            conn = await ringxfer.open_connection(**where)
            payload = bytes(1 << 20)
            for _ in range(64):  # far more than the socket buffers hold
                conn.write(payload)
            drain = asyncio.ensure_future(conn.drain())
            await asyncio.sleep(0.2)
            assert not drain.done(), "drain() returned while the kernel could not take the frames"
            conn.close()
            with pytest.raises(ConnectionAbortedError):
                await drain
            with pytest.raises(ConnectionAbortedError):
                conn.write(b"late")
            await conn.wait_closed()
            assert conn.counters["writes_in_flight"] == 0
            release.set()
    run(main())


def test_a_cancelled_drain_leaves_the_writes_going(run, sock_dir):
    async def main():
        release = asyncio.Event()
        got = []

        async def slow(conn):  # starts reading only when told
            await release.wait()
            async for f in conn:
                got.append(len(f))
                f.release()

        srv, where = await _serve("unix", sock_dir, handler=slow)
        async with srv:
            async with await ringxfer.open_connection(**where) as conn:
                for _ in range(32):
                    conn.write(bytes(1 << 20))
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.drain(), 0.1)
                release.set()
                await conn.drain()  # every frame whole in the kernel
                assert conn.counters["writes_in_flight"] == 0
            for _ in range(100):
                if len(got) == 32:
                    break
                await asyncio.sleep(0.05)
            assert got == [1 << 20] * 32
    run(main())


def test_recv_buffer_takes_several_mid_size_frames_per_receive(run, transport, sock_dir):
    # Frames of up to a quarter of recv_buffer arrive as views of it, several
    # per receive: 64 frames of 60 KiB already waiting in the socket take a
    # handful of receives with the default 512 KiB, one or more each with 64 KiB.
    async def main():
        async def burst(conn):
            async for go in conn:
                for i in range(64):
                    conn.write(bytes([i]) * 61440)
                await conn.drain()

        srv, where = await _serve(transport, sock_dir, handler=burst)
        async with srv:
            ops = {}
            for rb in (64 << 10, ringxfer.DEFAULTS["recv_buffer"]):
                async with await ringxfer.open_connection(**where, recv_buffer=rb,
                                                          read_ahead=1) as conn:
                    await conn.send(b"go")
                    first = await conn.recv()  # the rest piles up in the socket
                    await asyncio.sleep(0.2)
                    before = conn.counters["recv_ops"]
                    first.release()
                    for i in range(1, 64):
                        with await conn.recv() as f:
                            assert bytes(f) == bytes([i]) * 61440
                    ops[rb] = conn.counters["recv_ops"] - before
            assert ops[64 << 10] >= 63, ops
            assert ops[ringxfer.DEFAULTS["recv_buffer"]] <= 63 // 4, ops
    run(main())


def test_every_waiting_drain_hears_a_cut_write(run, sock_dir):
    async def main():
        release = asyncio.Event()

        async def stalled(conn):
            await release.wait()

        srv, where = await _serve("unix", sock_dir, handler=stalled)
        async with srv:
            conn = await ringxfer.open_connection(**where)
            for _ in range(32):
                conn.write(bytes(1 << 20))
            drains = [asyncio.ensure_future(conn.drain()) for _ in range(2)]
            await asyncio.sleep(0.1)
            conn.close()
            for d in drains:
                with pytest.raises(ConnectionAbortedError):
                    await d
            await conn.wait_closed()
            release.set()
    run(main())


def test_extra_info_names_both_ends_and_at_eof_follows_the_peer(run):
    async def main():
        accepted = asyncio.get_running_loop().create_future()

        async def handler(conn):
            accepted.set_result(conn)

        srv = await ringxfer.start_server(handler, "127.0.0.1", 0)
        async with srv:
            conn = await ringxfer.open_connection(*srv.address)
            peer = await accepted
            assert conn.get_extra_info("peername") == srv.address
            assert peer.get_extra_info("sockname") == srv.address
            assert peer.get_extra_info("peername") == conn.get_extra_info("sockname")
            assert conn.get_extra_info("nothing", 42) == 42
            await conn.send(b"last")
            conn.close()
            await conn.wait_closed()
            assert not peer.at_eof()  # a frame is still to be read
            assert bytes(await peer.recv()) == b"last"
            with pytest.raises(ringxfer.ConnectionClosed):
                await peer.recv()
            assert peer.at_eof()
            peer.close()
    run(main())
