"""The ``ringxfer://`` Dask comm backend (ringxfer.dask) against Dask's own
comm tests.

The generic ``check_*`` helpers of distributed/comm/tests/test_comms.py, as
Debian's python3-distributed ships them, run here against ``ringxfer://``
addresses, under Dask's ``gen_test`` (which also fails a test that leaks
comms or tasks). The rest checks what is ringxfer's own: the entry point, the
address answers beside tcp://'s, frames that arrive without a copy and stay
valid while kept, and a listener that refuses a foreign peer with a log line.
"""
import asyncio
import logging
import os
import socket
import subprocess
import sys

import pytest

distributed = pytest.importorskip("distributed")
np = pytest.importorskip("numpy")

import distributed.comm.tests.test_comms as dask_tests  # noqa: E402
from distributed.comm import (CommClosedError, connect, get_address_host,  # noqa: E402
                              get_local_address_for, listen, resolve_address)
from distributed.comm.registry import get_backend  # noqa: E402
from distributed.protocol import to_serialize  # noqa: E402
from distributed.utils_test import gen_test, has_ipv6  # noqa: E402

import ringxfer  # noqa: E402
import ringxfer.dask  # noqa: E402

tcp_eq = dask_tests.tcp_eq
EXTERNAL_IP4 = dask_tests.EXTERNAL_IP4


