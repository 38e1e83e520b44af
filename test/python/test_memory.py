"""Memory: frames the application keeps, the pool's budget, and the
unprivileged path where buffer registration fails (RLIMIT_MEMLOCK).

- Frames held as numpy arrays do not starve the connection: receiving goes
  on, every byte arrives intact, and the memory is the pool's (no copy).
- With a small pool_budget and the application holding frames, recv()
  raises BufferPoolExhausted (a MemoryError and a ConnectionError, cause
  'no_buffer') saying what to do; once frames are released, a new
  connection works. allocate() beyond the budget raises it too.
- As an ordinary user (8 MiB RLIMIT_MEMLOCK), a 50 MB frame still echoes,
  with a RuntimeWarning that registration failed.
"""
import asyncio
import gc
import json
import os
import pwd
import resource
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

import ringxfer

GUARD = 60  # seconds: a hang guard, never a measurement
MB = 1_000_000


def _pool(opts):
    return ringxfer.engine_info(**opts)["pools"].get("tcp", {"leased_buffers": 0,
                                                           "leased_bytes": 0})


async def _settle():
    # asyncio keeps a future's result (a Frame) alive until the task step
    # that awaited it ends.
    await asyncio.sleep(0)
    gc.collect()


def _payload(i, size):
    """Frame i's bytes: 8-byte words k*7+i (distinct per frame and offset)."""
    words = np.arange(size // 8, dtype="<u8") * np.uint64(7) + np.uint64(i)
    return words


async def _echo_swallowing_errors(conn):
    """Echo; a client that went away is not this test's subject."""
    try:
        async with conn:
            async for f in conn:
                await conn.send(f)
                f.release()
    except ConnectionError:
        pass


# The pool budgets of the socket transports: no move to shared memory in
# these (a receiver holding frames of a same-host upgraded connection holds
# copies in its own pool: docs/python.md).
def test_held_frames_do_not_starve_the_connection(run):
    held_n, extra_n, size = 40, 20, 10 * MB
    client = dict(pool_budget=(4 << 30) + 4096)  # an engine of its own, 4 GiB

    async def main():
        srv = await ringxfer.start_server(_echo_swallowing_errors, "127.0.0.1", 0, shm_upgrade=False)
        async with srv:
            conn = await ringxfer.open_connection(*srv.address, shm_upgrade=False, **client)
            base = _pool(client)

            async def sender():
                for i in range(held_n + extra_n):
                    await conn.send(_payload(i, size))

            sending = asyncio.ensure_future(sender())
            held = []
            for i in range(held_n):
                f = await asyncio.wait_for(conn.recv(), GUARD)
                held.append(np.frombuffer(f, dtype="<u8"))  # no copy: holds the frame
                del f
            # 400 MB held, in the pool's memory.
            await _settle()
            assert _pool(client)["leased_bytes"] - base["leased_bytes"] >= held_n * size
            # Receiving goes on while they are held.
            for i in range(held_n, held_n + extra_n):
                f = await asyncio.wait_for(conn.recv(), GUARD)
                assert np.array_equal(np.frombuffer(f, dtype="<u8"), _payload(i, size))
                f.release()
                del f
            await asyncio.wait_for(sending, GUARD)
            # Every held frame is intact.
            for i, arr in enumerate(held):
                assert arr.nbytes == size
                assert np.array_equal(arr, _payload(i, size)), f"held frame {i} changed"
            del held, arr
            await _settle()
            assert _pool(client)["leased_buffers"] == base["leased_buffers"]
            conn.close()
            await conn.wait_closed()
    run(main(), limit=240)


@pytest.mark.parametrize("where", ["receiver", "both"])
def test_budget_exhausted_by_held_frames(run, where):
    budget = 64 << 20
    small = dict(pool_budget=budget)
    # A small budget for the server too, in an engine of its own (one engine
    # per loop and options: the same options would share the client's pool).
    server = dict(pool_budget=budget + 4096) if where == "both" else {}
    frame_size = 8 * MB

    async def main():
        srv = await ringxfer.start_server(_echo_swallowing_errors, "127.0.0.1", 0, shm_upgrade=False, **server)
        async with srv:
            conn = await ringxfer.open_connection(*srv.address, shm_upgrade=False, **small)
            base = _pool(small)

            async def sender():
                for i in range(20):
                    await conn.send(_payload(i, frame_size))

            sending = asyncio.ensure_future(sender())
            held = []
            with pytest.raises(ringxfer.BufferPoolExhausted) as info:
                for _ in range(20):
                    f = await asyncio.wait_for(conn.recv(), GUARD)
                    held.append(np.frombuffer(f, dtype="<u8"))
                    del f
            exc = info.value
            # Not before the budget is really used, and it is raised at all
            # (20 frames of 8 MB would not fit in 64 MiB).
            assert 0 < len(held) <= budget // frame_size
            assert isinstance(exc, MemoryError)
            assert isinstance(exc, ConnectionError)
            assert isinstance(exc, ringxfer.ProtocolError)
            assert exc.cause == "no_buffer"
            msg = str(exc)
            assert "pool_budget" in msg and "release" in msg, msg
            assert f"127.0.0.1:{srv.address[1]}" in msg  # names the peer
            # The frames received before it are intact.
            for i, arr in enumerate(held):
                assert np.array_equal(arr, _payload(i, frame_size))
            # The connection is done for: the next recv() says so again.
            with pytest.raises(ringxfer.BufferPoolExhausted):
                await conn.recv()
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            conn.close()
            await conn.wait_closed()

            # Released frames make room: a new connection works, with
            # frames held again up to what the budget allows.
            del held, arr, sending, info, exc
            await _settle()
            assert _pool(small)["leased_bytes"] <= base["leased_bytes"]
            async with await ringxfer.open_connection(*srv.address, shm_upgrade=False, **small) as again:
                keep = []
                for i in range(10):
                    await again.send(_payload(i, frame_size))
                    f = await asyncio.wait_for(again.recv(), GUARD)
                    assert np.array_equal(np.frombuffer(f, dtype="<u8"), _payload(i, frame_size))
                    if i < 3:
                        keep.append(f)
                    else:
                        f.release()
                    del f
                del keep
    run(main(), limit=120)


def test_allocate_beyond_the_budget(run):
    budget = 64 << 20
    small = dict(pool_budget=budget)

    async def main():
        srv = await ringxfer.start_server(_echo_swallowing_errors, "127.0.0.1", 0, shm_upgrade=False)
        async with srv:
            async with await ringxfer.open_connection(*srv.address, shm_upgrade=False, **small) as conn:
                bufs = []
                with pytest.raises(ringxfer.BufferPoolExhausted) as info:
                    for _ in range(budget // (8 * MB) + 2):
                        bufs.append(conn.allocate(8 * MB))
                assert 0 < len(bufs) <= budget // (8 * MB)
                exc = info.value
                assert isinstance(exc, MemoryError) and isinstance(exc, ConnectionError)
                assert exc.cause == "no_buffer"
                assert "pool_budget" in str(exc) and "release" in str(exc)
                # One alone above the budget.
                with pytest.raises(ringxfer.BufferPoolExhausted):
                    conn.allocate(budget + 1)
                # A buffer given back can be had again, and sent.
                bufs.pop().release()
                buf = conn.allocate(8 * MB)
                np.frombuffer(buf, dtype="<u8")[:] = _payload(3, 8 * MB)
                # (The echo needs a receive buffer too: make room for it.)
                for b in bufs:
                    b.release()
                await conn.send(buf)
                back = await asyncio.wait_for(conn.recv(), GUARD)
                assert np.array_equal(np.frombuffer(back, dtype="<u8"), _payload(3, 8 * MB))
    run(main())


# --- the unprivileged path ----------------------------------------------

_CHILD = r"""
import asyncio, json, os, resource, sys, warnings
warnings.simplefilter("always")
import ringxfer

SIZE = 50_000_000

async def echo(conn):
    async with conn:
        async for f in conn:
            await conn.send(f)
            f.release()

async def main():
    srv = await ringxfer.start_server(echo, "127.0.0.1", 0)
    async with srv:
        async with await ringxfer.open_connection(*srv.address) as conn:
            payload = bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256)
            await conn.send(payload)
            frame = await conn.recv()
            ok = len(frame) == SIZE and bytes(frame) == payload
            registered = frame.registered
            del frame
            shm = {}
            if ringxfer.engine_info()["backend"] == "io_uring":
                # The same-host upgrade and transport="shm", as this user.
                shm["upgraded"] = await conn.wait_upgraded(30)
                await conn.send(payload)
                shm["upgraded_ok"] = bytes(await conn.recv()) == payload
                path = f"@rx-nobody-{os.getpid()}"
                async with await ringxfer.start_server(echo, path=path, transport="shm"), \
                        await ringxfer.open_connection(path=path, transport="shm") as c:
                    buf = c.allocate(SIZE)
                    memoryview(buf)[:] = payload
                    await c.send(buf)
                    shm["shm_ok"] = bytes(await c.recv()) == payload
                    shm["by_reference"] = c.counters["by_reference_sends"]
            return (ok, registered, ringxfer.engine_info()["pools"],
                    ringxfer.engine_info()["backend"], shm)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    if sys.argv[1] == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        ok, registered, pools, backend, shm = loop.run_until_complete(main())
    finally:
        loop.close()
print(json.dumps({
    "ok": ok, "registered": registered, "pools": pools, "backend": backend, "shm": shm,
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK),
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
}))
"""


def test_unprivileged_user_with_8mib_memlock(run, loop_kind):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the check as user nobody (RLIMIT_MEMLOCK 8 MiB)")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")
    if loop_kind == "uvloop":
        pytest.importorskip("uvloop")
    limit = 8 << 20

    def drop_privileges():
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    # The package, copied where nobody can read it whatever the modes of
    # the build tree's parents are.
    tmp = tempfile.mkdtemp(prefix="rx-nobody-")
    try:
        os.chmod(tmp, 0o755)
        shutil.copytree(os.path.dirname(ringxfer.__file__), os.path.join(tmp, "ringxfer"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.p"))
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": tmp, "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": "/"}
        # A sanitizer build's runtimes (test/meson.build preloads them).
        env.update({k: os.environ[k] for k in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")
                    if k in os.environ})

        async def child():
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", _CHILD, loop_kind, env=env, cwd="/",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=drop_privileges)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), GUARD)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            return proc.returncode, out.decode(), err.decode()

        code, out, err = run(child(), limit=GUARD + 30)
    finally:
        shutil.rmtree(tmp)
    assert code == 0, f"child failed ({code}):\n{err}"
    r = json.loads(out.strip().splitlines()[-1])
    assert r["uid"] == nobody.pw_uid and r["gid"] == nobody.pw_gid and r["groups"] == []
    assert r["memlock"] == [limit, limit]
    assert r["ok"], "the 50 MB frame came back different"
    if r["backend"] != "io_uring":
        pytest.skip(f"io_uring is not available to an ordinary user here ({r['backend']}): "
                    "no buffer registration to fail")
    # Registration failed, the transfer went on unregistered, and it was said.
    assert r["pools"]["tcp"]["registration_failed"], r["pools"]
    assert r["registered"] is False
    said = [m for cat, m in r["warnings"] if cat == "RuntimeWarning"]
    assert any("regist" in m and "RLIMIT_MEMLOCK" in m for m in said), r["warnings"]
    assert any("8.0 MiB" in m or "8 MiB" in m for m in said), said
    # Shared memory needs no registration: the upgrade and transport="shm"
    # work for this user too, the allocate()d buffer by reference.
    assert r["shm"] == {"upgraded": True, "upgraded_ok": True, "shm_ok": True,
                        "by_reference": 1}, r["shm"]
