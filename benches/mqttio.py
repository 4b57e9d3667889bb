"""mqtt-io (https://github.com/flyte/mqtt-io, from PyPI) as an anchor for the
benches: the tool a Raspberry Pi user would pick instead of fieldlink's agent.

It runs with its `mock` GPIO module (no Pi here) and one digital output,
`pump`, whose set topic is `<prefix>/output/pump/set` ("ON"/"OFF") and whose
state topic is `<prefix>/output/pump`. mqtt-io's state payload carries no
command id, so a command counts as confirmed at the first state message
with the asked-for payload that arrives after the publish (the benches send
one command at a time, alternating ON and OFF).

mqtt-io is measured as shipped: it leaves Nagle on, so its state message,
written right after the PUBACK of the command, waits for the broker's
delayed ACK (about 40 ms on Linux). The paho echo agent in the same benches
sets TCP_NODELAY, as fieldlink does.

Which Python runs it: `$FIELDLINK_MQTTIO_PYTHON`, else this interpreter. It
must be able to `import mqtt_io` (`pip install mqtt-io`; it pins its own
paho-mqtt and aiomqtt, so a venv keeps it apart:
`python3 -m venv /tmp/mqttio && /tmp/mqttio/bin/pip install mqtt-io`).
`available()` says why not when it cannot.
"""

import os
import subprocess
import sys

CONFIG = """mqtt:
  host: 127.0.0.1
  port: {port}
  topic_prefix: {prefix}
  client_id: {prefix}
  clean_session: false
gpio_modules:
  - name: mock
    module: mock
digital_outputs:
  - name: pump
    module: mock
    pin: 27
    publish_initial: false
    retain: true
"""


def python():
    return os.environ.get("FIELDLINK_MQTTIO_PYTHON") or sys.executable


def available():
    """None when mqtt-io can run, else the reason it cannot."""
    try:
        out = subprocess.run([python(), "-c", "import mqtt_io, importlib.metadata as m; print(m.version('mqtt-io'))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python()}: {e}"
    if out.returncode != 0:
        return (f"{python()} cannot import mqtt_io (pip install mqtt-io, or set FIELDLINK_MQTTIO_PYTHON "
                f"to a venv's python that can)")
    return None


def version():
    out = subprocess.run([python(), "-c", "import importlib.metadata as m; print(m.version('mqtt-io'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def topics(prefix):
    """(set topic, state topic) of the `pump` output."""
    return f"{prefix}/output/pump/set", f"{prefix}/output/pump"


def start(port, tmp, prefix):
    d = os.path.join(tmp, f"mqttio-{prefix}")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.yml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(port=port, prefix=prefix))
    log = open(os.path.join(d, "mqttio.log"), "w")
    return subprocess.Popen([python(), "-m", "mqtt_io", cfg], cwd=d, stdout=log, stderr=log)
