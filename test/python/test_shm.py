"""The shared-memory transport from Python (issue #18): transport="shm".

- a buffer from allocate() goes to the peer by reference (no copy), other
  memory is copied once, as docs/design.md counts;
- received frames are read-only views of the peer's memory, held until
  released, never earlier;
- what a user can get wrong gets a typed error saying what to do.
"""
import asyncio
import errno
import os
import socket

import numpy as np
import pytest

import ringxfer

GUARD = 30  # seconds: a hang guard, never a measurement


async def _until(cond, what, limit=GUARD):
    """Yields to the loop until cond() holds (the peer's release descriptor
    travels through the ring and is read by the loop)."""
    for _ in range(int(limit / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _shm_leased():
    return ringxfer.engine_info()["pools"].get("shm", {}).get("leased_buffers", 0)


async def _keeping_server(path):
    """An shm server that keeps every frame it receives, in a queue."""
    got = asyncio.Queue()

    async def keep(conn):
        async for frame in conn:
            await got.put(frame)

    return await ringxfer.start_server(keep, path=path, transport="shm"), got


def test_allocate_goes_by_reference_and_frames_are_read_only(run, sock_dir):
    async def main():
        path = os.path.join(sock_dir, "rx.shm")
        srv, got = await _keeping_server(path)
        async with srv, await ringxfer.open_connection(path=path, transport="shm") as conn:
            assert conn.transport == "shm"
            # Built in place in the shared pool: a descriptor crosses, no byte is copied.
            buf = conn.allocate(3 << 20)
            np.frombuffer(buf, "<u4")[:] = np.arange(3 << 18, dtype="<u4")
            await asyncio.wait_for(conn.send(buf), GUARD)
            c = conn.counters
            assert c["by_reference_sends"] == 1 and c["send_copied_bytes"] == 0, c
            frame = await asyncio.wait_for(got.get(), GUARD)
            assert frame.readonly and len(frame) == 3 << 20
            view = memoryview(frame)
            assert view.readonly
            with pytest.raises(TypeError):
                view[0] = 1
            arr = np.frombuffer(frame, "<u4")
            assert not arr.flags.writeable
            with pytest.raises(ValueError):
                arr[0] = 1
            assert np.array_equal(arr, np.arange(3 << 18, dtype="<u4"))
            # No writable array can be made of it, as of any read-only buffer.
            with pytest.raises(ValueError):
                arr.setflags(write=True)
            del arr
            view.release()

            # Memory of the caller's own: copied into the shared pool once.
            payload = os.urandom(1 << 20)
            await asyncio.wait_for(conn.send(payload), GUARD)
            c = conn.counters
            assert c["by_reference_sends"] == 1 and c["send_copied_bytes"] == len(payload), c
            other = await asyncio.wait_for(got.get(), GUARD)
            assert bytes(other) == payload and other.readonly
            other.release()
            # A small frame is copied into the receiver's staging: writable.
            await asyncio.wait_for(conn.send(b"small"), GUARD)
            small = await asyncio.wait_for(got.get(), GUARD)
            assert bytes(small) == b"small" and not small.readonly
            frame.release()
        await srv.wait_closed()
    run(main())


def test_a_received_frame_holds_the_peer_memory_until_released(run, sock_dir):
    """The sender's slab comes back when the receiver's Frame is released,
    and not while a numpy array on it is alive."""
    async def main():
        path = os.path.join(sock_dir, "rx.shm")
        srv, got = await _keeping_server(path)
        async with srv, await ringxfer.open_connection(path=path, transport="shm") as conn:
            before = _shm_leased()
            buf = conn.allocate(2 << 20)
            memoryview(buf)[:] = b"\x5a" * (2 << 20)
            await asyncio.wait_for(conn.send(buf), GUARD)
            buf.release()  # ours is gone; the peer still holds the slab
            frame = await asyncio.wait_for(got.get(), GUARD)
            arr = np.frombuffer(frame, np.uint8)
            with pytest.raises(BufferError):
                frame.release()  # a view is alive
            await asyncio.sleep(0.05)
            assert _shm_leased() == before + 1, "the slab came back while the peer holds it"
            assert arr[-1] == 0x5A
            del arr
            frame.release()
            await _until(lambda: _shm_leased() == before, "the slab to come back")
        await srv.wait_closed()
    run(main())


def test_shm_errors_say_what_to_do(run, sock_dir):
    async def main():
        path = os.path.join(sock_dir, "rx.shm")
        stream_path = os.path.join(sock_dir, "rx.sock")
        # The epoll backend has no shm transport.
        for call in (lambda: ringxfer.open_connection(path=path, transport="shm", backend="epoll"),
                     lambda: ringxfer.start_server(None, path=path, transport="shm",
                                                   backend="epoll")):
            with pytest.raises(ringxfer.ShmError) as info:
                await call()
            assert isinstance(info.value, OSError) and info.value.errno == errno.EOPNOTSUPP
            assert "io_uring" in str(info.value) and "transport='unix'" in str(info.value)
        # Each transport to the other's server.
        shm_srv = await ringxfer.start_server(None, path=path, transport="shm")
        unix_srv = await ringxfer.start_server(None, path=stream_path)
        async with shm_srv, unix_srv:
            with pytest.raises(ringxfer.ShmError) as info:
                await ringxfer.open_connection(path=stream_path, transport="shm")
            assert info.value.errno == errno.EPROTOTYPE
            assert "transport='unix'" in str(info.value)
            with pytest.raises(ringxfer.ShmError) as info:
                await ringxfer.open_connection(path=path)
            assert info.value.errno == errno.EPROTOTYPE
            assert "transport='shm'" in str(info.value)
        with pytest.raises(TypeError):
            await ringxfer.open_connection("127.0.0.1", 1, transport="shm")
        with pytest.raises(ValueError):
            await ringxfer.open_connection(path=path, transport="pipe")

        # A SEQPACKET peer that is not a ringxfer shm peer: a ProtocolError
        # naming what it sent, not a hang.
        fake = os.path.join(sock_dir, "fake")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lsock.bind(fake)
        lsock.listen()
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()
        conn = await ringxfer.open_connection(path=fake, transport="shm")
        peer, _ = await asyncio.wait_for(loop.sock_accept(lsock), GUARD)
        try:
            await loop.sock_sendall(peer, b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
            with pytest.raises(ringxfer.ProtocolError) as info:
                await asyncio.wait_for(conn.recv(), GUARD)
            assert info.value.cause == "shm_protocol", info.value
            assert "shm" in str(info.value)
        finally:
            conn.close()
            await conn.wait_closed()
            peer.close()
            lsock.close()
    run(main())


# --- the same-host upgrade ---------------------------------------------------

async def _echo_server(where, sock_dir, **options):
    """An echo server on TCP loopback or a Unix socket; its connections are
    put in the returned list."""
    conns = []

    async def echo(conn):
        conns.append(conn)
        async for frame in conn:
            await conn.send(frame)
            frame.release()

    if where == "tcp":
        srv = await ringxfer.start_server(echo, "127.0.0.1", 0, **options)
        return srv, dict(host=srv.address[0], port=srv.address[1]), conns
    srv = await ringxfer.start_server(echo, path=os.path.join(sock_dir, "rx.sock"), **options)
    return srv, dict(path=srv.address), conns


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_same_host_connection_moves_to_shared_memory(run, sock_dir, where):
    """Both ends on, one host: the connection is upgraded with no frame lost,
    reordered or duplicated across the switch, and allocate() then goes by
    reference."""
    async def main():
        srv, addr, conns = await _echo_server(where, sock_dir)
        async with srv, await ringxfer.open_connection(**addr) as conn:
            # Frames written while the upgrade is under way, in both
            # directions: some cross before the switch, some after.
            sizes = [(i * 7919) % (300 << 10) for i in range(60)]
            for i, n in enumerate(sizes):
                conn.write(bytes([i]) * n)
            await asyncio.wait_for(conn.drain(), GUARD)
            for i, n in enumerate(sizes):
                f = await asyncio.wait_for(conn.recv(), GUARD)
                assert len(f) == n and bytes(f) == bytes([i]) * n, i
                f.release()
            assert await conn.wait_upgraded(GUARD) is True
            assert await conns[0].wait_upgraded(GUARD) is True
            assert conn.transport == "shm" and conns[0].transport == "shm"
            assert conn.counters["shm_upgraded"] == 1
            buf = conn.allocate(2 << 20)
            np.frombuffer(buf, np.uint8)[:] = 3
            before = conn.counters["by_reference_sends"]
            await asyncio.wait_for(conn.send(buf), GUARD)
            copied = conn.counters["receive_copied_bytes"]
            back = await asyncio.wait_for(conn.recv(), GUARD)
            assert conn.counters["by_reference_sends"] == before + 1
            # Received by reference, then copied once out of the peer's memory:
            # an upgraded connection's frames stay private and writable.
            assert conn.counters["by_reference_recvs"] >= 1
            assert conn.counters["receive_copied_bytes"] - copied >= 2 << 20
            assert not back.readonly and bytes(back) == b"\x03" * (2 << 20)
            back.release()
        await srv.wait_closed()
    run(main())


@pytest.mark.parametrize("client_on,server_on", [(True, False), (False, True)])
def test_upgrade_off_on_either_side_leaves_the_connection_as_it_is(run, sock_dir, client_on,
                                                                    server_on):
    async def main():
        srv, addr, conns = await _echo_server("tcp", sock_dir, shm_upgrade=server_on)
        stats = dict(ringxfer._upgrade.STATS)
        async with srv, await ringxfer.open_connection(**addr, shm_upgrade=client_on) as conn:
            for n in (10, 1 << 20):
                await asyncio.wait_for(conn.send(b"y" * n), GUARD)
                assert bytes(await asyncio.wait_for(conn.recv(), GUARD)) == b"y" * n
            assert await conn.wait_upgraded(0.2) is False
            assert await conns[0].wait_upgraded(0.2) is False
            assert conn.transport == "tcp" and conns[0].transport == "tcp"
            assert conn.counters["shm_upgraded"] == 0
        assert ringxfer._upgrade.STATS["upgraded"] == stats["upgraded"]
        await srv.wait_closed()
    run(main())


def test_a_forged_claim_gets_nothing(run, sock_dir):
    """A process that names someone else's connection at the rendezvous
    without the token it was sent there: refused, and the connection goes on
    on TCP without its user seeing anything of it."""
    async def main():
        import json
        srv, addr, conns = await _echo_server("tcp", sock_dir)
        loop = asyncio.get_running_loop()
        async with srv, await ringxfer.open_connection(**addr, shm_upgrade=False) as conn:
            await asyncio.wait_for(conn.send(b"a"), GUARD)
            assert bytes(await asyncio.wait_for(conn.recv(), GUARD)) == b"a"
            r = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            r.setblocking(False)
            try:
                name = ringxfer._upgrade.rendezvous_name("tcp", addr["port"])
                await loop.sock_connect(r, name)
                norm = ringxfer._upgrade._norm
                r.send(json.dumps({"type": "shm-claim", "v": 1,
                                   "conn": [norm(conn.get_extra_info("sockname")),
                                            norm(conn.get_extra_info("peername"))]}).encode())
                r.send(json.dumps({"type": "shm-token", "token": "0" * 32}).encode())
                # The server refuses: it closes the rendezvous connection.
                assert await asyncio.wait_for(loop.sock_recv(r, 100), GUARD) == b""
            finally:
                r.close()
            # The token it sent on the connection never reached the user.
            await asyncio.wait_for(conn.send(b"b"), GUARD)
            assert bytes(await asyncio.wait_for(conn.recv(), GUARD)) == b"b"
            assert conn.transport == "tcp" and conns[0].transport == "tcp"
            assert conn.counters["frames_received"] == 2
        await srv.wait_closed()
    run(main())
