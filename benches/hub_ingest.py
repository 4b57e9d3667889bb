#!/usr/bin/env python3
"""Hub ingest throughput (issue #8): rows stored per second by `fieldlink
hub` through mosquitto, side by side with the seeds' design (a Python paho
subscriber doing one INSERT and one commit per message, as in the
tutorials in /work/shared/seeds/) and, if given, a baseline build (e.g.
main's). Prints the table recorded in BENCHMARKS.md.

What it does, per round and database (SQLite, MariaDB, PostgreSQL), every
variant once, in an order rotated from round to round (interleaved A/B):

* a fresh mosquitto on a free port under a temp dir (no persistence,
  `max_queued_messages 100000`, `max_inflight_messages` = `--inflight`,
  20 being mosquitto's default and what config/mosquitto.conf keeps);
  stopped by pid afterwards;
* a fresh database: a SQLite file in a temp dir, or a database created
  (and dropped afterwards) on the local MariaDB (root@127.0.0.1:3306, no
  password) or PostgreSQL (postgres@127.0.0.1:5432, trust);
* the collector (the hub under test, or the seed-design subscriber)
  connects once with its persistent session and subscribes, one probe
  message is stored, and it is stopped;
* 50 devices' messages (`--messages`, 90 % button, 5 % heartbeat, 5 %
  relay state, in the agent's wire format, src/proto.rs) are published at
  QoS 1 and queued at mosquitto for that session;
* the collector starts again; `SELECT COUNT(*)` is polled every 20 ms on
  its own connection; rows/s = rows stored from the first poll that sees
  one of them to the poll that sees all of them, over that time (a run
  that stores nothing new for 30 s is reported as stalled, with how many
  it stored, and counts as no figure).

With `--embedded` it also measures the hub through its embedded broker
(SQLite): 50 provisioned devices (`fieldlink hub device add`) publish
their messages at QoS 1 while the hub runs (the embedded broker keeps no
session across a restart), rows/s over the same polling window.

Unless `--no-ceiling`, every round also measures mosquitto's own ceiling
on the same setup and backlog with no database at all: a persistent
`mosquitto_sub -q 1` session (C, output to /dev/null) is created, the same
messages are queued for it, and it drains them; msg/s = N / the
subscriber's run time (its connect included, so slightly under the true
rate). A collector behind this broker that stores as well as receives
cannot do better, so it bounds what "50 x the seed design" can mean here.

Medians of the rounds with min..max, and ratios against the seed design
measured in the same run (and against the baseline build if given).

Usage (from the repository root, after `cargo build --release`):

    python3 benches/hub_ingest.py --bin target/release/fieldlink \\
        [--baseline-bin /work/fieldlink-main-release] [--messages 50000] \\
        [--rounds 5] [--db sqlite,mariadb,postgres] [--inflight 20] [--embedded]
    python3 benches/hub_ingest.py --bin ... --baseline-bin ... --db '' --embedded

Needs mosquitto, `pip install paho-mqtt pymysql 'psycopg[binary]'`; a
database whose server does not answer is skipped with the reason printed.
Nothing here is asserted; it measures one (shared, loaded) machine.
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, start_mosquitto, stop, wait_port  # noqa: E402  (benches/benchlib.py)

try:
    import paho.mqtt.client as mqtt
except ImportError:
    sys.exit("hub_ingest: needs paho-mqtt (pip install paho-mqtt)")

PREFIX = "fieldlink"
DEVICES = 50
DEADLINE = 30.0
POLL = 0.02
STALL = 30




# ---------------------------------------------------------------- messages

def ts_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def messages(n, epoch=1):
    """`n` messages of 50 devices, 90/5/5 button/heartbeat/relay, as the
    agent renders them (envelope first, then the body)."""
    out = []
    seqs = [0] * DEVICES
    ts = ts_now()
    for i in range(n):
        d = i % DEVICES
        device = f"dev-{d:02d}"
        seqs[d] += 1
        env = {"device": device, "epoch": epoch, "seq": seqs[d], "ts": ts}
        r = (i // DEVICES) % 20
        if r == 0:
            topic = f"{PREFIX}/{device}/heartbeat"
            body = {"uptime_s": 100 + i, "cpu_percent": 3.5, "load_1m": 0.12, "mem_used_bytes": 21000000,
                    "mem_total_bytes": 500000000, "disk_free_bytes": 9000000000,
                    "disk_total_bytes": 16000000000, "temp_c": 48.3,
                    "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "unconfirmed": 0},
                    "link": {"connects": 1, "disconnects": 0}, "version": "0.1.0"}
        elif r == 1:
            topic = f"{PREFIX}/{device}/relay/pump/state"
            body = {"relay": "pump", "state": "on" if i % 2 else "off", "cause": "startup", "command_id": None}
        else:
            topic = f"{PREFIX}/{device}/button/door"
            body = {"button": "door", "state": "pressed" if i % 2 else "released"}
        env.update(body)
        out.append((topic, json.dumps(env, separators=(",", ":"))))
    return out


def publish_all(port, msgs, clients=None):
    """Publishes at QoS 1 and waits for every PUBACK. `clients`: a list of
    (device, password) to publish each device's messages as that device
    (the embedded broker); otherwise one anonymous client."""
    done = threading.Event()
    if clients is None:
        pubs = {None: new_client(port, f"pub-{uuid.uuid4().hex[:8]}")}
    else:
        pubs = {d: new_client(port, d, d, pw) for d, pw in clients}
    pending = [len(msgs)]
    lock = threading.Lock()

    def on_publish(client, userdata, mid, rc, props):
        with lock:
            pending[0] -= 1
            if pending[0] == 0:
                done.set()
    for c in pubs.values():
        c.on_publish = on_publish
        c.loop_start()
    for topic, payload in msgs:
        key = None if clients is None else topic.split("/")[1]
        pubs[key].publish(topic, payload, qos=1)
    if not done.wait(300):
        sys.exit(f"hub_ingest: {pending[0]} publishes not acknowledged")
    for c in pubs.values():
        c.disconnect()
        c.loop_stop()


def new_client(port, client_id, user=None, password=None, clean=True):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    if user is not None:
        c.username_pw_set(user, password)
    c.connect("127.0.0.1", port)
    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


# --------------------------------------------------------------- databases

class Db:
    """A fresh database of one backend; `count(table)` on its own connection."""

    def __init__(self, kind, tmp):
        self.kind = kind
        self.name = f"flbench_{uuid.uuid4().hex[:10]}"
        if kind == "sqlite":
            self.path = os.path.join(tmp, f"{self.name}.db")
            self.url = f"sqlite://{self.path}"
        elif kind == "mariadb":
            import pymysql
            c = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
            c.cursor().execute(f"CREATE DATABASE {self.name}")
            c.close()
            self.url = f"mysql://root@127.0.0.1:3306/{self.name}"
        else:
            import psycopg
            with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as c:
                c.execute(f"CREATE DATABASE {self.name}")
            self.url = f"postgres://postgres@127.0.0.1:5432/{self.name}"
        self.conn = None

    def connect(self):
        """A DB-API connection to this database."""
        if self.kind == "sqlite":
            return sqlite3.connect(self.path, timeout=30)
        if self.kind == "mariadb":
            import pymysql
            return pymysql.connect(host="127.0.0.1", port=3306, user="root", database=self.name)
        import psycopg
        return psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={self.name}")

    def count(self, table):
        if self.conn is None:
            self.conn = self.connect()
            if self.kind == "mariadb":
                self.conn.autocommit(True)
            elif self.kind == "postgres":
                self.conn.autocommit = True
        try:
            cur = self.conn.cursor()
            cur.execute(f"SELECT COUNT(*) FROM {table}")
            return cur.fetchone()[0]
        except Exception:  # the table is not there yet
            if self.kind == "sqlite":
                self.conn.rollback()
            return 0

    def drop(self):
        if self.conn is not None:
            self.conn.close()
        if self.kind == "mariadb":
            import pymysql
            c = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
            c.cursor().execute(f"DROP DATABASE IF EXISTS {self.name}")
            c.close()
        elif self.kind == "postgres":
            import psycopg
            with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as c:
                c.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def available(kind):
    try:
        Db(kind, tempfile.gettempdir()).drop()
        return None
    except Exception as e:  # skipped with the reason
        return str(e).splitlines()[0]


# -------------------------------------------------------------- collectors

SEED = r"""
import sys, sqlite3, socket
import paho.mqtt.client as mqtt
kind, url, port, client_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if kind == "sqlite":
    db = sqlite3.connect(url)
    db.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, payload TEXT, ts TEXT)")
    sql = "INSERT INTO messages (topic, payload, ts) VALUES (?, ?, datetime('now'))"
