#!/usr/bin/env python3
"""bench/compare's shared-memory pieces on inputs whose answer is known: which
(peer, transport) pairs form a mode's cells and why the others are skipped,
the alternation of shm and Unix runs within one cell, a ringxfer that cannot
run shm recognised as a skip, the memcpy line kept apart from the memcpy
limit, and issue 18's ratios computed from the medians."""
import importlib.machinery
import importlib.util
import os
import stat
import tempfile
import unittest

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "compare")
_loader = importlib.machinery.SourceFileLoader("bench_compare", TOOL)  # no .py suffix
_spec = importlib.util.spec_from_loader("bench_compare", _loader)
compare = importlib.util.module_from_spec(_spec)
_loader.exec_module(compare)
compare.log = lambda msg: None  # the harness's progress lines


def peer(name):
    return next(p for p in compare.all_peers() if p.name == name)


class FakePeer(compare.Peer):
    """Answers every run with a rate from `rates` (transport -> MB/s) and
    remembers the order of its calls in a shared log."""

    def __init__(self, name, transports, rates, calls, probe=True):
        super().__init__(name, name)
        self.transports, self.rates, self.calls, self.probe = transports, rates, calls, probe

    def run(self, ctx, mode, transport, size, frames, work):
        self.calls.append((self.name, transport, frames))
        return compare.Run(self.rates[transport], frames, 0.01, 0.0, size, "span")


def ctx(rounds=2, build=None):
    c = compare.Ctx()
    c.rounds, c.target_s, c.probe_bytes, c.warmup, c.timeout = rounds, 0.1, 1 << 20, 2, 10
    c.memcpy_s, c.memcpy_size = 0.1, "1Mi"
    c.build = c.build_dir = build
    return c


def record(peer, mode, transport, size, run, mbps, phase="measure"):
    return {"peer": peer, "mode": mode, "transport": transport, "frame_bytes": size,
            "phase": phase, "run": run, "throughput_mbps": mbps, "cpu_s_per_gb": None,
            "cpu_source": "span", "error": None if mbps is not None else "failed"}


class CellEntries(unittest.TestCase):
    def entries(self, names, mode, transports):
        skipped = []
        got = compare.cell_entries([peer(n) for n in names], mode, transports,
                                   lambda *a: skipped.append(a))
        return [(p.name, t) for p, t in got], skipped

    def test_shm_rows_are_ringxfer_ucx_shm_and_memcpy(self):
        got, skipped = self.entries(["ringxfer", "ringxfer-in-place", "epoll", "ucx-shm",
                                     "memcpy"], "stream", ["shm", "unix"])
        self.assertEqual(got, [("ringxfer", "shm"), ("ringxfer-in-place", "shm"),
                               ("ucx-shm", "shm"), ("memcpy", "shm"),
                               ("ringxfer", "unix"), ("epoll", "unix")])
        self.assertIn(("epoll", "has no shm transport (sockets only)", "stream", "shm"), skipped)
        self.assertIn(("ucx-shm", "has no unix transport", "stream", "unix"), skipped)
        self.assertTrue(any(s[0] == "memcpy" and s[3] == "unix" and "shm rows only" in s[1]
                            for s in skipped))
        self.assertFalse(any(s[0] == "ringxfer" for s in skipped))

    def test_a_peer_without_the_mode_is_skipped_once_for_it(self):
        got, skipped = self.entries(["ringxfer", "ucx-shm"], "echo", ["shm", "unix"])
        self.assertEqual(got, [("ringxfer", "shm"), ("ringxfer", "unix")])
        self.assertEqual(skipped, [("ucx-shm", "has no echo mode", "echo")])

    def test_every_profile_names_known_transports_and_peers(self):
        names = {p.name for p in compare.all_peers()}
        for name, prof in compare.PROFILES.items():
            self.assertTrue(set(prof["transports"].split(",")) <= {"tcp", "unix", "shm"}, name)
            for pat in prof["peers"].split(","):
                self.assertTrue(pat == "*" or pat in names, f"{name}: {pat}")
        shm = compare.PROFILES["shm"]
        sizes = {compare.parse_size(s) for s in shm["sizes"].split(",")}
        # Every target of issue 18 has both of its rows in the shm profile.
        for _, mode, size, num, den, _ in compare.ISSUE18_TARGETS:
            self.assertIn(mode, shm["modes"].split(","))
            self.assertIn(size, sizes)
            for p, t in (num, den):
                self.assertIn(p, shm["peers"].split(","))
                self.assertIn(t, shm["transports"].split(","))


