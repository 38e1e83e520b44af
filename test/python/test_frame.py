"""ringxfer.Frame: the buffer protocol, release, and who owns the memory."""
import asyncio
import gc

import numpy as np
import pytest

import ringxfer
from conftest import echo_handler


async def _one_frame(payload, **options):
    srv = await ringxfer.start_server(echo_handler, "127.0.0.1", 0, **options)
    async with srv:
        async with await ringxfer.open_connection(*srv.address, **options) as conn:
            await conn.send(payload)
            return await conn.recv(), conn


def test_frame_is_a_buffer_without_copy(run):
    async def main():
        frame, _ = await _one_frame(b"x" * 100_000)
        m = memoryview(frame)
        assert len(frame) == frame.nbytes == m.nbytes == 100_000
        assert not m.readonly
        a = np.frombuffer(frame, dtype=np.uint8)
        # numpy and the memoryview share the frame's memory: a write through
        # one is seen through the other.
        a[0] = ord("y")
        assert m[0] == ord("y")
        assert a.__array_interface__["data"][0] == np.frombuffer(m, np.uint8).__array_interface__["data"][0]
        del a, m
        frame.release()
    run(main())


def test_release_refuses_while_a_view_lives(run):
    async def main():
        frame, _ = await _one_frame(b"abc" * 1000)
        a = np.frombuffer(frame, dtype=np.uint8)
        with pytest.raises(BufferError, match="still use"):
            frame.release()
        assert bytes(a[:3]) == b"abc"  # still readable: nothing was freed
        del a
        frame.release()
        assert frame.released
        frame.release()  # idempotent
        with pytest.raises(ValueError, match="released"):
            memoryview(frame)
        with pytest.raises(ValueError, match="released"):
            len(frame)
    run(main())


def test_collection_returns_the_buffer(run):
    async def main():
        srv = await ringxfer.start_server(echo_handler, "127.0.0.1", 0)
        async with srv:
            async with await ringxfer.open_connection(*srv.address) as conn:
                pools = lambda: ringxfer.engine_info()["pools"]["tcp"]
                await conn.send(b"z" * (4 << 20))
                frame = await conn.recv()
                leased = pools()["leased_buffers"]
                view = memoryview(frame)
                del frame
                # asyncio keeps the future that carried the frame (and so the
                # frame) until this step of the task ends.
                await asyncio.sleep(0)
                gc.collect()
                # The view keeps the frame (and its buffer) alive.
                assert pools()["leased_buffers"] == leased
                assert view[5] == ord("z")
                del view
                await asyncio.sleep(0)
                gc.collect()
                assert pools()["leased_buffers"] == leased - 1
    run(main())


def test_frame_context_manager(run):
    async def main():
        frame, _ = await _one_frame(b"q" * 10)
        with frame as f:
            assert bytes(f) == b"q" * 10
        assert frame.released
        assert "released" in repr(frame)
    run(main())


def test_allocate_fills_in_place_and_sends_without_copy(run):
    async def main():
        srv = await ringxfer.start_server(echo_handler, "127.0.0.1", 0)
        async with srv:
            async with await ringxfer.open_connection(*srv.address) as conn:
                buf = conn.allocate(8 * 1000)
                np.frombuffer(buf, dtype="<f8")[:] = np.arange(1000)
                await conn.send(buf)
                back = await conn.recv()
                assert np.array_equal(np.frombuffer(back, dtype="<f8"), np.arange(1000))
                assert buf.registered == (ringxfer.engine_info()["pools"]["tcp"]["registered_bytes"] > 0)
                with pytest.raises(ValueError, match="largest buffer"):
                    conn.allocate(2 << 30)
    run(main())


def test_empty_frame(run):
    async def main():
        frame, _ = await _one_frame(b"")
        assert len(frame) == 0
        assert bytes(frame) == b""
    run(main())
