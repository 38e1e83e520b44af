"""A whole Dask cluster over ``ringxfer://``, beside the same cluster over
``tcp://``.

A ``LocalCluster`` of two worker processes (one thread each, behind their
nannies) runs real work whose data must move from one worker process to the
other: the answer over ``ringxfer://`` is the answer over ``tcp://``, and the
workers' transfer logs show the data came over ``ringxfer://``. Then one
worker process is SIGKILLed in the middle of a computation with data
dependencies: over both schemes the nanny brings a new worker up, what was
lost is recomputed, and the answer is still the right one. Last, the worker
holding data another worker is fetching is killed: the fetch gives up at
once, without waiting out Dask's connect timeout. The `dask` commands run as
an operator runs them, on one host and (as root) on two network namespaces.

Deadlines (``Future.result(timeout=...)``, ``wait_for_workers(timeout=...)``)
only turn a hang into a failure; no assertion depends on how fast anything
runs.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

distributed = pytest.importorskip("distributed")
np = pytest.importorskip("numpy")
da = pytest.importorskip("dask.array")

import dask  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

PROTOCOLS = ["tcp://", "ringxfer://"]
HANG_LIMIT = 60  # seconds; a safety net, not a measurement


def _cluster(protocol):
    return LocalCluster(protocol=protocol, n_workers=2, threads_per_worker=1,
                        processes=True, dashboard_address=":0")


def _check_addresses(cluster, client, protocol):
    assert cluster.scheduler_address.startswith(protocol), cluster.scheduler_address
    workers = list(client.scheduler_info()["workers"])
    assert len(workers) == 2 and all(w.startswith(protocol) for w in workers), workers
    return workers


def _transfers(dask_worker):
    return [(t["who"], t["total"]) for t in dask_worker.transfer_incoming_log]


# 1. Dask arrays: a matrix product whose blocks live on both workers.

N, BLOCK = 2000, 500  # 16 blocks of 2 MB: each well above the copy threshold


def _workload():
    x = da.random.RandomState(0).random_sample((N, N), chunks=(BLOCK, BLOCK))
    return x @ x.T


def _run_workload(protocol):
    with _cluster(protocol) as cluster, Client(cluster) as client:
        workers = _check_addresses(cluster, client, protocol)
        product = client.compute(_workload()).result(timeout=HANG_LIMIT)
        transfers = client.run(_transfers)
    assert sorted(transfers) == sorted(workers)
    return product, transfers


def test_dask_array_over_ringxfer_equals_tcp():
    by_protocol = {p: _run_workload(p) for p in PROTOCOLS}
    (tcp, tcp_log), (rx, rx_log) = by_protocol["tcp://"], by_protocol["ringxfer://"]

    # The same graph, the same single-threaded BLAS calls on the same blocks:
    # the same bits, wherever each block was computed.
    assert rx.shape == (N, N)
    np.testing.assert_array_equal(rx, tcp)
    x = da.random.RandomState(0).random_sample((N, N), chunks=(BLOCK, BLOCK))
    x = x.compute(scheduler="sync")
    np.testing.assert_allclose(rx, x @ x.T, rtol=1e-12)

    for protocol, log in (("tcp://", tcp_log), ("ringxfer://", rx_log)):
        # Blocks of 2 MB went from one worker process to the other, over
        # this scheme (about 100 MB in all here; 8 MiB is the least asked).
        for worker, transfers in log.items():
            assert all(who.startswith(protocol) and who != worker for who, _ in transfers)
        total = sum(n for transfers in log.values() for _, n in transfers)
        assert total >= 8 * 2**20, (protocol, total)


# 2. A worker process SIGKILLed in the middle of a computation.

WIDTH, SIZE, NAP = 24, 250_000, 0.2  # 2 MB per result, 0.2 s per task


def _make(i):
    time.sleep(NAP)
    return np.random.default_rng(i).random(SIZE)


def _combine(a, b, c):
    time.sleep(NAP)
    return a + b * c


def _total(*parts):
    time.sleep(NAP)
    out = np.zeros(SIZE)
    for p in parts:
        out = out + p
    return out


def _expected():
    made = [np.random.default_rng(i).random(SIZE) for i in range(WIDTH)]
    combined = [made[i] + made[(i + 1) % WIDTH] * made[(i + WIDTH // 2) % WIDTH]
                for i in range(WIDTH)]
    out = np.zeros(SIZE)
    for p in combined:
        out = out + p
    return out


def _in_memory(dask_scheduler):
    return {ts.key: [ws.address for ws in ts.who_has]
            for ts in dask_scheduler.tasks.values() if ts.state == "memory"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_worker_killed_mid_computation(protocol):
    expected = _expected()
    with _cluster(protocol) as cluster, Client(cluster) as client:
        workers = _check_addresses(cluster, client, protocol)
        pids = client.run(os.getpid)
        # Every result is held by a future, so whatever the killed worker
        # held must be computed again; each _combine takes three results
        # made here and there, so most fetch from the other worker.
        made = [client.submit(_make, i, key=f"make-{i}", pure=False)
                for i in range(WIDTH)]
        combined = [client.submit(_combine, made[i], made[(i + 1) % WIDTH],
                                  made[(i + WIDTH // 2) % WIDTH], key=f"combine-{i}",
                                  pure=False)
                    for i in range(WIDTH)]
        total = client.submit(_total, *combined, key="total", pure=False)

        # Kill, with SIGKILL, the worker process holding the most results,
        # once a quarter of the _combine tasks have finished.
        deadline = time.monotonic() + HANG_LIMIT
        while sum(f.done() for f in combined) < WIDTH // 4:
            assert time.monotonic() < deadline, "the computation does not progress"
            time.sleep(0.05)
        held = client.run_on_scheduler(_in_memory)
        victim = max(workers, key=lambda w: sum(w in who for who in held.values()))
        lost = sorted(k for k, who in held.items() if who == [victim])
        assert lost, f"{victim} holds no result alone: {held}"
        os.kill(pids[victim], signal.SIGKILL)
        assert not total.done(), "the computation ended before the kill"

        result = total.result(timeout=HANG_LIMIT)
        np.testing.assert_array_equal(result, expected)
        # The nanny brought a new worker process up in the killed one's
        # place, and every result is there again.
        client.wait_for_workers(2, timeout=HANG_LIMIT)
        now = client.run(os.getpid)
        assert victim not in now and len(now) == 2, now
        assert all(w.startswith(protocol) for w in now), now
        assert pids[victim] not in now.values()
        for f in made + combined:
            assert f.status == "finished", f
        np.testing.assert_array_equal(combined[0].result(timeout=HANG_LIMIT),
                                      made[0].result(timeout=HANG_LIMIT)
                                      + made[1].result(timeout=HANG_LIMIT)
                                      * made[WIDTH // 2].result(timeout=HANG_LIMIT))


# 3. The worker that holds the data is killed while the other fetches it.

PIECE = 12_500_000  # 100 MB per result: B fetches them one at a time


def _piece(i):
    return np.full(PIECE, float(i))


def _first(a):
    return float(a[0])


def test_a_killed_sender_is_given_up_at_once_not_after_the_connect_timeout():
    # Worker A makes ten results, worker B consumes them one by one; A is
    # SIGKILLed once B has fetched some. B's comm to A then reads A's end:
    # the fetch must fail at once so that the lost results are recomputed,
    # not wait while connect() retries A's dead port for the whole connect
    # timeout (60 s here; the deadline below is half of it).
    with dask.config.set({"distributed.comm.timeouts.connect": "60s"}):
        with _cluster("ringxfer://") as cluster, Client(cluster) as client:
            a, b = _check_addresses(cluster, client, "ringxfer://")
            pids = client.run(os.getpid)
            made = [client.submit(_piece, i, key=f"piece-{i}", workers=[a],
                                  allow_other_workers=True) for i in range(10)]
            used = [client.submit(_first, m, key=f"first-{i}", workers=[b],
                                  allow_other_workers=True) for i, m in enumerate(made)]
            deadline = time.monotonic() + HANG_LIMIT
            while sum(u.done() for u in used) < 3:
                assert time.monotonic() < deadline, "the computation does not progress"
                time.sleep(0.005)
            os.kill(pids[a], signal.SIGKILL)
            assert not all(u.done() for u in used), "everything was fetched before the kill"
            got = [u.result(timeout=30) for u in used]
            assert got == [float(i) for i in range(10)]


# 4. The command-line tools, each in its own process, as an operator runs them.

class DaskCommands:
    """`dask ...` commands started as processes (optionally inside a network
    namespace), their output in log files; all stopped on exit."""

    def __init__(self, tmp_path):
        self.cli = shutil.which("dask")
        if self.cli is None:
            pytest.skip("no `dask` command (python3-distributed installs it)")
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, *args, netns=None):
        log = open(self.tmp_path / f"{len(self.procs)}.log", "w+")
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.procs.append((subprocess.Popen([*prefix, sys.executable, self.cli, *args],
                                            stdout=log, stderr=subprocess.STDOUT), log))
        return log

    def wait_for(self, log, pattern):
        deadline = time.monotonic() + HANG_LIMIT
        while time.monotonic() < deadline:
            log.seek(0)
            m = re.search(pattern, log.read())
            if m:
                return m
            time.sleep(0.1)
        log.seek(0)
        raise AssertionError(f"{pattern!r} never appeared:\n{log.read()}")

    def logs(self):
        return "".join(open(log.name).read() for _, log in self.procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p, _ in self.procs:
            p.terminate()
        for p, log in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()


def test_dask_scheduler_and_worker_commands_over_ringxfer(tmp_path):
    x = da.random.RandomState(1).random_sample((1000, 1000), chunks=(250, 250))
    expected = (x @ x.T).sum().compute(scheduler="sync")
    with DaskCommands(tmp_path) as dask_cmd:
        sched = dask_cmd.start("scheduler", "--protocol", "ringxfer", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard")
        address = dask_cmd.wait_for(
            sched, r"Scheduler at:\s+(ringxfer://127\.0\.0\.1:\d+)").group(1)
        dask_cmd.start("worker", address, "--nworkers", "2", "--nthreads", "1",
                       "--no-dashboard")
        with Client(address, timeout=HANG_LIMIT) as client:
            client.wait_for_workers(2, timeout=HANG_LIMIT)
            workers = list(client.scheduler_info()["workers"])
            assert all(w.startswith("ringxfer://") for w in workers), workers
            got = client.compute((x @ x.T).sum()).result(timeout=HANG_LIMIT)
            assert got == pytest.approx(expected, rel=1e-12)


# 5. Two hosts: network namespaces joined by a veth pair (needs root).

def test_two_hosts_over_a_veth_pair(tmp_path):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make two network namespaces")
    tag = f"rxd{os.getpid() % 100000}"
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    ip_a, ip_b = "10.78.0.1", "10.78.0.2"
    made = []

    def sh(*args):
        subprocess.run(args, check=True, capture_output=True, timeout=30)

    try:
        for ns in (ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            made.append(ns)
        sh("ip", "link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        for ns, dev, addr in ((ns_a, f"{tag}x", ip_a), (ns_b, f"{tag}y", ip_b)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        with DaskCommands(tmp_path) as dask_cmd:
            port = 8790
            dask_cmd.start("scheduler", "--protocol", "ringxfer", "--host", ip_a,
                           "--port", str(port), "--no-dashboard", netns=ns_a)
            address = f"ringxfer://{ip_a}:{port}"
            for ns, host in ((ns_a, ip_a), (ns_b, ip_b)):
                dask_cmd.start("worker", address, "--host", host, "--nthreads", "1",
                               "--no-dashboard", netns=ns)
            # The client runs on host B too: a child process in B's namespace.
            out = subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c",
                                  _TWO_HOST_CLIENT.format(address=address, ip_a=ip_a,
                                                          ip_b=ip_b)],
                                 capture_output=True, text=True, timeout=HANG_LIMIT * 2)
            assert out.returncode == 0 and out.stdout == "ok\n", out.stderr + dask_cmd.logs()
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


_TWO_HOST_CLIENT = """
import numpy as np
from distributed import Client
with Client({address!r}, timeout=60) as c:
    c.wait_for_workers(2, timeout=60)
    wa = [w for w in c.scheduler_info()["workers"] if "//{ip_a}:" in w]
    wb = [w for w in c.scheduler_info()["workers"] if "//{ip_b}:" in w]
    assert len(wa) == 1 and len(wb) == 1, c.scheduler_info()["workers"]
    x = c.submit(lambda: np.random.default_rng(0).random(2_500_000), workers=wa)
    s = c.submit(lambda a: float(a.sum()), x, workers=wb).result(timeout=60)
    assert s == float(np.random.default_rng(0).random(2_500_000).sum()), s
    log = c.run(lambda dask_worker: [(t["who"], t["total"])
                for t in dask_worker.transfer_incoming_log], workers=wb)[wb[0]]
    assert log == [(wa[0], 20_000_000)], log
