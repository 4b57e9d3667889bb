#!/usr/bin/env python3
"""Command -> confirmed state latency of the fieldlink agent, side by side
with a bare paho echo agent (issue #8), on loopback with a private
mosquitto. Prints the table recorded in BENCHMARKS.md.

What it does:

* starts mosquitto on a free port under a temp dir (no persistence,
  `set_tcp_nodelay true`), and stops it by pid at the end; the Python
  clients set TCP_NODELAY too (paho leaves Nagle on, and its 40 ms delayed
  ACK stalls would measure the kernel, not the agents);
* each round runs every variant once, in an order rotated from round to
  round (interleaved A/B): the fieldlink agent (sim GPIO, `confirm =
  "broker"`, a fresh state_dir) with `durability = "always"` and with
  `"batch"` (`flush_interval` 100 ms), for `--bin` and, if given, for
  `--baseline-bin` (e.g. a build of `main`), and the paho echo agent (a
  separate Python process that subscribes to the set topic at QoS 1 and
  publishes the state JSON with the same id, QoS 1, retained), the same
  echo made durable (it appends the state to a file in the temp dir and
  `fdatasync`s it before publishing: the least a confirmation that
  survives a power cut costs on this disk), and mqtt-io
  with its mock GPIO module when it can be run (`benches/mqttio.py` says
  how; skipped with the reason otherwise, or with `--no-mqtt-io`);
* a paho client publishes `{"state": "on"|"off", "id": ...}` at QoS 1 to the
  pump's set topic and waits for the `state` message naming that id
  (subscribed at QoS 0), one command at a time, after 20 untimed warm-up
  commands; the time is from the publish call to the arrival;
* per round and variant: p50 and p99 of `--commands` commands; the table
  shows the median over the rounds and the min..max, and ratios against
  the paho echo of the same run.

With `--syscalls N` it measures no latency: it attaches `strace -f -c` to
each fieldlink variant after the warm-up, sends N commands, and prints the
fsync-family calls (fsync, fdatasync, sync_file_range) and renames per
command.

Usage (from the repository root, after `cargo build --release`):

    python3 benches/command_latency.py --bin target/release/fieldlink \\
        [--baseline-bin /tmp/fieldlink-main] [--commands 500] [--rounds 5]
    python3 benches/command_latency.py --bin ... --baseline-bin ... --syscalls 200

Needs `mosquitto` and `paho-mqtt` (`pip install paho-mqtt`). Nothing here is
asserted; it measures one machine, run after run, and predicts nothing about
a Raspberry Pi's SD card.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import start_mosquitto, stop  # noqa: E402  (benches/benchlib.py)
import mqttio  # noqa: E402  (benches/mqttio.py: the mqtt-io anchor)

try:
    import paho.mqtt.client as mqtt
except ImportError:
    sys.exit("command_latency: needs paho-mqtt (pip install paho-mqtt)")

PREFIX = "fieldlink"
WARMUP = 20
DEADLINE = 30.0




AGENT_TOML = """device_id = "{device}"
state_dir = "{state_dir}"

[mqtt]
url = "mqtt://127.0.0.1:{port}"

[outbox]
durability = "{durability}"
flush_interval = "100ms"
confirm = "broker"

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


def start_fieldlink(bin_path, durability, port, tmp, device):
    d = tempfile.mkdtemp(prefix="agent-", dir=tmp)
    cfg = os.path.join(d, "agent.toml")
    with open(cfg, "w") as f:
        f.write(AGENT_TOML.format(device=device, state_dir=os.path.join(d, "state"), port=port,
                                  durability=durability))
    log = open(os.path.join(d, "agent.log"), "w")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    return subprocess.Popen([bin_path, "agent", "-c", cfg], cwd=d, stdout=log, stderr=log, env=env)


ECHO = r"""
import json, os, sys
import paho.mqtt.client as mqtt
port, device, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
# With a 4th argument: the durable echo appends each state to that file and
# fdatasyncs it before publishing (the least a durable confirmation costs).
log = open(sys.argv[4], "ab", buffering=0) if len(sys.argv) > 4 else None
set_topic = f"{prefix}/{device}/relay/pump/set"
state_topic = f"{prefix}/{device}/relay/pump/state"
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"echo-{device}", clean_session=False)
def on_connect(client, userdata, flags, rc, props):
    client.subscribe(set_topic, qos=1)
def on_message(client, userdata, msg):
    try:
        cmd = json.loads(msg.payload)
    except ValueError:
        return
    state = {"relay": "pump", "state": cmd.get("state"), "cause": "command", "command_id": cmd.get("id")}
    body = json.dumps(state)
    if log is not None:
        log.write(body.encode() + b"\n")
        os.fdatasync(log.fileno())
    client.publish(state_topic, body, qos=1, retain=True)
c.on_connect = on_connect
c.on_message = on_message
c.connect("127.0.0.1", port)
import socket
c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.loop_forever()
"""


