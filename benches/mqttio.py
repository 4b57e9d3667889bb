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

Which Python runs it: `python()` says (a virtualenv of its own, made on
first use, or `$FIELDLINK_MQTTIO_PYTHON`), or why none can.
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


DEFAULT_VENV = os.path.expanduser("~/.cache/fieldlink-bench/mqtt-io-venv")


def python(venv=DEFAULT_VENV):
    """(the python that runs mqtt-io, None), or (None, why not).

    `$FIELDLINK_MQTTIO_PYTHON` if set; else a virtualenv of its own at
    `venv`, created and filled with `pip install mqtt-io` the first time
    (mqtt-io pins its own paho-mqtt and aiomqtt, which must not replace the
    benches' paho-mqtt)."""
    py = os.environ.get("FIELDLINK_MQTTIO_PYTHON") or os.path.join(venv, "bin", "python")
    check = [py, "-c", "import mqtt_io"]
    if os.path.exists(py) and subprocess.run(check, capture_output=True).returncode == 0:
        return py, None
    if os.environ.get("FIELDLINK_MQTTIO_PYTHON"):
        return None, f"$FIELDLINK_MQTTIO_PYTHON ({py}) cannot import mqtt_io"
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True)
        r = subprocess.run([py, "-m", "pip", "install", "-q", "mqtt-io"], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"pip install mqtt-io failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"cannot create the virtualenv '{venv}': {e}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, "mqtt-io installed but does not import"
    return py, None


def version(py):
    out = subprocess.run([py, "-c", "import importlib.metadata as m; print(m.version('mqtt-io'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def topics(prefix):
    """(set topic, state topic) of the `pump` output."""
    return f"{prefix}/output/pump/set", f"{prefix}/output/pump"


def start(py, port, tmp, prefix):
    d = os.path.join(tmp, f"mqttio-{prefix}")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.yml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(port=port, prefix=prefix))
    log = open(os.path.join(d, "mqttio.log"), "w")
    return subprocess.Popen([py, "-m", "mqtt_io", cfg], cwd=d, stdout=log, stderr=log)
