#!/usr/bin/env python3
"""A 1,000-device fleet against the hub (issue #8): `fieldlink fleet-sim
--devices 1000 --rate 1 --duration 10m` through a private mosquitto into
`fieldlink hub` on SQLite (and MariaDB / PostgreSQL when their local servers
answer), side by side with the seeds' design collector as the anchor.
Prints the table recorded in BENCHMARKS.md.

What it does, per database backend and in the order given by `--backends`:

* starts mosquitto on a free port under a temp dir (no persistence,
  `max_connections -1`, `max_queued_messages 100000`,
  `set_tcp_nodelay true`), with the open-file limit raised to its hard limit
  so that 1,000 connections fit, and stops it by pid at the end;
* `hub`: creates its own database (SQLite file in the temp dir; MariaDB
  root@127.0.0.1:3306 and PostgreSQL postgres@127.0.0.1:5432 get a fresh
  `fieldlink_fleet_<pid>` database, dropped at the end), starts `fieldlink
  hub` (the release binary, `embedded = false`, the config's defaults:
  batch_max 500, batch_wait 50 ms), waits until mosquitto's log shows its
  subscription, runs `fieldlink fleet-sim ... --verify-db <url>` and reads
  its report (sent, acked, stored, lost, duplicates, publish -> commit p50 /
  p95 / p99 / max, where commit time is the hub's `received_at`, see
  src/fleet_sim/db.rs), and the hub's CPU time and peak RSS from /proc;
* `seed` (the anchor): the seeds' design, a Python paho subscriber (QoS 1,
  `fieldlink/+/#`) doing one INSERT and one commit per message into MariaDB
  (pymysql), stamping each row with the time right after its commit. The
  same `fleet-sim` runs without `--verify-db`; the script then reads the
  table and counts stored / lost / duplicates and the latency itself
  (`--anchor-duration`, since the anchor may fall behind and its backlog
  would drain long after the run).

The machine is shared: the load average before and after each run is
printed, and `late sends` (sends the sim started over one period late) says
when the sim itself could not keep up. Nothing here is asserted.

Usage (from the repository root, after `cargo build --release`):

    python3 benches/fleet.py --bin target/release/fieldlink \\
        [--devices 1000] [--rate 1] [--duration 10m] \\
        [--backends sqlite,mariadb,postgres,seed] [--anchor-duration 2m]

Needs `mosquitto`, `paho-mqtt` and, for the anchor, `pymysql`
(`pip install paho-mqtt pymysql`); MariaDB / PostgreSQL backends are
skipped with a reason when their servers do not answer.
"""

import argparse
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, mosquitto_log, start_mosquitto, stop  # noqa: E402  (benches/benchlib.py)

PREFIX = "fieldlink"
DEADLINE = 60.0


def log(msg):
    print(f"fleet: {msg}", file=sys.stderr, flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_duration(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        sys.exit(f"fleet: duration '{text}': expected e.g. 30s, 10m")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]




class ProcStats:
    """CPU seconds and peak RSS of one process, sampled from /proc."""

    def __init__(self, pid):
        self.pid = pid
        self.peak_kb = 0
        self.cpu = 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                self.cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass

    def _run(self):
        while not self.done.wait(1.0):
            self._sample()

    def stop(self):
        self._sample()
        self.done.set()
        return self.cpu, self.peak_kb


HUB_TOML = """state_dir = "{state}"
topic_prefix = "{prefix}"

[broker]
embedded = false
url = "mqtt://127.0.0.1:{port}"
client_id = "{client_id}"

[database]
url = "{db}"

[web]
listen = "127.0.0.1:{web}"
"""


def mysql(sql):
    subprocess.run(["mysql", "-uroot", "-h127.0.0.1", "-P3306", "-e", sql], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def psql(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                    "-qc", sql], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def server_answers(kind):
    try:
        (mysql if kind == "mariadb" else psql)("SELECT 1")
        return True
    except (OSError, subprocess.CalledProcessError) as e:
        log(f"skipping {kind}: its server does not answer ({e})")
        return False


def make_db(kind, tmp, name):
    """(url, drop) for a fresh database of `kind`."""
    if kind == "sqlite":
        return f"sqlite://{tmp}/hub-{name}.db", lambda: None
    if kind == "mariadb":
        mysql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}")
        return f"mysql://root@127.0.0.1:3306/{name}", lambda: mysql(f"DROP DATABASE IF EXISTS {name}")
    psql(f"DROP DATABASE IF EXISTS {name}")
    psql(f"CREATE DATABASE {name}")
    return f"postgres://postgres@127.0.0.1:5432/{name}", lambda: psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def wait_subscribed(tmp, port, client_id, hub):
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if hub.poll() is not None:
            sys.exit(f"fleet: the hub exited with {hub.returncode} (see {tmp}/hub.log)")
        try:
            with open(mosquitto_log(tmp, port)) as f:
                if any(client_id in line and PREFIX in line for line in f):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"fleet: the hub did not subscribe within {DEADLINE} s (see {tmp}/hub.log)")


