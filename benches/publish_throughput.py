#!/usr/bin/env python3
"""Live QoS 1 publish throughput of the fieldlink agent against
`mosquitto_pub -l -q 1` (issue #8), on loopback with a private mosquitto.
Prints the table recorded in BENCHMARKS.md.

What it does:

* starts mosquitto on a free port under a temp dir (no persistence,
  `set_tcp_nodelay true`) and stops it by pid at the end;
* each round runs every variant once, in an order rotated from round to
  round (interleaved A/B):
  - `mosquitto_pub -l -q 1` fed `--messages` lines (each a JSON payload of
    the size of fieldlink's button message) from a file on stdin;
  - the fieldlink agent (`--bin`, and `--baseline-bin` if given, e.g. a
    build of `main`): sim GPIO, one button with `debounce = "0s"`, QoS 1,
    `confirm = "broker"`, a fresh state_dir, `durability` as given by
    `--durability` (default: both `batch`, the default, and `always`).
    Once the agent is connected (its retained `online` arrived), a client
    streams `--messages` alternating `set 17 1` / `set 17 0` lines into its
    sim socket (`<state_dir>/sim.sock`; one edge, so one message, per line),
    reading the answers on another thread;
* arrivals are counted by `mosquitto_sub -C <messages> -q 0` subscribed to
  the variant's topic before the stream starts; the time is from the first
  line written (or mosquitto_pub's start) to mosquitto_sub's exit after the
  last arrival;
* CPU: utime + stime of the publishing process (all its threads), from
  `/proc/<pid>/stat` for the agent (read just before the stream and 0.5 s
  after the last arrival, so the trailing PUBACKs, removals and commit are
  in it) and from `wait4`'s rusage for mosquitto_pub (which exits after its
  last PUBACK). The agent's figure includes its sim board's threads (the
  socket reads and answers) and its idle wake-ups over those 0.5 s; it
  does not include the streaming client, which is a separate process.

Per variant and round: messages per second and CPU µs per message; the
table shows the median of the rounds, min..max, and ratios against
mosquitto_pub measured in the same run.

Usage (from the repository root, after a release build):

    python3 benches/publish_throughput.py --bin target/release/fieldlink \\
        [--baseline-bin /work/fieldlink-main-release] [--messages 50000] [--rounds 5] \\
        [--durability batch --durability always]

Needs `mosquitto`, `mosquitto_pub`, `mosquitto_sub` (the mosquitto-clients
package) and `paho-mqtt` (`pip install paho-mqtt`, to wait for `online`).
Nothing here is asserted; it measures one machine, and predicts nothing
about a Raspberry Pi.
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
from benchlib import start_mosquitto as _start_mosquitto  # noqa: E402  (benches/benchlib.py)
from benchlib import stop  # noqa: E402

try:
    import paho.mqtt.client as mqtt
except ImportError:
    sys.exit("publish_throughput: needs paho-mqtt (pip install paho-mqtt)")

PREFIX = "fieldlink"
DEADLINE = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")




def start_mosquitto(tmp, port=None, password_file=None):
    """The broker of the publishing benches (this one, replay.py,
    status_roundtrip.py): a queue that holds any backlog, no in-flight cap."""
    return _start_mosquitto(tmp, "max_inflight_messages 0\n", port=port, password_file=password_file,
                            max_queued=1000000, deadline=DEADLINE)


AGENT_TOML = """device_id = "{device}"
state_dir = "{state_dir}"

[mqtt]
url = "mqtt://127.0.0.1:{port}"
{credentials}reconnect_min = "100ms"
reconnect_max = "500ms"

[outbox]
durability = "{durability}"
flush_interval = "100ms"
confirm = "broker"
max_bytes = {max_bytes}

[gpio]
backend = "sim"

[[button]]
name = "door"
pin = 17
pull = "down"
active_low = false
debounce = "0s"
qos = 1

