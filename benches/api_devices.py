#!/usr/bin/env python3
"""`GET /api/devices` of `fieldlink hub` over a large SQLite database (issue
#8), side by side with Python's sqlite3 running the same SQL on the same
file. Prints the table recorded in BENCHMARKS.md.

What it does:

* builds one SQLite database with the hub's schema (a hub is started on it
  once, which migrates it, and stopped), then bulk-inserts with Python's
  sqlite3: `--devices` devices (each with an agent-shaped newest heartbeat,
  one relay, online/offline), and `--rows` messages spread over them (90 %
  button, 5 % heartbeat, 5 % relay state), plus a few set-aside records;
* per round, in an order rotated from round to round (interleaved A/B):
  each hub binary (`--bin`, and `--baseline-bin` if given) is started on a
  copy-free read of that file (`hub` with the embedded broker on a free
  port, web on a free port), `--requests` requests of `GET /api/devices`
  are timed one after the other over one keep-alive connection after 5
  untimed ones (wall time from sending the request to the last byte of the
  body), and Python's sqlite3 runs the SQL the hub's store runs for it
  before the one-statement device list (`src/hub/store/sql.rs`: devices,
  relays, sensors, set-aside counts) the same number of times, once
  fetching the rows only ("sql") and once also building the same JSON with
  `json` ("sql+json"); and the hub's one statement now ("one JSON query",
  its aggregates' ORDER BY moved into subqueries for sqlite3 < 3.44);
* per variant: the median over the rounds of each round's median, with
  the min..max of those, the response size, and ratios against Python's
  "sql" time measured in the same run.

Usage (from the repository root, after `cargo build --release`):

    python3 benches/api_devices.py --bin target/release/fieldlink \\
        [--baseline-bin /work/fieldlink-main-release] [--devices 1000] \\
        [--rows 1000000] [--requests 200] [--rounds 5]

Needs nothing beyond Python 3's standard library. Nothing is asserted; it
measures one (shared, loaded) machine.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, stop, wait_port  # noqa: E402  (benches/benchlib.py)

DEADLINE = 60.0


HUB_TOML = """state_dir = "{state}"
topic_prefix = "fieldlink"

[broker]
embedded = true
listen = "127.0.0.1:{mqtt}"

[database]
url = "sqlite://{db}"