def run_sim(args, port, duration, id_prefix, verify_db=None):
    cmd = [args.bin, "fleet-sim", "--broker", f"mqtt://127.0.0.1:{port}", "--devices", str(args.devices),
           "--rate", str(args.rate), "--duration", duration, "--qos", "1", "--id-prefix", id_prefix,
           "--topic-prefix", PREFIX, "--settle", "60s", "--connect-timeout", "120s"]
    if verify_db:
        cmd += ["--verify-db", verify_db]
    log(" ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=raise_nofile)
    stats = ProcStats(proc.pid)
    out, err = proc.communicate()
    cpu, rss = stats.stop()
    if proc.returncode not in (0, 1):
        sys.stderr.write(err)
        sys.exit(f"fleet: fleet-sim exited with {proc.returncode}")
    return out, cpu, rss


def report_fields(out):
    r = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[1].isdigit():
            r[words[0]] = int(words[1])
        if line.startswith("late sends"):
            r["late"] = int(words[2])
        m = re.search(r"p50 (\d+)\s+p95 (\d+)\s+p99 (\d+)\s+max (\d+)", line)
        if m:
            r["p50"], r["p95"], r["p99"], r["max"] = map(int, m.groups())
    return r


def run_hub(args, tmp, port, kind):
    name = f"fieldlink_fleet_{os.getpid()}_{kind}"
    url, drop = make_db(kind, tmp, name)
    client_id = f"fleet-hub-{kind}-{os.getpid()}"
    state = os.path.join(tmp, f"state-{kind}")
    cfg = os.path.join(tmp, f"hub-{kind}.toml")
    with open(cfg, "w") as f:
        f.write(HUB_TOML.format(state=state, prefix=PREFIX, port=port, client_id=client_id, db=url,
                                web=free_port()))
    hub_log = open(os.path.join(tmp, f"hub-{kind}.log"), "w")
    hub = subprocess.Popen([args.bin, "hub", "-c", cfg], stdout=hub_log, stderr=hub_log,
                           env={**os.environ, "RUST_LOG": "warn"})
    try:
        wait_subscribed(tmp, port, client_id, hub)
        stats = ProcStats(hub.pid)
        load_before = loadavg()
        out, sim_cpu, sim_rss = run_sim(args, port, args.duration, f"fleet-{kind}", verify_db=url)
        load_after = loadavg()
        hub_cpu, hub_rss = stats.stop()
    finally:
        stop(hub, timeout=60)
        hub_log.close()
        drop()
    r = report_fields(out)
    r.update(name=f"fieldlink hub, {kind}", load=f"{load_before} -> {load_after}", hub_cpu=hub_cpu,
             hub_rss=hub_rss, sim_cpu=sim_cpu, sim_rss=sim_rss, raw=out)
    return r


SEED_COLLECTOR = r'''
import json, signal, sys, time
import paho.mqtt.client as mqtt
import pymysql
db = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database=sys.argv[2], autocommit=False)
cur = db.cursor()
cur.execute("CREATE TABLE IF NOT EXISTS seed_messages (id BIGINT AUTO_INCREMENT PRIMARY KEY, device VARCHAR(64), "
            "epoch BIGINT, seq BIGINT, ts VARCHAR(32), payload TEXT)")
db.commit()
committed = []  # (device, epoch, seq, ts, ms right after the commit): kept in RAM, written at SIGTERM
def on_connect(c, u, f, rc, p=None):
    c.subscribe(sys.argv[3] + "/+/#", qos=1)
def on_message(c, u, m):
    try:
        v = json.loads(m.payload)
    except ValueError:
        return
    if not isinstance(v, dict) or "seq" not in v:
        return
    cur.execute("INSERT INTO seed_messages (device, epoch, seq, ts, payload) VALUES (%s, %s, %s, %s, %s)",
                (v.get("device"), v.get("epoch", 0), v["seq"], v.get("ts"), m.payload.decode()))
    db.commit()
    committed.append((v.get("device"), v.get("epoch", 0), v["seq"], v.get("ts"), int(time.time() * 1000)))
def on_term(signum, frame):
    with open(sys.argv[4], "w") as f:
        for row in committed:
            f.write("\t".join(map(str, row)) + "\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="seed-collector", clean_session=True)
c.on_connect = on_connect
c.on_message = on_message
c.connect("127.0.0.1", int(sys.argv[1]), 60)
print("ready", flush=True)
c.loop_forever()
'''


def ts_ms(text):
    # 2026-11-30T06:20:00.123Z
    from datetime import datetime, timezone
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def run_seed(args, tmp, port):
    try:
        import pymysql
    except ImportError:
        log("skipping the seed anchor: pymysql is not installed (pip install pymysql)")
        return None
    if not server_answers("mariadb"):
        return None
    name = f"fieldlink_fleet_{os.getpid()}_seed"
    mysql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}")
    script = os.path.join(tmp, "seed_collector.py")
    with open(script, "w") as f:
        f.write(SEED_COLLECTOR)
    col_log = open(os.path.join(tmp, "seed.log"), "w")
    times = os.path.join(tmp, "seed-commits.tsv")
    col = subprocess.Popen([sys.executable, script, str(port), name, PREFIX, times], stdout=subprocess.PIPE,
                           stderr=col_log, text=True)
    try:
        if col.stdout.readline().strip() != "ready":
            sys.exit(f"fleet: the seed collector did not start (see {tmp}/seed.log)")
        time.sleep(2)
        stats = ProcStats(col.pid)
        load_before = loadavg()
        id_prefix = "fleet-seed"
        out, sim_cpu, sim_rss = run_sim(args, port, args.anchor_duration, id_prefix)
        r = report_fields(out)
        # Let the backlog drain: wait until no row was added for 10 s (at most 10 min).
        db = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database=name)
        last, still_since, end = -1, time.monotonic(), time.monotonic() + 600
        drained_s = None
        t_end_sim = time.monotonic()
        while time.monotonic() < end:
            with db.cursor() as c:
                c.execute("SELECT COUNT(*) FROM seed_messages WHERE device LIKE %s", (id_prefix + "-%",))
                n = c.fetchone()[0]
            db.commit()
            if n >= r.get("sent", 0):
                drained_s = time.monotonic() - t_end_sim
                break
            if n != last:
                last, still_since = n, time.monotonic()
            elif time.monotonic() - still_since > 10:
                break
            time.sleep(1)
        load_after = loadavg()
        seed_cpu, seed_rss = stats.stop()
        with db.cursor() as c:
            c.execute("SELECT epoch FROM seed_messages WHERE device LIKE %s ORDER BY id DESC LIMIT 1",
                      (id_prefix + "-%",))
            row = c.fetchone()
            epoch = row[0] if row else r.get("epoch")
            c.execute("SELECT device, seq FROM seed_messages WHERE device LIKE %s AND epoch = %s",
                      (id_prefix + "-%", epoch))
            rows = c.fetchall()
        db.close()
    finally:
        stop(col, timeout=60)
        col_log.close()
        mysql(f"DROP DATABASE IF EXISTS {name}")
    seen, dups = set(), 0
    for device, seq in rows:
        if (device, seq) in seen:
            dups += 1
            continue
        seen.add((device, seq))
    lat, first = [], set()
    try:
        with open(times) as f:
            for line in f:
                device, e, seq, ts, ms = line.rstrip("\n").split("\t")
                if device.startswith(id_prefix + "-") and str(e) == str(epoch) and (device, seq) not in first:
                    first.add((device, seq))
                    lat.append(max(0, int(ms) - ts_ms(ts)))
    except OSError as e:
        log(f"seed anchor: no commit times ({e})")
    lat.sort()

    def rank(p):
        # Nearest rank, as fleet-sim's report: ceil(p * n), 1-based.
        return lat[min(len(lat), max(1, math.ceil(p * len(lat)))) - 1] if lat else None

    sent = r.get("sent", 0)
    r.update(name="seeds' design (paho, INSERT+commit per message, MariaDB)", stored=len(seen), duplicates=dups,
             lost=sent - len(seen), p50=rank(0.50), p95=rank(0.95), p99=rank(0.99), max=lat[-1] if lat else None,
             load=f"{load_before} -> {load_after}", hub_cpu=seed_cpu, hub_rss=seed_rss, sim_cpu=sim_cpu,
             sim_rss=sim_rss, drained_s=drained_s, raw=out)
    return r