elif kind == "mariadb":
    import pymysql
    db = pymysql.connect(host="127.0.0.1", port=3306, user="root", database=url)
    db.cursor().execute("CREATE TABLE IF NOT EXISTS messages (id INT AUTO_INCREMENT PRIMARY KEY, topic VARCHAR(255), payload TEXT, ts DATETIME)")
    sql = "INSERT INTO messages (topic, payload, ts) VALUES (%s, %s, NOW())"
else:
    import psycopg
    db = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={url}")
    db.execute("CREATE TABLE IF NOT EXISTS messages (id SERIAL PRIMARY KEY, topic TEXT, payload TEXT, ts TIMESTAMP)")
    sql = "INSERT INTO messages (topic, payload, ts) VALUES (%s, %s, NOW())"
db.commit()
def on_connect(client, userdata, flags, rc, props):
    client.subscribe("fieldlink/+/#", qos=1)
def on_message(client, userdata, msg):
    cur = db.cursor()
    cur.execute(sql, (msg.topic, msg.payload.decode()))
    db.commit()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
c.on_connect = on_connect
c.on_message = on_message
c.connect("127.0.0.1", port)
c.loop_forever()
"""

HUB_TOML = """state_dir = "{state}"
topic_prefix = "fieldlink"

[broker]
embedded = {embedded}
{broker}
client_id = "{client_id}"