[heartbeat]
interval = "30s"
"""


def write_agent_config(d, device, port, durability, max_bytes=268435456, gate=None):
    cfg = os.path.join(d, "agent.toml")
    credentials = ""
    if gate:
        pw = os.path.join(d, "mqtt.pass")
        with open(pw, "w") as f:
            f.write(Gate.PASSWORD + "\n")
        credentials = f'username = "{Gate.PUBLISHER}"\npassword_file = "{pw}"\n'
    with open(cfg, "w") as f:
        f.write(AGENT_TOML.format(device=device, state_dir=os.path.join(d, "state"), port=port,
                                  durability=durability, max_bytes=max_bytes, credentials=credentials))
    return cfg


class Gate:
    """Holds a publisher back until the counting subscriber is in: the
    broker's password file first lists only the subscriber's user, so the
    publisher's attempts are refused; `open` adds the publisher's user and
    makes mosquitto read the file again (SIGHUP)."""

    COUNTER = "counter"
    PUBLISHER = "publisher"
    PASSWORD = "bench-pass"

    def __init__(self, tmp):
        self.path = os.path.join(tmp, f"passwd-{uuid.uuid4().hex[:8]}")
        self._write([self.COUNTER])

    def _write(self, users):
        exe = shutil.which("mosquitto_passwd")
        if not exe:
            sys.exit("publish_throughput: mosquitto_passwd not found")
        open(self.path, "w").close()
        for u in users:
            subprocess.run([exe, "-b", self.path, u, self.PASSWORD], check=True)

    def open(self, broker):
        self._write([self.COUNTER, self.PUBLISHER])
        broker.send_signal(signal.SIGHUP)


def start_agent(bin_path, cfg, d):
    log = open(os.path.join(d, "agent.log"), "a")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    return subprocess.Popen([bin_path, "agent", "-c", cfg], cwd=d, stdout=log, stderr=log, env=env)


def cpu_seconds(pid):
    """utime + stime of every thread of `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vm_rss_kib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def wait_online(port, device, deadline=DEADLINE):
    """Waits for the agent's retained `online` status."""
    got = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"wait-{uuid.uuid4().hex[:8]}")

    def on_message(client, userdata, msg):
        if msg.payload == b"online":
            got.set()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(f"{PREFIX}/{device}/status", qos=0)
    c.loop_start()
    ok = got.wait(deadline)
    c.loop_stop()
    c.disconnect()
    if not ok:
        sys.exit(f"publish_throughput: {device} never said online")


class Counter:
    """mosquitto_sub -C n: exits after n arrivals; records first and last."""

    def __init__(self, port, topic, n, gate=None):
        exe = shutil.which("mosquitto_sub")
        if not exe:
            sys.exit("publish_throughput: mosquitto_sub not found (mosquitto-clients)")
        creds = ["-u", Gate.COUNTER, "-P", Gate.PASSWORD] if gate else []
        self.proc = subprocess.Popen([exe, "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "0", "-C", str(n),
                                      "-i", f"count-{uuid.uuid4().hex[:8]}"] + creds, stdout=subprocess.PIPE)
        self.first = None
        self.last = None
        self.lines = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        # mosquitto_sub has no "subscribed" signal: give it time to subscribe.
        time.sleep(0.5)

    def _read(self):
        out = self.proc.stdout
        line = out.readline()
        if line:
            self.first = time.perf_counter()
            self.lines = 1
        while True:
            chunk = out.read(65536)
            if not chunk:
                break
            self.lines += chunk.count(b"\n")
        self.proc.wait()
        self.last = time.perf_counter()

    def wait(self, timeout):
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.proc.kill()
            self.thread.join()
            return False
        return True


def stream_sim(sock_path, n):
    """Writes n alternating set lines; a thread reads the answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    answers = {"n": 0, "err": 0}

    def read():
        buf = b""
        while answers["n"] < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            answers["n"] += len(lines)
            answers["err"] += sum(1 for ln in lines if ln != b"ok")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Level 1 first: the pull-down rest level is 0.
    data = b"".join(b"set 17 1\n" if i % 2 == 0 else b"set 17 0\n" for i in range(n))
    t0 = time.perf_counter()
    s.sendall(data)
    return t0, s, reader, answers


def run_fieldlink(bin_path, durability, port, tmp, n):
    device = f"tp-{uuid.uuid4().hex[:8]}"
    d = tempfile.mkdtemp(prefix="agent-", dir=tmp)
    cfg = write_agent_config(d, device, port, durability)
    proc = start_agent(bin_path, cfg, d)
    try:
        wait_online(port, device)
        # The Button's pin claim runs with the Link's start: leave it time.
        time.sleep(0.3)
        counter = Counter(port, f"{PREFIX}/{device}/button/door", n)
        cpu0 = cpu_seconds(proc.pid)
        t0, s, reader, answers = stream_sim(os.path.join(d, "state", "sim.sock"), n)
        if not counter.wait(DEADLINE + n / 1000):
            sys.exit(f"publish_throughput: {device}: only {counter.lines} of {n} arrived")
        time.sleep(0.5)
        cpu1 = cpu_seconds(proc.pid)
        reader.join(5)
        s.close()
        if answers["err"]:
            sys.exit(f"publish_throughput: {device}: the sim socket refused {answers['err']} lines")
        rss = vm_rss_kib(proc.pid)
        return n / (counter.last - t0), (cpu1 - cpu0) / n, rss
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)


def payload_lines(n, path):
    """JSON lines the size of a fieldlink button message (about 220 bytes)."""
    with open(path, "w") as f:
        for i in range(n):
            body = {"device": "tp-00000000", "epoch": 1764480000000, "seq": i + 1,
                    "ts": "2026-11-30T06:00:00.000Z", "button": "door",
                    "state": "pressed" if i % 2 == 0 else "released", "pad": "x" * 80}
            f.write(json.dumps(body) + "\n")


def run_mosquitto_pub(port, lines_path, n):
    exe = shutil.which("mosquitto_pub")
    if not exe:
        sys.exit("publish_throughput: mosquitto_pub not found (mosquitto-clients)")
    topic = f"{PREFIX}/pub-{uuid.uuid4().hex[:8]}/button/door"
    counter = Counter(port, topic, n)
    with open(lines_path, "rb") as stdin:
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "1", "-l"],
                                stdin=stdin)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = status
    if not counter.wait(DEADLINE):
        sys.exit(f"publish_throughput: mosquitto_pub: only {counter.lines} of {n} arrived")
    return n / (counter.last - t0), (usage.ru_utime + usage.ru_stime) / n, usage.ru_maxrss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="the fieldlink binary to measure")
    ap.add_argument("--baseline-bin", help="another fieldlink binary (e.g. main) measured in the same run")
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--durability", action="append", choices=["batch", "always"])
    args = ap.parse_args()
    durabilities = args.durability or ["batch", "always"]

    variants = [("mosquitto_pub -l -q 1", None, None)]
    for label, b in [("fieldlink", args.bin), ("baseline", args.baseline_bin)]:
        if b:
            for d in durabilities:
                variants.append((f"{label} {d}", os.path.abspath(b), d))

    tmp = tempfile.mkdtemp(prefix="fieldlink-pubtp-")
    lines_path = os.path.join(tmp, "lines.txt")
    payload_lines(args.messages, lines_path)
    broker, port = start_mosquitto(tmp)
    results = {v[0]: [] for v in variants}
    try:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for name, b, d in order:
                if b is None:
                    rate, cpu, _ = run_mosquitto_pub(port, lines_path, args.messages)
                else:
                    rate, cpu, _ = run_fieldlink(b, d, port, tmp, args.messages)
                results[name].append((rate, cpu))
                print(f"round {r + 1}: {name:24} {rate:9.0f} msg/s  {cpu * 1e6:6.1f} µs CPU/msg",
                      file=sys.stderr, flush=True)
    finally:
        stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)

    anchor = results[variants[0][0]]
    a_rate = statistics.median(x[0] for x in anchor)
    a_cpu = statistics.median(x[1] for x in anchor)
    print(f"live QoS 1 publishing, {args.messages} messages per variant and round, {args.rounds} rounds, "
          f"median of the rounds (min .. max); load average at the end: {os.getloadavg()[0]:.1f}")
    print()
    print("| variant | msg/s | msg/s min .. max | CPU µs/msg | CPU min .. max | rate / mosquitto_pub | "
          "CPU / mosquitto_pub |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, _, _ in variants:
        xs = results[name]
        rate = statistics.median(x[0] for x in xs)
        cpu = statistics.median(x[1] for x in xs)
        print(f"| {name} | {rate:.0f} | {min(x[0] for x in xs):.0f} .. {max(x[0] for x in xs):.0f} | "
              f"{cpu * 1e6:.1f} | {min(x[1] for x in xs) * 1e6:.1f} .. {max(x[1] for x in xs) * 1e6:.1f} | "
              f"{rate / a_rate:.2f} | {cpu / a_cpu:.2f} |")


if __name__ == "__main__":
    main()
