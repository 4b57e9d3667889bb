#!/usr/bin/env python3
"""Idle footprint of the fieldlink agent (issue #8): resident memory,
threads, CPU and wake-ups of a connected agent that has nothing to do,
side by side with a bare paho echo agent and mqtt-io, on loopback with a
private mosquitto. Prints the table recorded in BENCHMARKS.md.

What it does:

* starts mosquitto on a free port under a temp dir (as
  `command_latency.py` does; its helpers are imported from there) and stops
  it by pid at the end;
* each round runs every variant once, in an order rotated from round to
  round (interleaved A/B):
  - the fieldlink agent (`--bin`; sim GPIO, one relay, heartbeat 30 s,
    keep-alive 30 s (the default), `durability = "always"`) with
    `confirm = "broker"`, and with `confirm = "hub"` answered by a small
    Python stand-in for the hub (it confirms every record it receives,
    as the hub does after its commit; its own CPU is not counted);
  - the same for `--baseline-bin` if given (e.g. a build of `main`);
  - the paho echo agent of `command_latency.py` (one Python process, paho's
    `loop_forever`);
  - mqtt-io 2.x with its mock GPIO module (one output, one input), from a
    virtualenv of its own (`--mqtt-io-venv`, created and filled with
    `pip install mqtt-io` when missing; mqtt-io's dependencies would
    otherwise downgrade the paho-mqtt the other benches use); skipped with
    the reason printed when it cannot be installed;
* once a variant is connected (fieldlink: its retained `online`; mqtt-io:
  its `status` message; the echo: 3 s), it waits `--settle` seconds (start-up
  work and threads that end when idle), then samples the process every
  second for `--seconds`:
  - RSS: `VmRSS` (median and max of the samples), and `/proc/<pid>/smaps_rollup`
    (`Rss`, `Anonymous`) at the end;
  - threads: the number of `/proc/<pid>/task` entries (min, median, max of
    the samples) and every thread name seen;
  - CPU: utime + stime of the process from `/proc/<pid>/stat` (whole
    process, exited threads included, in clock ticks of 10 ms), and the
    run time of every thread from `/proc/<pid>/task/<tid>/schedstat` (ns;
    a thread that exits between two samples loses its last second);
  - wake-ups: each thread's `voluntary_ctxt_switches` (from
    `/proc/<pid>/task/<tid>/status`), summed, and the most of one thread;
* per variant: the median over the rounds and the min..max, and ratios of
  RSS and CPU against the paho echo of the same run.

Usage (from the repository root, after
`cargo build --release --no-default-features --features agent`):

    python3 benches/agent_idle.py --bin target/release/fieldlink \\
        [--baseline-bin /tmp/fieldlink-main] [--seconds 60] [--rounds 3] \\
        [--variants echo,fieldlink-broker,fieldlink-hub,baseline-broker,baseline-hub,mqtt-io]

Needs `mosquitto` and `paho-mqtt` (`pip install paho-mqtt`); mqtt-io is
installed into its own virtualenv by the script (`python3 -m venv`, then
`pip install mqtt-io`). Nothing here is asserted; it measures one machine,
and a shared one says so in BENCHMARKS.md.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import command_latency as cl  # noqa: E402  (mosquitto, the echo agent, free ports)
import mqttio  # noqa: E402  (benches/mqttio.py: the mqtt-io venv)

mqtt = cl.mqtt
PREFIX = cl.PREFIX
TICK = os.sysconf("SC_CLK_TCK")

AGENT_TOML = """device_id = "{device}"
state_dir = "{state_dir}"

[mqtt]
url = "mqtt://127.0.0.1:{port}"

[outbox]
durability = "always"
confirm = "{confirm}"

[gpio]
backend = "sim"

[[relay]]
name = "pump"
pin = 27
power_on_state = "last"
qos = 1

[heartbeat]
interval = "30s"
"""

MQTT_IO_YAML = """mqtt:
  host: 127.0.0.1
  port: {port}
  topic_prefix: {prefix}
  client_id: {device}

