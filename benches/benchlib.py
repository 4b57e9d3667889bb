"""What every bench script under benches/ needs around the thing it
measures: a free loopback port, waiting for a process to listen on it, and
stopping a process it started, by pid. Owns nothing else: each script keeps
its own broker configuration, variants and tables.

Errors end the script with `sys.exit("<script>: ...")`, named after the
script that runs (`sys.argv[0]`).
"""

import os
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
