"""`serve/local.py`: picking Serve's HTTP port. An auto-chosen port that another process takes first
is replaced by another (CI once lost the demo to this race); a port the user named that is taken is
a clear error, not a Ray traceback. Each case runs in a subprocess with its own local Ray cluster,
because the session cluster's Serve is already bound."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from srmoa_dist.serve.local import _ephemeral_low, free_port

pytestmark = pytest.mark.ray


def test_free_port_is_bindable_and_below_the_ephemeral_range():
    for _ in range(20):
        port = free_port()
        assert 20000 <= port < _ephemeral_low()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


RETRY_SCRIPT = """
import socket, httpx, ray
from ray import serve
from srmoa_dist.serve import local

held = socket.socket()
held.bind(("127.0.0.1", 0))
held.listen()
busy = held.getsockname()[1]
ray.init(num_cpus=1, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False)
said = []
host, port = local.start_http("127.0.0.1", busy, True, said.append)
assert port != busy, (port, busy)
assert any(str(busy) in s for s in said), said
r = httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=10)    # Serve's proxy answers there
# no app deployed yet: Serve's proxy answers, with an empty route table
assert r.status_code == 503 and "Route table is not populated yet" in r.text, (r.status_code, r.text)
serve.shutdown()
try:
    local.start_http("127.0.0.1", busy, False, said.append)
    raise SystemExit("a named busy port was accepted")
except local.PortInUseError as e:
    assert f"port {busy} on 127.0.0.1 is in use" in str(e), e
ray.shutdown()
print("OK", busy, port)
"""


def test_taken_port_is_retried_when_auto_and_named_when_given():
    from e2e_support import own_cluster_env

    r = subprocess.run([sys.executable, "-c", textwrap.dedent(RETRY_SCRIPT)], capture_output=True,
                       text=True, timeout=240, env=own_cluster_env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "OK" in r.stdout, out[-3000:]


START_SCRIPT = """
import sys, time
from srmoa_dist.config import SrmoaConfig
from srmoa_dist.serve import local

app = local.start(SrmoaConfig.load_yaml(sys.argv[1]), host="127.0.0.1", port=0)
try:
    print("READY", app.url, flush=True)
    while True:
        time.sleep(0.2)
finally:
    local.stop(app)
    print("STOPPED", flush=True)
"""


def test_sigterm_stops_the_app_and_its_local_ray_cluster(tmp_path, e2e_tiny_model_dir):
    """SIGTERM to a process that started the app (as `srmoa demo` and `srmoa bench` do) runs its
    cleanup: no Ray process is left behind (Ray's own handler used to leave its agents running)."""
    import time

    import psutil
    from e2e_support import own_cluster_config, own_cluster_env

    cfg_file = own_cluster_config(tmp_path, e2e_tiny_model_dir)
    cmd = [sys.executable, "-c", textwrap.dedent(START_SCRIPT), str(cfg_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=own_cluster_env())
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                break
        assert lines and lines[-1].startswith("READY"), "".join(lines)[-3000:]
        ray_pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert ray_pids, "no Ray processes under the app?"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "STOPPED" in out, "".join(lines)[-2000:] + out[-2000:]
    deadline = time.monotonic() + 30
    while True:
        alive = [p for p in ray_pids
                 if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, [psutil.Process(p).cmdline()[:2] for p in alive]