gpio_modules:
  - name: mock
    module: mock

digital_outputs:
  - name: pump
    module: mock
    pin: 27

digital_inputs:
  - name: door
    module: mock
    pin: 17
"""

HUB = r"""
import json, sys
import paho.mqtt.client as mqtt
port, device, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
base = f"{prefix}/{device}"
skip = {f"{base}/ack", f"{base}/sync", f"{base}/status"}
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hub-{device}")
def on_connect(client, userdata, flags, rc, props):
    client.subscribe(f"{base}/#", qos=1)
    client.publish(f"{base}/hub-ready", b"1", qos=1, retain=True)
def on_message(client, userdata, msg):
    if msg.topic in skip or msg.topic.endswith("/set"):
        return
    try:
        body = json.loads(msg.payload)
        epoch, seq = int(body["epoch"]), int(body["seq"])
    except (ValueError, KeyError, TypeError):
        return
    client.publish(f"{base}/ack", json.dumps({"epoch": epoch, "seqs": [[seq, seq]]}), qos=1)
c.on_connect = on_connect
c.on_message = on_message
c.connect("127.0.0.1", port)
c.loop_forever()
"""


def wait_for_message(port, topic, payload=None, deadline=cl.DEADLINE):
    """True once a message on `topic` (with `payload`, if given) arrives."""
    got = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"wait-{uuid.uuid4().hex[:8]}")

    def on_connect(client, userdata, flags, rc, props):
        client.subscribe(topic, qos=0)

    def on_message(client, userdata, msg):
        if payload is None or msg.payload == payload:
            got.set()

    c.on_connect = on_connect
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        return got.wait(deadline)
    finally:
        c.loop_stop()
        c.disconnect()


def start_fieldlink(bin_path, confirm, port, tmp, device):
    d = tempfile.mkdtemp(prefix="agent-", dir=tmp)
    cfg = os.path.join(d, "agent.toml")
    with open(cfg, "w") as f:
        f.write(AGENT_TOML.format(device=device, state_dir=os.path.join(d, "state"), port=port, confirm=confirm))
    log = open(os.path.join(d, "agent.log"), "w")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    return subprocess.Popen([bin_path, "agent", "-c", cfg], cwd=d, stdout=log, stderr=log, env=env)


def start_mqtt_io(py, port, tmp, device):
    d = tempfile.mkdtemp(prefix="mqttio-", dir=tmp)
    cfg = os.path.join(d, "config.yml")
    with open(cfg, "w") as f:
        f.write(MQTT_IO_YAML.format(port=port, prefix=f"mqttio/{device}", device=device))
    log = open(os.path.join(d, "mqtt-io.log"), "w")
    return subprocess.Popen([py, "-m", "mqtt_io", cfg], cwd=d, stdout=log, stderr=log)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def status_field(text, key):
    for line in (text or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def snapshot(pid):
    """One sample: {tid: (name, run_ns, voluntary, involuntary)}, VmRSS kB,
    utime+stime ticks of the whole process."""
    threads = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        comm, sched, status = read(f"{base}/comm"), read(f"{base}/schedstat"), read(f"{base}/status")
        if comm is None or sched is None or status is None:
            continue  # exited meanwhile
        threads[tid] = (comm.strip(), int(sched.split()[0]), status_field(status, "voluntary_ctxt_switches"),
                        status_field(status, "nonvoluntary_ctxt_switches"))
    stat = read(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[1].split() if stat else []
    ticks = int(fields[11]) + int(fields[12]) if len(fields) > 12 else None
    return threads, status_field(read(f"/proc/{pid}/status"), "VmRSS"), ticks


def observe(pid, seconds):
    first = snapshot(pid)
    if first is None:
        sys.exit(f"agent_idle: process {pid} is gone")
    start_threads, _, start_ticks = first
    seen = {tid: v for tid, v in start_threads.items()}  # the last values of every thread seen
    counts, rss = [len(start_threads)], []
    t0 = time.monotonic()
    ticks = start_ticks
    while True:
        left = t0 + seconds - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
        s = snapshot(pid)
        if s is None:
            sys.exit(f"agent_idle: process {pid} exited during the measurement")
        threads, vmrss, ticks = s
        seen.update(threads)
        counts.append(len(threads))
        rss.append(vmrss)
    elapsed = time.monotonic() - t0
    rollup = read(f"/proc/{pid}/smaps_rollup") or ""
    roll = {}
    for line in rollup.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            roll[parts[0].rstrip(":")] = int(parts[1])
    per_thread = {}
    run_ns = 0
    for tid, (name, ns, vol, invol) in seen.items():
        b = start_threads.get(tid, (name, 0, 0, 0))
        run_ns += ns - b[1]
        key = name
        n = 2
        while key in per_thread:
            key = f"{name}#{n}"
            n += 1
        per_thread[key] = (vol - b[2], invol - b[3], tid not in start_threads)
    return {
        "seconds": elapsed,
        "rss_median_kb": statistics.median(rss),
        "rss_max_kb": max(rss),
        "rollup_rss_kb": roll.get("Rss"),
        "rollup_anon_kb": roll.get("Anonymous"),
        "threads_min": min(counts),
        "threads_median": statistics.median(counts),
        "threads_max": max(counts),
        "threads_seen": len(seen),
        "threads_le4_pct": 100.0 * sum(1 for c in counts if c <= 4) / len(counts),
        "cpu_ticks": ticks - start_ticks,
        "cpu_pct_ticks": 100.0 * (ticks - start_ticks) / TICK / elapsed,
        "cpu_pct_sched": 100.0 * run_ns / 1e9 / elapsed,
        "wakeups": sum(v[0] for v in per_thread.values()),
        "wakeups_max_thread": max(v[0] for v in per_thread.values()),
        "per_thread": per_thread,
    }


def run_variant(name, kind, arg, port, tmp, args, r):
    device = f"idle-{r}-{uuid.uuid4().hex[:8]}"
    helpers = []
    if kind == "fieldlink":
        b, confirm = arg
        if confirm == "hub":
            path = os.path.join(tmp, "hub.py")
            with open(path, "w") as f:
                f.write(HUB)
            helpers.append(subprocess.Popen([sys.executable, path, str(port), device, PREFIX]))
            if not wait_for_message(port, f"{PREFIX}/{device}/hub-ready"):
                sys.exit("agent_idle: the hub stand-in did not start")
        proc = start_fieldlink(b, confirm, port, tmp, device)
        ready = wait_for_message(port, f"{PREFIX}/{device}/status", b"online")
    elif kind == "echo":
        proc = cl.start_echo(port, tmp, device)
        time.sleep(3.0)
        ready = proc.poll() is None
    else:
        proc = start_mqtt_io(arg, port, tmp, device)
        ready = wait_for_message(port, f"mqttio/{device}/status")
    try:
        if not ready:
            sys.exit(f"agent_idle: {name} did not come up (see the logs under {tmp})")
        time.sleep(args.settle)
        return observe(proc.pid, args.seconds)
    finally:
        cl.stop(proc)
        for h in helpers:
            cl.stop(h)


def fmt_range(xs, f):
    return f"{f(min(xs))} .. {f(max(xs))}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="the fieldlink binary to measure")
    ap.add_argument("--baseline-bin", help="an older fieldlink binary (e.g. main) measured in the same run")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long each variant is sampled")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between connected and the first sample")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", help="comma-separated subset of: echo, fieldlink-broker, fieldlink-hub, "
                    "baseline-broker, baseline-hub, mqtt-io")
    ap.add_argument("--mqtt-io-venv", default=mqttio.DEFAULT_VENV)
    args = ap.parse_args()

    keep = {v.strip() for v in args.variants.split(",")} if args.variants else None
    wanted = lambda key: keep is None or key in keep  # noqa: E731
    variants = [("paho echo", "echo", None)] if wanted("echo") else []
    for label, b in [("fieldlink", args.bin), ("baseline", args.baseline_bin)]:
        for confirm in ("broker", "hub"):
            if b and wanted(f"{label}-{confirm}"):
                variants.append((f"{label} confirm={confirm}", "fieldlink", (os.path.abspath(b), confirm)))
    if wanted("mqtt-io"):
        py, why = mqttio.python(args.mqtt_io_venv)
        if py:
            variants.append(("mqtt-io (mock gpio)", "mqtt-io", py))
        else:
            print(f"agent_idle: mqtt-io skipped: {why}", file=sys.stderr)
    if not variants:
        sys.exit("agent_idle: no variant to run (see --variants)")

    tmp = tempfile.mkdtemp(prefix="fieldlink-idle-")
    broker, port = cl.start_mosquitto(tmp)
    results = {v[0]: [] for v in variants}
    try:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, kind, arg in order:
                res = run_variant(name, kind, arg, port, tmp, args, r)
                results[name].append(res)
                threads = ", ".join(f"{k} {v[0]}{' (new)' if v[2] else ''}" for k, v in sorted(res["per_thread"].items()))
                print(f"round {r + 1}: {name:24} VmRSS {res['rss_median_kb'] / 1024:.1f} MiB, "
                      f"threads {res['threads_min']}..{res['threads_max']}, CPU {res['cpu_pct_sched']:.4f} % "
                      f"({res['cpu_ticks']} ticks), wake-ups {res['wakeups']} [{threads}]",
                      file=sys.stderr, flush=True)
    finally:
        cl.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)

    echo = results.get("paho echo")
    mib = lambda kb: f"{kb / 1024:.1f}"  # noqa: E731
    pct = lambda x: f"{x:.4f}"  # noqa: E731
    print(f"idle, {args.seconds:.0f} s sampled after {args.settle:.0f} s settling, {args.rounds} rounds, "
          "median of the rounds (min .. max)")
    print()
    print("| variant | VmRSS MiB | min .. max | Anonymous MiB | threads (median of samples) | threads min .. max "
          "| samples with <= 4 threads | CPU % of a core | min .. max | wake-ups / min | one thread's most / min "
          "| RSS / echo | CPU / echo |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    echo_rss = statistics.median(x["rss_median_kb"] for x in echo) if echo else None
    echo_cpu = statistics.median(x["cpu_pct_sched"] for x in echo) if echo else None
    for name, _, _ in variants:
        xs = results[name]
        per_min = [x["wakeups"] * 60.0 / x["seconds"] for x in xs]
        rss = statistics.median(x["rss_median_kb"] for x in xs)
        cpu = statistics.median(x["cpu_pct_sched"] for x in xs)
        ratio_rss = f"{rss / echo_rss:.2f}" if echo_rss else "-"
        ratio_cpu = f"{cpu / echo_cpu:.2f}" if echo_cpu else "-"
        print(f"| {name} | {mib(rss)} | {fmt_range([x['rss_median_kb'] for x in xs], mib)} "
              f"| {mib(statistics.median(x['rollup_anon_kb'] or 0 for x in xs))} "
              f"| {statistics.median(x['threads_median'] for x in xs):g} "
              f"| {min(x['threads_min'] for x in xs)} .. {max(x['threads_max'] for x in xs)} "
              f"| {statistics.median(x['threads_le4_pct'] for x in xs):.0f} % "
              f"| {pct(cpu)} | {fmt_range([x['cpu_pct_sched'] for x in xs], pct)} "
              f"| {statistics.median(per_min):.0f} "
              f"| {statistics.median(x['wakeups_max_thread'] * 60.0 / x['seconds'] for x in xs):.0f} "
              f"| {ratio_rss} | {ratio_cpu} |")
    print()
    print("wake-ups per thread over the sampled time (voluntary context switches; last round):")
    for name, _, _ in variants:
        last = results[name][-1]["per_thread"]
        print(f"  {name}: " + json.dumps({k: v[0] for k, v in sorted(last.items())}))


if __name__ == "__main__":
    main()
