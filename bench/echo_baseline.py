#!/usr/bin/env python3
"""ringxfer echo vs the plain blocking C++ loop, side by side.

Runs `ringxfer bench` and `blocking_echo bench` alternately (A B A B ...) on
the same machine, each against its own self-started loopback server, and
reports medians with min-max, the ratio of medians, and the peak RSS of each
process. Both send the same 16-byte-header frames, one frame in flight.

    bench/echo_baseline.py --build build --rounds 5 --frames 10 --frame-size 100M
    bench/echo_baseline.py --rss-frames 50     # also the 50-frame RSS check
    bench/echo_baseline.py --variant saf=--store-and-forward --variant unreg=--no-register

Exit status 0 even when a target is missed: it measures, it does not judge.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(cmd, json_path):
    proc = subprocess.run(cmd + ["--json", json_path], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"echo_baseline: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    with open(json_path) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build", help="meson build folder")
    ap.add_argument("--rounds", type=int, default=5, help="A/B pairs")
    ap.add_argument("--frames", type=int, default=10, help="measured frames per run")
    ap.add_argument("--frame-size", default="100M")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "unix"])
    ap.add_argument("--rss-frames", type=int, default=0, help="extra run of this many frames for peak RSS")
    ap.add_argument("--extra", default="", help="extra ringxfer bench flags, e.g. --store-and-forward")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="also run ringxfer with these flags, e.g. saf=--store-and-forward (repeatable)")
    args = ap.parse_args()

    rx = [os.path.join(args.build, "tools", "ringxfer"), "bench", "--quiet"]
    bl = [os.path.join(args.build, "bench", "blocking_echo"), "bench"]
    common = ["--frame-size", args.frame_size, "--transport", args.transport]
    peers = {
        "ringxfer": rx + common + ["--frames", str(args.frames)] + args.extra.split(),
        "blocking": bl + common + ["--frames", str(args.frames)],
    }
    for v in args.variant:
        name, _, flags = v.partition("=")
        peers[name] = rx + common + ["--frames", str(args.frames)] + flags.split()
    results = {name: [] for name in peers}
    rss = {name: {"client": 0, "server": 0} for name in peers}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, cmd in peers.items():  # alternate A B A B
                j = run(cmd, os.path.join(tmp, f"{name}-{r}.json"))
                results[name].append(j["results"]["throughput_mbps"])
                print(f"round {r + 1} {name:9s} {j['results']['throughput_mbps']:8.1f} MB/s", file=sys.stderr)
        if args.rss_frames:
            for name, cmd in peers.items():
                cmd = [c for c in cmd]
                cmd[cmd.index("--frames") + 1] = str(args.rss_frames)
                j = run(cmd, os.path.join(tmp, f"{name}-rss.json"))
                rss[name] = j["results"]["rss_peak_bytes"]

    med = {n: statistics.median(v) for n, v in results.items()}
    print(f"| peer | median MB/s | min-max MB/s | ratio ringxfer/peer |")
    print(f"|---|---:|---:|---:|")
    for n, v in results.items():
        print(f"| {n} | {med[n]:.0f} | {min(v):.0f}-{max(v):.0f} | {med['ringxfer'] / med[n]:.2f} |")
    if args.rss_frames:
        print()
        print(f"| peer | frames | peak RSS client MiB | peak RSS server MiB |")
        print(f"|---|---:|---:|---:|")
        for n in peers:
            c, s = rss[n]["client"], rss[n]["server"] or 0
            print(f"| {n} | {args.rss_frames} | {c / 2**20:.0f} | {s / 2**20:.0f} |")
    print()
    print(json.dumps({"throughput_mbps": results, "median_mbps": med, "rss_peak_bytes": rss}))


if __name__ == "__main__":
    main()