def start_echo(port, tmp, device, durable=False):
    path = os.path.join(tmp, "echo.py")
    with open(path, "w") as f:
        f.write(ECHO)
    extra = [os.path.join(tmp, f"echo-{device}.log")] if durable else []
    return subprocess.Popen([sys.executable, path, str(port), device, PREFIX] + extra)


class Client:
    """Publishes commands and waits for the state naming their id."""

    def __init__(self, port, device):
        self.set_topic = f"{PREFIX}/{device}/relay/pump/set"
        self.cond = threading.Condition()
        self.arrived = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{device}")
        self.c.on_message = self.on_message
        self.c.connect("127.0.0.1", port)
        self.c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.c.subscribe(f"{PREFIX}/{device}/relay/pump/state", qos=0)
        self.c.loop_start()

    def on_message(self, client, userdata, msg):
        t = time.perf_counter()
        try:
            cid = json.loads(msg.payload).get("command_id")
        except ValueError:
            return
        with self.cond:
            self.arrived[cid] = t
            self.cond.notify_all()

    def command(self, state, deadline=DEADLINE):
        """Seconds from publish to the matching state; None if none came."""
        cid = uuid.uuid4().hex
        payload = json.dumps({"state": state, "id": cid})
        t0 = time.perf_counter()
        self.c.publish(self.set_topic, payload, qos=1)
        end = time.monotonic() + deadline
        with self.cond:
            while cid not in self.arrived:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.arrived.pop(cid) - t0

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


class MqttIoClient:
    """Publishes ON/OFF to mqtt-io's output and waits for the state with that
    payload that arrives after the publish (mqtt-io's state carries no id)."""

    def __init__(self, port, prefix):
        self.set_topic, state_topic = mqttio.topics(prefix)
        self.cond = threading.Condition()
        self.arrivals = []  # (time, payload)
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{prefix}")
        self.c.on_message = self.on_message
        self.c.connect("127.0.0.1", port)
        self.c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.c.subscribe(state_topic, qos=0)
        self.c.loop_start()

    def on_message(self, client, userdata, msg):
        t = time.perf_counter()
        with self.cond:
            self.arrivals.append((t, msg.payload.decode(errors="replace")))
            self.cond.notify_all()

    def command(self, state, deadline=DEADLINE):
        want = state.upper()
        with self.cond:
            seen = len(self.arrivals)
        t0 = time.perf_counter()
        self.c.publish(self.set_topic, want, qos=1)
        end = time.monotonic() + deadline
        with self.cond:
            while True:
                for t, payload in self.arrivals[seen:]:
                    if payload == want:
                        return t - t0
                seen = len(self.arrivals)
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def measure(port, device, n, before_timed=None, mqttio_prefix=None):
    client = MqttIoClient(port, mqttio_prefix) if mqttio_prefix else Client(port, device)
    try:
        # The agent may still be connecting: retry the first warm-up command.
        for attempt in range(10):
            if client.command("off", deadline=5.0) is not None:
                break
        else:
            sys.exit(f"command_latency: {device} never confirmed a command")
        for i in range(WARMUP):
            if client.command("on" if i % 2 else "off") is None:
                sys.exit(f"command_latency: {device}: a warm-up command was not confirmed")
        if before_timed:
            before_timed()
        samples = []
        for i in range(n):
            dt = client.command("on" if i % 2 == 0 else "off")
            if dt is None:
                sys.exit(f"command_latency: {device}: command {i} was not confirmed within {DEADLINE} s")
            samples.append(dt)
        return samples
    finally:
        client.close()


SYSCALLS = ["fsync", "fdatasync", "sync_file_range", "rename", "renameat", "renameat2"]