class Alternation(unittest.TestCase):
    def test_shm_and_unix_runs_alternate_in_one_cell(self):
        calls = []
        a = FakePeer("a", ("shm", "unix"), {"shm": 2000.0, "unix": 1000.0}, calls)
        m = FakePeer("m", ("shm",), {"shm": 5000.0}, calls, probe=False)
        h = compare.Harness(ctx(rounds=2), [a, m])
        try:
            h.cell("echo", 64 << 10, [(a, "shm"), (m, "shm"), (a, "unix")])
        finally:
            os.rmdir(h.work)
        # Probes first (none for the peer that sizes its own runs), then the
        # rounds, each over every entry in the same order.
        self.assertEqual([(n, t) for n, t, _ in calls],
                         [("a", "shm"), ("a", "unix")] + [("a", "shm"), ("m", "shm"),
                                                          ("a", "unix")] * 2)
        self.assertEqual([c[2] for c in calls if c[0] == "m"], [0, 0])
        # A frame count comes from each entry's own rate: unix is half as fast.
        shm_frames = [f for n, t, f in calls[2:] if (n, t) == ("a", "shm")]
        unix_frames = [f for n, t, f in calls[2:] if (n, t) == ("a", "unix")]
        self.assertEqual(shm_frames[0], 2 * unix_frames[0])
        self.assertEqual(sorted(h.rates), [("a", "echo", "shm"), ("a", "echo", "unix"),
                                           ("m", "echo", "shm")])

    def test_the_memcpy_line_is_not_the_memcpy_limit(self):
        h = compare.Harness(ctx(), [])
        os.rmdir(h.work)
        h.records = [record("memcpy", "limit", None, None, 0, 12000.0),
                     record("memcpy", "stream", "shm", 4096, 0, 60000.0)]
        self.assertEqual(h.limit_values()["memcpy_mbps"], 12000.0)
        rows = compare.summarize(h.records)
        self.assertEqual(list(rows), [("stream", "shm", 4096, "memcpy")])


class ShmUnavailable(unittest.TestCase):
    def test_messages(self):
        self.assertIn("no --transport shm", compare.shm_unavailable(
            2, "--transport: shm not in {tcp,unix}\nRun with --help for more information.\n"))
        self.assertIn("io_uring unavailable", compare.shm_unavailable(
            3, "ringxfer bench: io_uring_setup: Operation not permitted\n"))
        self.assertIsNone(compare.shm_unavailable(1, "ringxfer bench: shm: bad descriptor\n"))
        self.assertIsNone(compare.shm_unavailable(2, "--frame-size: bad size\n"))

    def fake_ringxfer(self, d, status, text):
        os.makedirs(os.path.join(d, "tools"))
        exe = os.path.join(d, "tools", "ringxfer")
        with open(exe, "w") as f:
            f.write(f"#!/bin/sh\necho '{text}' >&2\nexit {status}\n")
        os.chmod(exe, os.stat(exe).st_mode | stat.S_IXUSR)

    def test_a_ringxfer_without_io_uring_skips_shm_but_fails_tcp(self):
        with tempfile.TemporaryDirectory() as d:
            self.fake_ringxfer(d, 3, "ringxfer bench: io_uring_setup: Operation not permitted")
            c, p = ctx(build=d), peer("ringxfer")
            with self.assertRaisesRegex(compare.Unavailable, "shm needs the io_uring backend"):
                p.run(c, "stream", "shm", 4096, 1, d)
            with self.assertRaises(compare.RunError):
                p.run(c, "stream", "tcp", 4096, 1, d)


