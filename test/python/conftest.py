"""Shared fixtures for the Python package's tests.

Every test that takes `run` runs twice: on asyncio's default loop and on
uvloop's. Deadlines (`asyncio.wait_for`) only turn a hang into a failure;
no assertion depends on how fast anything runs.
"""
import asyncio
import os
import socket
import subprocess
import tempfile

import pytest

HANG_LIMIT = 60  # seconds; a safety net, not a measurement


def _new_loop(kind):
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request):
    return request.param


@pytest.fixture
def run(loop_kind):
    """run(coro): runs `coro` to completion on a fresh loop of this kind."""
    def run(coro, limit=HANG_LIMIT):
        loop = _new_loop(loop_kind)
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, limit))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    return run


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="rx-py-", dir=os.environ.get("RINGXFER_TEST_TMPDIR")) as d:
        yield d


@pytest.fixture
def ringxfer_exe():
    exe = os.environ.get("RINGXFER_EXE")
    if not exe or not os.path.exists(exe):
        pytest.skip("RINGXFER_EXE is not set (run through meson test)")
    return exe


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def echo_handler(conn):
    """A plain echo server callback: every frame goes back as it came."""
    async with conn:
        async for frame in conn:
            await conn.send(frame)
            frame.release()
