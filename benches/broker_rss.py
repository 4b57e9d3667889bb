#!/usr/bin/env python3
"""The embedded broker's memory under parked sessions (BENCHMARKS.md,
"Embedded broker: rumqttd 0.20 vs rmqtt 0.24").

Owns one measurement: a running `fieldlink hub` with the embedded broker,
N devices that each connect with a persistent session (clean_session = 0),
subscribe at QoS 1 to their own `relay/+/set` and disconnect, then Q QoS 1
commands published to each parked session; the hub's VmRSS is read from
/proc before and after. It must not start or stop the hub, and talks to
127.0.0.1 only. Plain sockets and MQTT 3.1.1 by hand, so it runs against
any fieldlink version (the rumqttd one on main has no auth: pass no
credentials).

  broker_rss.py --port 1883 --pid <hub pid> [--devices 1000] [--queued 10]
      [--passwords FILE (lines 'device password'; devices are its ids)]
      [--hub-user fieldlink-hub --hub-password-file state/broker-hub.pass]
"""

import argparse
import socket
import struct
import time


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode()
    return struct.pack("!H", len(b)) + b


def packet(kind, body):
    return bytes([kind]) + varint(len(body)) + body


def read_packet(sock):
    head = sock.recv(1)
    if not head:
        raise ConnectionError("connection closed")
    mult, length = 1, 0
    while True:
        b = sock.recv(1)[0]
        length += (b & 127) * mult
        mult *= 128
        if not b & 128:
            break
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("connection closed")
        body += chunk
    return head[0], body


def connect(port, client_id, user=None, password=None, clean=True):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    flags = (0x02 if clean else 0) | (0x80 if user else 0) | (0x40 if password else 0)
    body = s("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + s(client_id)
    if user:
        body += s(user)
    if password:
        body += s(password)
    sock.sendall(packet(0x10, body))
    kind, ack = read_packet(sock)
    if kind != 0x20 or ack[1] != 0:
        raise RuntimeError(f"CONNECT {client_id} refused: {ack!r}")
    return sock


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--queued", type=int, default=10)
    ap.add_argument("--passwords")
    ap.add_argument("--hub-user")
    ap.add_argument("--hub-password-file")
    ap.add_argument("--prefix", default="fieldlink")
    a = ap.parse_args()

    if a.passwords:
        with open(a.passwords) as f:
            creds = [line.split() for line in f if line.strip()][: a.devices]
    else:
        creds = [[f"rss-{i:04}", None] for i in range(a.devices)]
    hub_password = None
    if a.hub_password_file:
        with open(a.hub_password_file) as f:
            hub_password = f.read().strip()

    before = rss_kib(a.pid)
    for device, password in creds:
        sock = connect(a.port, device, device if password else None, password, clean=False)
        sock.sendall(packet(0x82, struct.pack("!H", 1) + s(f"{a.prefix}/{device}/relay/+/set") + b"\x01"))
        kind, ack = read_packet(sock)
        if kind != 0x90 or ack[-1] != 1:
            raise RuntimeError(f"SUBSCRIBE of {device} refused: {ack!r}")
        sock.sendall(b"\xe0\x00")  # DISCONNECT: the session stays, parked
        sock.close()
    parked = rss_kib(a.pid)

    pub = connect(a.port, f"rss-publisher-{int(time.time())}", a.hub_user, hub_password)
    pid = 0
    for device, _ in creds:
        for q in range(a.queued):
            pid = pid % 65535 + 1
            payload = (
                '{"state":"on","id":"%08d-%04d","expires_at":"2099-01-01T00:00:00.000Z"}' % (q, pid)
            ).encode()
            body = s(f"{a.prefix}/{device}/relay/pump/set") + struct.pack("!H", pid) + payload
            pub.sendall(packet(0x32, body))
            kind, _ = read_packet(pub)
            if kind != 0x40:
                raise RuntimeError(f"expected PUBACK, got {kind:#x}")
    pub.sendall(b"\xe0\x00")
    pub.close()
    time.sleep(2)
    queued = rss_kib(a.pid)
    n = len(creds)
    print(f"devices {n}, queued {a.queued} each ({n * a.queued} QoS 1 messages)")
    print(f"hub VmRSS: idle {before} KiB, {n} parked sessions {parked} KiB, with the queued messages {queued} KiB")
    print(f"per parked session {(parked - before) / n:.1f} KiB, per queued message {(queued - parked) / (n * a.queued) * 1024:.0f} B")

    # Proof that the broker kept them: the last device returns and counts
    # what it gets (acknowledging each).
    device, password = creds[-1]
    sock = connect(a.port, device, device if password else None, password, clean=False)
    sock.settimeout(3)
    got = 0
    try:
        while True:
            kind, body = read_packet(sock)
            if kind >> 4 == 3:
                got += 1
                topic_len = struct.unpack("!H", body[:2])[0]
                packet_id = body[2 + topic_len : 4 + topic_len]
                sock.sendall(packet(0x40, packet_id))
    except (socket.timeout, ConnectionError):
        pass
    sock.close()
    print(f"device {device} reconnected and received {got} of its {a.queued} queued messages")


if __name__ == "__main__":
    main()