[database]
url = "{db_url}"

[web]
listen = "127.0.0.1:{web}"
"""


class Collector:
    def __init__(self, variant, db, port, tmp, embedded=False):
        self.variant, self.db, self.port, self.tmp = variant, db, port, tmp
        self.embedded = embedded
        self.client_id = f"c{uuid.uuid4().hex[:10]}"
        self.dir = tempfile.mkdtemp(prefix="collector-", dir=tmp)
        self.cfg = os.path.join(self.dir, "hub.toml")
        if variant != "seed":
            broker = f'listen = "127.0.0.1:{port}"' if embedded else f'url = "mqtt://127.0.0.1:{port}"'
            with open(self.cfg, "w") as f:
                f.write(HUB_TOML.format(state=os.path.join(self.dir, "state"), embedded=str(embedded).lower(),
                                        broker=broker, client_id=self.client_id, db_url=db.url, web=free_port()))
        self.proc = None

    def start(self):
        log = open(os.path.join(self.dir, "collector.log"), "a")
        if self.variant == "seed":
            path = os.path.join(self.dir, "seed.py")
            with open(path, "w") as f:
                f.write(SEED)
            target = self.db.path if self.db.kind == "sqlite" else self.db.name
            cmd = [sys.executable, path, self.db.kind, target, str(self.port), self.client_id]
        else:
            cmd = [self.variant, "hub", "-c", self.cfg]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=log, stderr=log, env=env)
        LOGS[self.proc.pid] = os.path.join(self.dir, "collector.log")
        if self.embedded:
            wait_port(self.port, self.proc, "hub (embedded broker)")

    def stop(self):
        stop(self.proc)


LOGS = {}


def log_of(proc):
    path = LOGS.get(proc.pid)
    if path is None:
        return ""
    with open(path) as f:
        return f.read()[-2000:]


def wait_count(db, table, n, proc, what):
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if db.count(table) >= n:
            return
        if proc.poll() is not None:
            sys.exit(f"hub_ingest: {what} exited with {proc.returncode}")
        time.sleep(POLL)
    sys.exit(f"hub_ingest: {what} did not store {n} rows in {table} (log: {log_of(proc)})")


def measure(db, table, base, total, proc, what):
    """rows/s from the first poll that sees a new row to the one that sees
    them all."""
    first = None
    last = (time.monotonic(), -1)
    while True:
        n = db.count(table)
        t = time.monotonic()
        if n != last[1]:
            last = (t, n)
        elif t - last[0] > STALL:
            print(f"  {what}: stalled at {n - base} of {total} (nothing new for {STALL} s)", flush=True)
            return float("nan")
        if first is None and n > base:
            first = (t, n)
        if n >= base + total:
            if first is None or t == first[0]:
                return float("nan")
            return (n - first[1]) / (t - first[0])
        if proc.poll() is not None:
            sys.exit(f"hub_ingest: {what} exited with {proc.returncode}")
        time.sleep(POLL)


def run_queued(variant, kind, msgs, tmp, inflight):
    """One measurement through mosquitto: rows/s."""
    mosq, port = start_mosquitto(tmp, f"max_inflight_messages {inflight}\n", deadline=DEADLINE)
    db = Db(kind, tmp)
    try:
        col = Collector(variant, db, port, tmp)
        col.start()
        # Probes until one is stored: the collector has its session and
        # subscription (a hub migrates its database first).
        end = time.monotonic() + 120
        probe = 0
        while db.count("messages") == 0:
            if time.monotonic() > end or col.proc.poll() is not None:
                sys.exit(f"hub_ingest: {variant} stored no probe (log: {log_of(col.proc)})")
            probe += 1
            body = {"device": "probe", "epoch": 0, "seq": probe, "ts": ts_now(), "button": "b", "state": "pressed"}
            publish_all(port, [(f"{PREFIX}/probe/button/b", json.dumps(body))])
            t = time.monotonic()
            while db.count("messages") == 0 and time.monotonic() < t + 1:
                time.sleep(POLL)
        col.stop()
        base = db.count("messages")
        publish_all(port, msgs)
        col.start()
        return measure(db, "messages", base, len(msgs), col.proc, variant)
    finally:
        if col.proc is not None:
            col.stop()
        stop(mosq)
        db.drop()


def run_ceiling(msgs, tmp, inflight):
    """mosquitto's own delivery rate of a queued QoS 1 backlog to a C
    subscriber that stores nothing: msg/s."""
    mosq, port = start_mosquitto(tmp, f"max_inflight_messages {inflight}\n", deadline=DEADLINE)
    sub = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "ceiling", "-c", "-q", "1",
           "-t", f"{PREFIX}/#"]
    try:
        # Creates the persistent session, then leaves (-W: exit after 1 s).
        subprocess.run(sub + ["-W", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        publish_all(port, msgs)
        # Timed from the subscriber's start to its exit, so its connect is
        # in it (a few ms: slightly under the true rate). Printing an arrival
        # stamp per message (`-F %U`) instead halved the rate measured: the
        # subscriber, not mosquitto, was then the limit.
        start = time.monotonic()
        subprocess.run(sub + ["-C", str(len(msgs))], stdout=subprocess.DEVNULL, timeout=300, check=True)
        return len(msgs) / (time.monotonic() - start)
    finally:
        stop(mosq)


def run_embedded(variant, msgs, tmp):
    """One measurement through the hub's embedded broker (SQLite): rows/s."""
    port = free_port()
    db = Db("sqlite", tmp)
    col = Collector(variant, db, port, tmp, embedded=True)
    clients = []
    for d in range(DEVICES):
        device = f"dev-{d:02d}"
        out = subprocess.run([variant, "hub", "device", "add", "-c", col.cfg, device], cwd=col.dir,
                             capture_output=True, text=True, check=True)
        lines = out.stdout.splitlines()
        at = [i for i, ln in enumerate(lines) if "shown only now" in ln]
        pw = [lines[at[0] + 2].strip()] if at and len(lines) > at[0] + 2 else []
        if not pw:
            sys.exit(f"hub_ingest: no password in `hub device add` output: {out.stdout!r}")
        clients.append((device, pw[0]))
    try:
        col.start()
        wait_count(db, "devices", 0, col.proc, variant)
        result = [None]

        def pub():
            publish_all(port, msgs, clients)
        t = threading.Thread(target=pub)
        t.start()
        result[0] = measure(db, "messages", 0, len(msgs), col.proc, variant)
        t.join()
        return result[0]
    finally:
        col.stop()
        db.drop()


