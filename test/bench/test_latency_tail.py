#!/usr/bin/env python3
"""bench/latency_tail on logs whose answer is known: slow round trips placed
across tick boundaries and between them, in both file formats."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "latency_tail")


def run(path, *args):
    p = subprocess.run([sys.executable, TOOL, path, "--json", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(p.stderr)
    return json.loads(p.stdout)


class LatencyTail(unittest.TestCase):
    def write(self, lines):
        f = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
        f.write("\n".join(lines) + "\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        return f.name

    def synthetic(self, sep):
        # 2 s of 20 us round trips ending every 100 us, tick period 1000 us.
        # Slow ones (80 us): 6 whose span [end - rtt, end] holds a multiple of
        # 1000 us, 4 that do not.
        start = 5_000_000_000
        rows = {start + i * 100_000: 20_000 for i in range(20_000)}
        at_tick = [start + k * 1_000_000 + 40_000 for k in range(1, 7)]   # span holds the tick
        between = [start + k * 1_000_000 + 500_000 for k in range(1, 5)]  # span 420..500 us past it
        for e in at_tick + between:
            rows[e] = 80_000
        lines = [f"{e}{sep}{r}{sep}0" for e, r in sorted(rows.items())]
        return lines

    def test_splits_slow_round_trips_by_tick(self):
        path = self.write(["end_ns,rtt_ns,connection"] + self.synthetic(","))
        r = run(path, "--tick-us", "1000")
        self.assertEqual(r["round_trips"], 20_006)  # 4 of the slow ones replace regular ones
        self.assertEqual(r["rtt_ns"]["p50"], 20_000)
        self.assertEqual(r["slow_ns"], 40_000)  # default: twice the median
        self.assertEqual(r["slow"], 10)
        secs = r["seconds"]
        self.assertAlmostEqual(r["slow_at_tick_per_s"] * secs, 6, places=6)
        self.assertAlmostEqual(r["slow_other_per_s"] * secs, 4, places=6)

    def test_space_separated_pairs_and_a_threshold(self):
        path = self.write(self.synthetic(" "))
        r = run(path, "--tick-us", "1000", "--slow-us", "100")
        self.assertEqual(r["slow"], 0)  # nothing took more than 100 us

    def test_an_empty_log_is_an_error(self):
        path = self.write(["end_ns,rtt_ns,connection"])
        p = subprocess.run([sys.executable, TOOL, path], capture_output=True, text=True)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("no round trips", p.stderr)


if __name__ == "__main__":
    unittest.main()