def count_syscalls(variants, port, tmp, n):
    exe = shutil.which("strace")
    if not exe:
        sys.exit("command_latency: --syscalls needs strace")
    print(f"syscalls per command, over {n} commands after the warm-up (strace -f -c attached to the agent)")
    print()
    print("| variant | " + " | ".join(SYSCALLS) + " |")
    print("|---|" + "---:|" * len(SYSCALLS))
    for name, b, d in variants:
        if b is None or b == "mqtt-io":
            continue
        device = f"strace-{uuid.uuid4().hex[:8]}"
        proc = start_fieldlink(b, d, port, tmp, device)
        out = os.path.join(tmp, f"strace-{device}.txt")
        tracer = []

        def attach():
            tracer.append(subprocess.Popen([exe, "-f", "-c", "-o", out, "-e", "trace=" + ",".join(SYSCALLS),
                                            "-p", str(proc.pid)], stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # strace attaches to every thread before the timed part

        try:
            measure(port, device, n, before_timed=attach)
        finally:
            if tracer:
                tracer[0].send_signal(signal.SIGINT)
                tracer[0].wait()
            stop(proc)
        counts = {}
        with open(out) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 5 and parts[-1] in SYSCALLS:
                    counts[parts[-1]] = int(parts[3])
        print(f"| {name} | " + " | ".join(f"{counts.get(c, 0) / n:.2f}" for c in SYSCALLS) + " |")


def percentile(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def ms(x):
    return f"{x * 1000:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="the fieldlink binary to measure")
    ap.add_argument("--baseline-bin", help="an older fieldlink binary (e.g. main) measured in the same run")
    ap.add_argument("--commands", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-mqtt-io", action="store_true", help="leave out the mqtt-io anchor")
    ap.add_argument("--syscalls", type=int, metavar="N", help="count fsyncs per command over N commands instead")
    args = ap.parse_args()

    variants = [("paho echo", None, None), ("paho echo + fdatasync", None, "durable")]
    mqttio_py = None
    if args.no_mqtt_io:
        print("mqtt-io: skipped (--no-mqtt-io)", file=sys.stderr)
    else:
        mqttio_py, why_not = mqttio.python()
        if why_not:
            print(f"mqtt-io: skipped: {why_not}", file=sys.stderr)
        else:
            variants.append((f"mqtt-io {mqttio.version(mqttio_py)} (mock GPIO)", "mqtt-io", None))
    for label, b in [("fieldlink", args.bin), ("baseline", args.baseline_bin)]:
        if b:
            for d in ("always", "batch"):
                variants.append((f"{label} {d}", os.path.abspath(b), d))

    tmp = tempfile.mkdtemp(prefix="fieldlink-cmdlat-")
    broker, port = start_mosquitto(tmp, deadline=DEADLINE)
    if args.syscalls:
        try:
            count_syscalls(variants, port, tmp, args.syscalls)
        finally:
            stop(broker)
            shutil.rmtree(tmp, ignore_errors=True)
        return
    results = {v[0]: [] for v in variants}
    try:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, b, d in order:
                device = f"bench-{r}-{uuid.uuid4().hex[:8]}"
                prefix = None
                if b is None:
                    proc = start_echo(port, tmp, device, durable=d == "durable")
                elif b == "mqtt-io":
                    prefix = f"mqttio-{r}-{uuid.uuid4().hex[:8]}"
                    proc = mqttio.start(mqttio_py, port, tmp, prefix)
                else:
                    proc = start_fieldlink(b, d, port, tmp, device)
                try:
                    samples = measure(port, device, args.commands, mqttio_prefix=prefix)
                finally:
                    stop(proc)
                p50, p99 = percentile(samples, 50), percentile(samples, 99)
                results[name].append((p50, p99))
                print(f"round {r + 1}: {name:20} p50 {ms(p50)} ms  p99 {ms(p99)} ms", file=sys.stderr, flush=True)
    finally:
        stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)

    echo = results["paho echo"]
    echo50 = statistics.median(x[0] for x in echo)
    echo99 = statistics.median(x[1] for x in echo)
    print(f"command -> confirmed state, {args.commands} commands per round, {args.rounds} rounds, median of the "
          f"rounds (min .. max)")
    print()
    print("| variant | p50 ms | p50 min .. max | p99 ms | p99 min .. max | p50 / echo | p99 / echo |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, _, _ in variants:
        xs = results[name]
        m50 = statistics.median(x[0] for x in xs)
        m99 = statistics.median(x[1] for x in xs)
        r50 = f"{ms(min(x[0] for x in xs))} .. {ms(max(x[0] for x in xs))}"
        r99 = f"{ms(min(x[1] for x in xs))} .. {ms(max(x[1] for x in xs))}"
        print(f"| {name} | {ms(m50)} | {r50} | {ms(m99)} | {r99} | {m50 / echo50:.2f} | {m99 / echo99:.2f} |")


if __name__ == "__main__":
    main()