print("ok")
"""


# 4. Same-host shared memory: the comm between the two worker processes
# moves onto it by itself; the config entry turns that off.

MOVE = 20_000_000  # bytes of the array one worker computes and the other reads


def _array(n):
    # Incompressible: with python3-lz4 installed Dask compresses by default,
    # and an arange would cross in half its bytes.
    return np.random.default_rng(8).random(n // 8)


def _summary(a):
    return float(a.sum()), a.nbytes, bool(a.flags.writeable)


def _comms_to(dask_worker, other):
    """(transport, bytes received) of this worker's pooled comms to `other`."""
    pool = dask_worker.rpc
    comms = list(pool.available.get(other, ())) + list(pool.occupied.get(other, ()))
    return [(c.connection.transport, c.connection.counters["bytes_received"])
            for c in comms if c.connection is not None]


@pytest.mark.parametrize("upgrade", [True, False])
def test_local_cluster_moves_arrays_over_shared_memory(upgrade):
    with dask.config.set({"distributed.comm.ringxfer": {"shm_upgrade": upgrade}}), \
            _cluster("ringxfer://") as cluster, Client(cluster) as client:
        a, b = _check_addresses(cluster, client, "ringxfer://")
        x = client.submit(_array, MOVE, workers=[a], pure=False)
        total, nbytes, writeable = client.submit(_summary, x, workers=[b],
                                                 pure=False).result(timeout=HANG_LIMIT)
        comms = client.run(_comms_to, other=a, workers=[b])[b]
    expected = _array(MOVE)
    assert (total, nbytes) == (float(expected.sum()), expected.nbytes)
    assert writeable  # Dask's arrays are writable, shared memory or not
    carried = [t for t, received in comms if received >= MOVE]
    assert carried == ["shm" if upgrade else "tcp"], comms