def fmt(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):,.0f} ({min(xs):,.0f}..{max(xs):,.0f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--baseline-bin")
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--seed-messages", type=int, default=5000,
                    help="messages for the seed design (it is slow; rows/s does not depend on it)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--db", default="sqlite,mariadb,postgres")
    ap.add_argument("--inflight", type=int, default=20, help="mosquitto max_inflight_messages")
    ap.add_argument("--embedded", action="store_true")
    ap.add_argument("--no-seed", action="store_true")
    ap.add_argument("--no-ceiling", action="store_true", help="leave out mosquitto's own delivery ceiling")
    a = ap.parse_args()
    bins = [os.path.abspath(a.bin)] + ([os.path.abspath(a.baseline_bin)] if a.baseline_bin else [])
    names = {bins[0]: "fieldlink (this build)"}
    if a.baseline_bin:
        names[bins[1]] = "fieldlink (baseline)"
    names["seed"] = "seed design (paho, INSERT+commit each)"
    names["ceiling"] = "mosquitto -> mosquitto_sub, no database"
    tmp = tempfile.mkdtemp(prefix="hub-ingest-")
    msgs = messages(a.messages)
    seed_msgs = messages(a.seed_messages)
    results = {}
    try:
        for kind in [k for k in a.db.split(",") if k]:
            if kind not in ("sqlite", "mariadb", "postgres"):
                sys.exit(f"hub_ingest: --db {kind}: expected sqlite, mariadb or postgres")
            why = available(kind)
            if why:
                print(f"{kind}: skipped ({why})", flush=True)
                continue
            variants = bins + ([] if a.no_seed else ["seed"]) + ([] if a.no_ceiling else ["ceiling"])
            for r in range(a.rounds):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for v in order:
                    if v == "ceiling":
                        rate = run_ceiling(msgs, tmp, a.inflight)
                    else:
                        rate = run_queued(v, kind, seed_msgs if v == "seed" else msgs, tmp, a.inflight)
                    results.setdefault((kind, v), []).append(rate)
                    print(f"  round {r + 1} {kind:8} {names[v]:42} {rate:10,.0f} rows/s", flush=True)
        if a.embedded:
            for r in range(a.rounds):
                order = bins[r % len(bins):] + bins[:r % len(bins)]
                for v in order:
                    rate = run_embedded(v, msgs, tmp)
                    results.setdefault(("embedded", v), []).append(rate)
                    print(f"  round {r + 1} embedded {names[v]:42} {rate:10,.0f} rows/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"messages {a.messages} (seed design {a.seed_messages}), rounds {a.rounds}, "
          f"mosquitto max_inflight_messages {a.inflight}")
    print(f"{'database':9} {'variant':42} {'rows/s median (min..max)':>30} {'x seed':>8} {'x baseline':>10}")
    for (kind, v), xs in results.items():
        med = statistics.median([x for x in xs if x == x] or [float('nan')])
        seed = results.get((kind, "seed"))
        base = results.get((kind, bins[1])) if a.baseline_bin else None
        rs = f"{med / statistics.median(seed):8.1f}" if seed and v != "seed" else ""
        rb = f"{med / statistics.median(base):10.2f}" if base and v == bins[0] else ""
        print(f"{kind:9} {names[v]:42} {fmt(xs):>30} {rs:>8} {rb:>10}")
    # The anchor is the seed design into MySQL (MariaDB here).
    seed = results.get(("mariadb", "seed"))
    if seed:
        target = 50 * statistics.median(seed)
        print(f"\n50 x the seed design on MariaDB (the issue's anchor) = {target:,.0f} rows/s")
        for (kind, v), xs in results.items():
            if v == "ceiling":
                med = statistics.median(xs)
                verdict = "below" if med < target else "above"
                print(f"mosquitto's own ceiling ({kind} run): {med:,.0f} msg/s, {verdict} that")


if __name__ == "__main__":
    main()
