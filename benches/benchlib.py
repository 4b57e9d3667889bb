"""What every bench script under benches/ needs around the thing it
measures: a free loopback port, waiting for a process to listen on it,
stopping a process it started, by pid, and a private mosquitto (the lines
every bench needs; each script adds its own). Owns nothing else: each
script keeps its variants and tables.

Errors end the script with `sys.exit("<script>: ...")`, named after the
script that runs (`sys.argv[0]`).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def name():
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, deadline=30.0):
    """Until something accepts on 127.0.0.1:port; exits the script if `proc`
    (when given) exits first, or after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{name()}: {what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"{name()}: {what} did not listen on {port}")


def stop(proc, timeout=30):
    """SIGTERM, then SIGKILL after `timeout` seconds; by pid, ours only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mosquitto_log(tmp, port):
    """Where `start_mosquitto` has the broker on `port` write its log."""
    return os.path.join(tmp, f"mosquitto-{port}.log")


def start_mosquitto(tmp, extra="", port=None, password_file=None, max_queued=100000, preexec_fn=None,
                    deadline=30.0):
    """A mosquitto on 127.0.0.1:`port` (a free one if None) under `tmp`:
    no persistence, `set_tcp_nodelay true`, errors logged to
    `mosquitto_log(tmp, port)`, anonymous unless `password_file` is given,
    `max_queued_messages max_queued`, then the script's own `extra` lines.
    Returns (process, port) once it listens; stop it with `stop`."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        sys.exit(f"{name()}: mosquitto not found")
    port = port or free_port()
    conf = os.path.join(tmp, f"mosquitto-{port}.conf")
    auth = f"allow_anonymous false\npassword_file {password_file}\n" if password_file else "allow_anonymous true\n"
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\n{auth}persistence false\n"
                f"log_dest file {mosquitto_log(tmp, port)}\nlog_type error\n"
                f"max_queued_messages {max_queued}\nset_tcp_nodelay true\n{extra}")
        if os.geteuid() == 0:
            f.write("user root\n")
    proc = subprocess.Popen([exe, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=preexec_fn)
    wait_port(port, proc, "mosquitto", deadline)
    return proc, port