class Issue18Ratios(unittest.TestCase):
    MB100 = 100 * 10**6

    def rows(self, missing=()):
        runs = {  # (mode, transport, size, peer): MB/s of rounds 0, 1, 2
            ("stream", "shm", 4096, "ringxfer"): [6000, 9000, 7000],
            ("stream", "shm", 4096, "ucx-shm"): [3000, 4000, 3500],
            ("stream", "shm", 4096, "memcpy"): [40000, 35000, 42000],
            ("stream", "shm", 1 << 20, "ringxfer"): [10000, 12000, 11000],
            ("stream", "shm", 1 << 20, "ucx-shm"): [8000, 8000, 8000],
            ("echo", "shm", self.MB100, "ringxfer"): [7000, 6000, 8000],
            ("echo", "unix", self.MB100, "ringxfer"): [3500, 2000, 2000],
        }
        recs = [record(p, m, t, s, i, v) for (m, t, s, p), vs in runs.items()
                if (m, t, s, p) not in missing for i, v in enumerate(vs)]
        return compare.summarize(recs)

    def test_ratios_of_medians(self):
        by = {t["workload"]: t for t in compare.target_ratios(self.rows())}
        s4 = by["stream 4 KiB, ringxfer shm ÷ UCX sm tag_bw"]
        self.assertEqual(s4["ratio"], 7000 / 3500)
        self.assertEqual(s4["round_ratio"], 2.0)  # median of 2.0, 2.25, 2.0
        self.assertTrue(s4["holds"])
        self.assertEqual(s4["of_memcpy"], 7000 / 40000)
        s1 = by["stream 1 MiB, ringxfer shm ÷ UCX sm tag_bw"]
        self.assertEqual(s1["ratio"], 11000 / 8000)  # 1.375 < 1.5
        self.assertFalse(s1["holds"])
        self.assertIsNone(s1["of_memcpy"])  # no memcpy line at 1 MiB
        echo = by["echo 100 MB, ringxfer shm ÷ ringxfer unix"]
        self.assertEqual(echo["ratio"], 7000 / 2000)  # medians, not the means
        self.assertEqual(echo["round_ratio"], 3.0)  # median of 2.0, 3.0, 4.0
        self.assertTrue(echo["holds"])
        # No row of the 100 MB stream target was measured: not listed.
        self.assertNotIn("stream 100 MB, ringxfer shm ÷ UCX sm tag_bw", by)

    def test_a_missing_side_says_which(self):
        targets = compare.target_ratios(self.rows(missing={("stream", "shm", 4096, "ucx-shm")}))
        s4 = next(t for t in targets if t["frame_bytes"] == 4096)
        self.assertIsNone(s4["ratio"])
        self.assertIsNone(s4["holds"])
        self.assertEqual(s4["note"], "ucx-shm shm not measured")
        self.assertEqual(s4["numerator"]["median_mbps"], 7000)

    def test_table_shows_the_ratio_lines(self):
        targets = compare.target_ratios(self.rows())
        header = {"command": "bench/compare --profile shm", "date_utc": "now",
                  "machine": {"cpu_model": "cpu", "cores": 2, "kernel": "6.1",
                              "git_commit": "abc", "git_dirty": False},
                  "profile": "shm", "rounds": 3, "target_run_s": 0.6, "targets": targets,
                  "limits": {"memcpy_mbps": 12000.0, "tcp_loopback_mbps": None,
                             "tcp_loopback_tool": "none"}}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "table.md")
            compare.write_table(path, header, self.rows(), [], ["ringxfer", "ucx-shm", "memcpy"],
                                {})
            with open(path) as f:
                md = f.read()
        self.assertIn("| stream 4 KiB, ringxfer shm ÷ UCX sm tag_bw | 7000 | 3500 | **2.00×** | "
                      "2.00× | ≥ 1.5× | yes | 18% |", md)
        self.assertIn("| stream 1 MiB, ringxfer shm ÷ UCX sm tag_bw | 11000 | 8000 | **1.38×** |",
                      md)
        self.assertIn("| echo 100 MB, ringxfer shm ÷ ringxfer unix | 7000 | 2000 | **3.50×** | "
                      "3.00× | ≥ 3× | yes | — |", md)
        self.assertIn("## stream, shm", md)


if __name__ == "__main__":
    unittest.main()
