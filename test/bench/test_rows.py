#!/usr/bin/env python3
"""bench/rows's shm-latency pieces on inputs whose answer is known: the
ucx_perftest tag_lat output it parses, the bench error that says a ringxfer
lacks --transport shm, the medians and per-round ratios, and the table line
of a row that could not be measured."""
import importlib.machinery
import importlib.util
import os
import tempfile
import unittest

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "rows")
_loader = importlib.machinery.SourceFileLoader("bench_rows", TOOL)  # no .py suffix
_spec = importlib.util.spec_from_loader("bench_rows", _loader)
rows = importlib.util.module_from_spec(_spec)
_loader.exec_module(rows)

# What `env UCX_TLS=sm,self ucx_perftest 127.0.0.1 -p PORT -t tag_lat -s 64 -f -v`
# (UCX 1.13.1) prints, with overall_lat moved off avg_lat so the two differ.
UCX_TAG_LAT = """\
iterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,avg_mr,overall_mr
200000,0.522,0.545,0.548,112.01,112.01,1835132,1835132
"""


class ShmLatencyRow(unittest.TestCase):
    def test_ucx_tag_lat_p50_and_mean(self):
        self.assertEqual(rows.parse_ucx_lat("[ucx INFO] noise\n" + UCX_TAG_LAT),
                         {"p50_us": 0.522, "mean_us": 0.548})

    def test_ucx_output_without_numbers_is_an_error(self):
        with self.assertRaisesRegex(RuntimeError, "cannot parse ucx_perftest"):
            rows.parse_ucx_lat("UCX ERROR client failed. connect() failed: Connection refused\n")

    def test_a_bench_without_transport_shm_is_recognised(self):
        self.assertTrue(rows.lacks_shm("--transport: shm not in {tcp,unix}\n"
                                       "Run with --help for more information.\n"))
        self.assertFalse(rows.lacks_shm("ringxfer bench: shm: memfd_create: Function not implemented\n"))
        self.assertFalse(rows.lacks_shm(""))

    def test_medians_and_per_round_ratios(self):
        runs = [{"peer": "a", "p50_us": 1.0}, {"peer": "b", "p50_us": 2.0},
                {"peer": "a", "p50_us": 4.0}, {"peer": "b", "p50_us": 2.0},
                {"peer": "a", "p50_us": 3.0}, {"peer": "b", "p50_us": 6.0}]
        med = rows.medians(runs)
        self.assertEqual(med, {"a": {"p50_us": 3.0}, "b": {"p50_us": 2.0}})
        r = rows.ratios(runs, med, "a", "b", ("p50_us",))
        self.assertEqual(r["p50_ratio"], 1.5)         # 3 / 2
        self.assertEqual(r["p50_round_ratio"], 0.5)   # median of 0.5, 2, 0.5

    def test_a_row_that_could_not_be_measured_says_why(self):
        doc = {"shm-latency": {"median": {"ucx-sm": {"p50_us": 0.53, "mean_us": 0.56}},
                               "pairs": {}, "holds": False,
                               "error": "ringxfer lacks --transport shm"}}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.md")
            rows.write_md(path, doc)
            with open(path) as f:
                md = f.read()
        self.assertIn("fails: ringxfer lacks --transport shm", md)
        self.assertIn("ucx-sm | p50 0.53 us, mean 0.56 us", md)


if __name__ == "__main__":
    unittest.main()