def fmt(v):
    return "-" if v is None else str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/fieldlink")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--duration", default="10m")
    ap.add_argument("--anchor-duration", default="2m")
    ap.add_argument("--backends", default="sqlite,mariadb,postgres,seed")
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        sys.exit(f"fleet: {args.bin} not found (cargo build --release)")
    parse_duration(args.duration)
    raise_nofile()
    tmp = tempfile.mkdtemp(prefix="fieldlink-fleet-")
    # max_connections: a fleet's worth; subscribe lines: wait_subscribed reads them.
    mosq, port = start_mosquitto(tmp, "max_connections -1\nlog_type warning\nlog_type subscribe\n",
                                 preexec_fn=raise_nofile, deadline=DEADLINE)
    results = []
    try:
        for kind in [b.strip() for b in args.backends.split(",") if b.strip()]:
            log(f"{kind}: load average {loadavg()}")
            if kind == "seed":
                r = run_seed(args, tmp, port)
            elif kind in ("mariadb", "postgres") and not server_answers(kind):
                r = None
            elif kind in ("sqlite", "mariadb", "postgres"):
                r = run_hub(args, tmp, port, kind)
            else:
                sys.exit(f"fleet: unknown backend '{kind}'")
            if r:
                sys.stderr.write(r["raw"])
                log("row: " + row(r))
                results.append(r)
    finally:
        stop(mosq)
    print(f"\n{args.devices} devices x {args.rate} msg/s, QoS 1, hub runs {args.duration}, "
          f"anchor runs {args.anchor_duration}; machine {os.cpu_count()} cores, shared")
    print("| collector | sent | acked | stored | lost | dup | late sends | publish->commit p50 / p95 / p99 / max ms "
          "| collector CPU s / peak RSS MB | sim CPU s / peak RSS MB | load avg before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))


def row(r):
    lat = " / ".join(fmt(r.get(k)) for k in ("p50", "p95", "p99", "max"))
    extra = f" (backlog drained {r['drained_s']:.0f} s after the sim)" if r.get("drained_s") is not None else ""
    return (f"| {r['name']}{extra} | {fmt(r.get('sent'))} | {fmt(r.get('acked'))} | {fmt(r.get('stored'))} | "
            f"{fmt(r.get('lost'))} | {fmt(r.get('duplicates'))} | {fmt(r.get('late'))} | {lat} | "
            f"{r['hub_cpu']:.1f} / {r['hub_rss'] / 1024:.0f} | {r['sim_cpu']:.1f} / {r['sim_rss'] / 1024:.0f} | "
            f"{r['load']} |")


if __name__ == "__main__":
    main()