def test_backend_comes_from_the_entry_point_in_a_fresh_process():
    # No import of ringxfer: Dask finds the scheme through the .dist-info.
    code = ("from distributed.comm.registry import get_backend\n"
            "b = get_backend('ringxfer')\n"
            "print(type(b).__module__ + '.' + type(b).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ringxfer.dask.RingxferBackend"


def _answer(method, loc):
    try:
        return method(loc)
    except Exception as e:
        return type(e)


def test_addresses_are_answered_like_tcp():
    tcp = get_backend("tcp")
    rx = get_backend("ringxfer")
    for loc in ["127.0.0.1:8786", "127.0.0.1", "0.0.0.0:1234", "localhost:80", "",
                "[::1]:8786", "[::1]", f"{EXTERNAL_IP4}:4000", "127.0.0.1:port"]:
        for name in ("get_address_host", "get_address_host_port", "resolve_address",
                     "get_local_address_for"):
            if name == "get_local_address_for" and "::" in loc and not has_ipv6():
                continue
            assert _answer(getattr(rx, name), loc) == _answer(getattr(tcp, name), loc), \
                (name, loc)
    assert get_address_host("ringxfer://127.0.0.1:8786") == "127.0.0.1"
    assert resolve_address("ringxfer://localhost:8786") == "ringxfer://127.0.0.1:8786"
    assert get_local_address_for("ringxfer://127.0.0.1:1") == "ringxfer://127.0.0.1"
    with pytest.raises(ValueError):
        rx.get_address_host_port("127.0.0.1:notaport")


@gen_test()
async def test_client_server_ipv4():
    check = dask_tests.check_client_server
    await check("ringxfer://127.0.0.1", tcp_eq("127.0.0.1"))
    await check("ringxfer://127.0.0.1:3241", tcp_eq("127.0.0.1", 3241))
    await check("ringxfer://0.0.0.0", tcp_eq("0.0.0.0"), tcp_eq(EXTERNAL_IP4))
    await check("ringxfer://0.0.0.0:3242", tcp_eq("0.0.0.0", 3242),
                tcp_eq(EXTERNAL_IP4, 3242))
    await check("ringxfer://", tcp_eq("0.0.0.0"), tcp_eq(EXTERNAL_IP4))
    await check("ringxfer://:3243", tcp_eq("0.0.0.0", 3243), tcp_eq(EXTERNAL_IP4, 3243))


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this host")
@gen_test()
async def test_client_server_ipv6():
    check = dask_tests.check_client_server
    await check("ringxfer://[::1]", tcp_eq("::1"))
    await check("ringxfer://[::1]:3251", tcp_eq("::1", 3251))


@gen_test()
async def test_comm_closed_implicit():
    await dask_tests.check_comm_closed_implicit("ringxfer://127.0.0.1")


@gen_test()
async def test_comm_closed_explicit():
    await dask_tests.check_comm_closed_explicit("ringxfer://127.0.0.1")


@gen_test()
async def test_connect_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await dask_tests.check_connect_timeout(f"ringxfer://127.0.0.1:{port}")


@gen_test()
async def test_many_listeners():
    await dask_tests.check_many_listeners("ringxfer://127.0.0.1")
    await dask_tests.check_many_listeners("ringxfer://0.0.0.0")
    await dask_tests.check_many_listeners("ringxfer://")


@gen_test()
async def test_deserialize():
    await dask_tests.check_deserialize("ringxfer://")


@gen_test()
async def test_deserialize_roundtrip():
    await dask_tests.check_deserialize_roundtrip("ringxfer://")


@gen_test()
async def test_deserialize_eoferror():
    await dask_tests.check_deserialize_eoferror("ringxfer://")


@gen_test()
async def test_repr():
    a, b = await dask_tests.get_comm_pair("ringxfer://127.0.0.1")
    assert a.local_address in repr(b)
    assert b.local_address in repr(a)
    await dask_tests.check_repr(a, b)


@gen_test()
async def test_addresses():
    a, b = await dask_tests.get_comm_pair("ringxfer://127.0.0.1")
    await dask_tests.check_addresses(a, b)


@gen_test()
async def test_encryption_required_is_refused():
    with pytest.raises(RuntimeError, match="does not encrypt"):
        await connect("ringxfer://127.0.0.1:1", require_encryption=True)
    with pytest.raises(RuntimeError, match="does not encrypt"):
        listen("ringxfer://127.0.0.1", lambda comm: None, require_encryption=True)


def _frame_under(arr):
    """The ringxfer.Frame a numpy array's memory belongs to, if any."""
    obj = arr
    while obj is not None:
        if isinstance(obj, ringxfer.Frame):
            return obj
        if isinstance(obj, memoryview):
            obj = obj.obj
        else:
            obj = getattr(obj, "base", None)
    return None


@gen_test()
async def test_numpy_arrives_in_the_pooled_buffer_not_a_copy():
    a, b = await dask_tests.get_comm_pair("ringxfer://127.0.0.1")
    try:
        x = np.random.default_rng(1).random(2_000_000)  # 16 MB, incompressible
        await a.write({"op": "data", "x": to_serialize(x), "small": to_serialize(x[:100])})
        msg = await b.read()
        assert np.array_equal(msg["x"], x) and np.array_equal(msg["small"], x[:100])
        frame = _frame_under(msg["x"])
        assert frame is not None, "the array does not live in a received ringxfer.Frame"
        assert frame.nbytes == x.nbytes and msg["x"].flags.writeable
        # The small one was copied out of the shared receive buffer.
        assert _frame_under(msg["small"]) is None
        # Each Dask frame travelled as a ringxfer frame, none joined: the
        # count of frames sent equals the frames to_frames made.
        sent = a.connection.counters["frames_sent"]
        received = b.connection.counters["frames_received"]
        assert sent == received >= 3
    finally:
        await a.close()
        await b.close()


@gen_test()
async def test_writes_do_not_wait_for_the_peer_to_read():
    # As over tcp://: 96 MB written (far above the reader's read-ahead and
    # the sockets' buffers) before the peer reads anything, then read back.
    a, b = await dask_tests.get_comm_pair("ringxfer://127.0.0.1")
    try:
        xs = [np.random.default_rng(i).random(4_000_000) for i in range(3)]
        for x in xs:
            await asyncio.wait_for(a.write({"x": to_serialize(x)}), 10)
        for x in xs:
            assert np.array_equal((await b.read())["x"], x)
    finally:
        await a.close()
        await b.close()


@gen_test(timeout=120)
async def test_kept_frames_do_not_starve_the_comm():
    # A worker keeps what it received: 40 arrays of 10 MB stay alive while
    # the comm goes on; when Dask lets go, every buffer returns to the pool.
    a, b = await dask_tests.get_comm_pair("ringxfer://127.0.0.1")
    try:
        def leased():
            return sum(p["leased_buffers"] for p in ringxfer.engine_info(
                **ringxfer.dask._options())["pools"].values())

        await a.write({"x": to_serialize(np.zeros(10))})
        await b.read()
        idle = leased()  # each connection's receive buffer
        kept = []
        rng = np.random.default_rng(2)
        for i in range(40):
            x = rng.random(1_250_000)  # incompressible: Dask sends it as it is
            x[0] = i
            await a.write({"x": to_serialize(x)})
            kept.append((await b.read())["x"])
        assert [int(k[0]) for k in kept] == list(range(40))
        assert all(_frame_under(k) is not None for k in kept)
        assert leased() == idle + 40
        del kept
        await a.write({"x": to_serialize(np.zeros(10))})
        await b.read()
        assert leased() == idle
    finally:
        await a.close()
        await b.close()


@gen_test()
async def test_a_foreign_peer_is_refused_with_a_log_line_and_others_are_served(caplog):
    served = []

    async def handle(comm):
        msg = await comm.read()
        await comm.write(msg)
        served.append(msg)
        await comm.close()

    async with listen("ringxfer://127.0.0.1", handle) as listener:
        host, port = listener.get_host_port()
        with caplog.at_level(logging.INFO, logger="distributed.comm.ringxfer"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) is not None  # closed on us
            writer.close()
            comm = await connect(listener.contact_address)
            await comm.write({"op": "ping"})
            assert await comm.read() == {"op": "ping"}
            await comm.close()
        assert served == [{"op": "ping"}]
    refusals = [r for r in caplog.records if "not a ringxfer:// Dask peer" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert "(bad_magic: " in refusals[0].getMessage(), refusals[0].getMessage()


@gen_test()
async def test_config_options_reach_the_connection():
    import dask
    with dask.config.set({"distributed.comm.ringxfer": {"max_frame": 1 << 20}}):
        a, b = await dask_tests.get_comm_pair("ringxfer://127.0.0.1")
    try:
        # Frames above max_frame are split by Dask, so a 3 MB array still
        # arrives whole.
        x = np.arange(400_000, dtype="f8")
        with dask.config.set({"distributed.comm.ringxfer": {"max_frame": 1 << 20}}):
            await a.write({"x": to_serialize(x)})
        assert np.array_equal((await b.read())["x"], x)
    finally:
        await a.close()
        await b.close()
    with dask.config.set({"distributed.comm.ringxfer": {"no_such_option": 1}}):
        with pytest.raises(TypeError, match="no_such_option"):
            await connect("ringxfer://127.0.0.1:1", timeout=1)