[web]
listen = "127.0.0.1:{web}"
"""


def start_hub(binary, db, tmp):
    d = tempfile.mkdtemp(prefix="hub-", dir=tmp)
    web = free_port()
    cfg = os.path.join(d, "hub.toml")
    with open(cfg, "w") as f:
        f.write(HUB_TOML.format(state=os.path.join(d, "state"), mqtt=free_port(), db=db, web=web))
    log = open(os.path.join(d, "hub.log"), "w")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    proc = subprocess.Popen([binary, "hub", "-c", cfg], cwd=d, stdout=log, stderr=log, env=env)
    wait_port(web, proc, "hub", deadline=DEADLINE)
    with open(os.path.join(d, "state", "hub.token")) as f:
        token = f.read().strip()
    return proc, web, token


HEARTBEAT = {"uptime_s": 123456, "cpu_percent": 3.5, "load_1m": 0.12, "mem_used_bytes": 21000000,
             "mem_total_bytes": 500000000, "disk_free_bytes": 9000000000, "disk_total_bytes": 16000000000,
             "temp_c": 48.3, "outbox": {"depth": 0, "bytes": 0, "dropped": 0, "unconfirmed": 0},
             "link": {"connects": 1, "disconnects": 0}, "version": "0.1.0"}


def build(binary, path, tmp, devices, rows):
    proc, _, _ = start_hub(binary, path, tmp)
    stop(proc)
    db = sqlite3.connect(path)
    rnd = random.Random(8)
    ts = "2026-11-30T06:00:00.000Z"
    names = [f"pi-{i:04d}" for i in range(devices)]
    per = rows // devices
    hb_rows, dev_rows, relay_rows, msg_rows = [], [], [], []
    for n in names:
        hb = dict(HEARTBEAT, device=n, epoch=1, seq=per, ts=ts)
        dev_rows.append((n, rnd.randint(0, 1), ts, 1, per, json.dumps(hb, separators=(",", ":"))))
        relay_rows.append((n, "pump", rnd.choice(["on", "off"]), 1, per - 1))
    db.executemany("INSERT INTO devices (device, online, last_seen, heartbeat_epoch, heartbeat_seq, heartbeat) "
                   "VALUES (?, ?, ?, ?, ?, ?)", dev_rows)
    db.executemany("INSERT INTO relays (device, relay, state, epoch, seq) VALUES (?, ?, ?, ?, ?)", relay_rows)

    def gen():
        for i in range(rows):
            n = names[i % devices]
            seq = i // devices + 1
            r = seq % 20
            if r == 0:
                kind, name, body = "heartbeat", None, dict(HEARTBEAT)
            elif r == 1:
                kind, name, body = "relay", "pump", {"relay": "pump", "state": "on", "cause": "startup",
                                                     "command_id": None}
            else:
                kind, name, body = "button", "door", {"button": "door", "state": "pressed"}
            body.update(device=n, epoch=1, seq=seq, ts=ts)
            yield (n, 1, seq, ts, kind, name, json.dumps(body, separators=(",", ":")), ts)
    db.executemany("INSERT INTO messages (device, epoch, seq, ts, kind, name, payload, received_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", gen())
    db.executemany("INSERT INTO set_aside (device, topic, reason, received_at, payload, payload_bytes) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   [(names[i], f"fieldlink/{names[i]}/button/x", "not JSON", ts, "x", 1) for i in range(20)])
    db.commit()
    db.close()


# The store's statements for GET /api/devices before issue #8 (and still on
# MySQL/PostgreSQL): src/hub/store/sql.rs.
SQL = [
    "SELECT device, online, last_seen, heartbeat FROM devices ORDER BY device",
    "SELECT device, relay, state FROM relays ORDER BY device, relay",
    "SELECT device, sensor, value, unit, ts FROM sensors ORDER BY device, sensor",
    "SELECT device, COUNT(*) FROM set_aside WHERE device IS NOT NULL GROUP BY device",
]


# The hub's one statement on SQLite (src/hub/store/sql.rs SQLITE_DEVICES_JSON),
# with its aggregates' ORDER BY moved into subqueries: Python's sqlite3 may
# be older than 3.44 (Debian 12: 3.40), which has no ORDER BY in an aggregate.
ONE_QUERY = """SELECT '[' || COALESCE(group_concat(v, ','), '') || ']' FROM (SELECT '{"device":' || json_quote(d.device)
 || ',"online":' || CASE WHEN d.online <> 0 THEN 'true' ELSE 'false' END
 || ',"last_seen":' || json_quote(d.last_seen)
 || ',"heartbeat":' || COALESCE(d.heartbeat, 'null')
 || ',"relays":' || (SELECT json_group_object(relay, state) FROM
    (SELECT relay, state FROM relays r WHERE r.device = d.device ORDER BY relay))
 || ',"sensors":' || (SELECT json_group_object(sensor, json_object('value', value, 'unit', unit, 'ts', ts)) FROM
    (SELECT * FROM sensors s WHERE s.device = d.device ORDER BY sensor))
 || ',"set_aside":' || COALESCE(a.n, 0) || '}' AS v
 FROM devices d LEFT JOIN (SELECT device, COUNT(*) AS n FROM set_aside WHERE device IS NOT NULL GROUP BY device) a
 ON a.device = d.device ORDER BY d.device)"""


def python_once(db, with_json):
    if with_json == "one":
        t = time.perf_counter()
        db.execute(ONE_QUERY).fetchone()[0].encode()
        return time.perf_counter() - t
    t = time.perf_counter()
    res = [db.execute(q).fetchall() for q in SQL]
    if with_json:
        devs = {}
        out = []
        for d, online, last_seen, hb in res[0]:
            v = {"device": d, "online": online != 0, "last_seen": last_seen,
                 "heartbeat": json.loads(hb) if hb else None, "relays": {}, "sensors": {}, "set_aside": 0}
            devs[d] = v
            out.append(v)
        for d, r, s in res[1]:
            if d in devs:
                devs[d]["relays"][r] = s
        for d, s, value, unit, ts in res[2]:
            if d in devs:
                devs[d]["sensors"][s] = {"value": value, "unit": unit, "ts": ts}
        for d, n in res[3]:
            if d in devs:
                devs[d]["set_aside"] = n
        json.dumps(out, separators=(",", ":")).encode()
    return time.perf_counter() - t


def hub_series(binary, path, tmp, n):
    proc, web, token = start_hub(binary, path, tmp)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", web, timeout=30)
        headers = {"Authorization": f"Bearer {token}"}
        times, size = [], 0
        for i in range(n + 5):
            t = time.perf_counter()
            conn.request("GET", "/api/devices", headers=headers)
            r = conn.getresponse()
            body = r.read()
            dt = time.perf_counter() - t
            if r.status != 200:
                sys.exit(f"api_devices: {binary}: HTTP {r.status}: {body[:200]!r}")
            if i >= 5:
                times.append(dt)
            size = len(body)
        conn.close()
        return statistics.median(times), size
    finally:
        stop(proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--baseline-bin")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    bins = [os.path.abspath(a.bin)] + ([os.path.abspath(a.baseline_bin)] if a.baseline_bin else [])
    names = {bins[0]: "fieldlink (this build)", "py": "python sqlite3: sql", "pyjson": "python sqlite3: sql+json",
             "pyone": "python sqlite3: one JSON query"}
    if a.baseline_bin:
        names[bins[1]] = "fieldlink (baseline)"
    tmp = tempfile.mkdtemp(prefix="api-devices-")
    path = os.path.join(tmp, "hub.db")
    try:
        t = time.monotonic()
        # The baseline migrates: the database is the schema both builds read.
        build(bins[-1], path, tmp, a.devices, a.rows)
        print(f"built {a.devices} devices, {a.rows} messages in {time.monotonic() - t:.0f} s "
              f"({os.path.getsize(path) / 1e6:.0f} MB)", flush=True)
        variants = bins + ["py", "pyjson", "pyone"]
        res, sizes = {}, {}
        for r in range(a.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                if v.startswith("py"):
                    mode = {"py": False, "pyjson": True, "pyone": "one"}[v]
                    db = sqlite3.connect(path)
                    for _ in range(5):
                        python_once(db, mode)
                    med = statistics.median(python_once(db, mode) for _ in range(a.requests))
                    db.close()
                else:
                    med, sizes[v] = hub_series(v, path, tmp, a.requests)
                res.setdefault(v, []).append(med)
                print(f"  round {r + 1} {names[v]:28} {med * 1000:8.2f} ms", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{a.devices} devices, {a.rows} messages, {a.requests} requests per round, {a.rounds} rounds")
    anchor = statistics.median(res["py"])
    print(f"{'variant':28} {'median ms (min..max)':>24} {'bytes':>8} {'x python sql':>13}")
    for v, xs in res.items():
        ms = f"{statistics.median(xs) * 1000:.2f} ({min(xs) * 1000:.2f}..{max(xs) * 1000:.2f})"
        size = str(sizes.get(v, ""))
        print(f"{names[v]:28} {ms:>24} {size:>8} {statistics.median(xs) / anchor:13.2f}")


if __name__ == "__main__":
    main()
