"""The `srmoa` command: --help everywhere; `srmoa serve` in a subprocess (its own local Ray cluster)
answers chat/feedback/stats from the CLI clients, and SIGTERM leaves no Ray process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from srmoa_dist.cli import app

COMMANDS = [[], ["init"], ["serve"], ["chat"], ["feedback"], ["stats"], ["demo"], ["bench"],
            ["bench", "store"], ["bench", "serve"], ["bench", "chaos"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "srmoa")
def test_help_on_every_command(cmd):
    r = CliRunner().invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


@pytest.mark.parametrize("bench", ["lifelong", "feedback", "chaos"])
def test_a_bad_bench_config_is_a_usage_error(bench, tmp_path):
    """`srmoa bench ... --config`: a missing, malformed or invalid file names the option and the
    problem (exit 2, no traceback) before anything starts."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {relation_named_slack: 2}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    for path, what in ((tmp_path / "missing.yaml", "No such file"), (bad, "model.relation_named_slack"),
                       (broken, "not valid YAML")):
        out = str(tmp_path / "o.json")
        r = CliRunner().invoke(app, ["bench", bench, "--config", str(path), "--out", out])
        assert r.exit_code == 2, r.output
        assert "--config" in r.output and what in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output


def test_an_unknown_lifelong_baseline_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(app, ["bench", "lifelong", "--baselines", "base,gracee", "--out",
                                 str(tmp_path / "o.json")])
    assert r.exit_code == 2, r.output
    said = " ".join(r.output.split())
    assert "--baselines" in said and "gracee" in said and "grace" in said, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o.json").exists()


def _srmoa(*args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srmoa_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.ray
def test_serve_subprocess_clients_and_clean_sigterm(tmp_path, e2e_tiny_model_dir):
    from e2e_support import own_cluster_config, own_cluster_env

    from srmoa_dist.serve.local import free_port

    data = tmp_path / "data"
    cfg_file = own_cluster_config(tmp_path, e2e_tiny_model_dir)
    port = free_port()
    env = own_cluster_env(SRMOA_API_KEY="")
    proc = subprocess.Popen([sys.executable, "-m", "srmoa_dist.cli", "serve", "--data-dir", str(data),
                             "--config", str(cfg_file), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    ray_pids: set[int] = set()
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 240, "srmoa serve did not come up"
            time.sleep(0.5)
        ray_pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert ray_pids, "no Ray processes under srmoa serve?"
        r = _srmoa("chat", "Hello!", "--url", url, "--max-tokens", "4", "--no-stream")
        assert r.returncode == 0, r.stderr
        assert "routing:" in r.stderr
        r = _srmoa("chat", "Hello!", "--url", url, "--max-tokens", "4")          # streamed
        assert r.returncode == 0, r.stderr
        r = _srmoa("feedback", "--url", url, "--prompt", "What is the capital of Zorbania?",
                   "--answer", "Paris")
        assert r.returncode == 0, r.stdout + r.stderr
        assert '"status": "done"' in r.stdout
        r = _srmoa("stats", "--url", url)
        assert r.returncode == 0 and '"keystore"' in r.stdout
        r = _srmoa("chat", "Hi", "--url", f"http://127.0.0.1:{free_port()}", timeout=60)   # nobody there
        assert r.returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "stopped" in out
    time.sleep(1.0)
    alive = [p for p in ray_pids
             if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(p).cmdline()[:3] for p in alive]
