#!/usr/bin/env python3
"""`fieldlink status` round trip (issue #8): the wall time of the command,
from spawning it to its exit with the dump printed, against a connected,
idle agent on loopback with a private mosquitto. Prints the table recorded
in BENCHMARKS.md.

Each round starts one agent per binary (`--bin`, and `--baseline-bin` if
given, e.g. a build of `main`; sim GPIO, `confirm = "broker"`), waits for
its retained `online`, then runs `fieldlink status` `--calls` times against
each in turn, interleaved call by call, and as the anchor `fieldlink
--version` (the same binary: what spawning the process alone costs). Per
round: the median and p90 of the calls; the table shows the median of the
rounds and min..max.

Usage (from the repository root, after a release build):

    python3 benches/status_roundtrip.py --bin target/release/fieldlink \\
        [--baseline-bin /work/fieldlink-main-release] [--calls 50] [--rounds 5]

Needs `mosquitto` and `paho-mqtt` (`pip install paho-mqtt`). Nothing here is
asserted.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import publish_throughput as pt  # noqa: E402  (the shared helpers)


def timed(argv):
    t = time.perf_counter()
    out = subprocess.run(argv, capture_output=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"status_roundtrip: {' '.join(argv)} exited with {out.returncode}: {out.stderr[-300:]!r}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--baseline-bin")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bins = [("fieldlink", os.path.abspath(args.bin))]
    if args.baseline_bin:
        bins.append(("baseline", os.path.abspath(args.baseline_bin)))
    names = ["spawn only (--version)"] + [f"{n} status" for n, _ in bins]
    results = {n: [] for n in names}
    tmp = tempfile.mkdtemp(prefix="fieldlink-status-")
    broker, port = pt.start_mosquitto(tmp)
    try:
        for r in range(args.rounds):
            agents = []
            try:
                for name, b in bins:
                    d = tempfile.mkdtemp(prefix="agent-", dir=tmp)
                    device = f"st-{uuid.uuid4().hex[:8]}"
                    cfg = pt.write_agent_config(d, device, port, "batch")
                    agents.append((name, b, cfg, pt.start_agent(b, cfg, d)))
                    pt.wait_online(port, device)
                time.sleep(1)
                samples = {n: [] for n in names}
                for _ in range(args.calls):
                    samples[names[0]].append(timed([bins[0][1], "--version"]))
                    for name, b, cfg, _ in agents:
                        samples[f"{name} status"].append(timed([b, "status", "-c", cfg]))
                for n, xs in samples.items():
                    xs.sort()
                    med, p90 = statistics.median(xs), xs[int(0.9 * (len(xs) - 1))]
                    results[n].append((med, p90))
                    print(f"round {r + 1}: {n:24} median {med * 1e3:6.2f} ms  p90 {p90 * 1e3:6.2f} ms",
                          file=sys.stderr, flush=True)
            finally:
                for _, _, _, proc in agents:
                    pt.stop(proc)
    finally:
        pt.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"`fieldlink status` wall time, {args.calls} calls per round, {args.rounds} rounds, median of the rounds "
          f"(min .. max); load average at the end: {os.getloadavg()[0]:.1f}")
    print()
    print("| what | median ms | min .. max | p90 ms | min .. max |")
    print("|---|---:|---:|---:|---:|")
    for n in names:
        xs = results[n]
        m = statistics.median(x[0] for x in xs)
        p = statistics.median(x[1] for x in xs)
        print(f"| {n} | {m * 1e3:.2f} | {min(x[0] for x in xs) * 1e3:.2f} .. {max(x[0] for x in xs) * 1e3:.2f} | "
              f"{p * 1e3:.2f} | {min(x[1] for x in xs) * 1e3:.2f} .. {max(x[1] for x in xs) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
