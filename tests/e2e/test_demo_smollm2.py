"""`srmoa demo` on the real SmolLM2-135M-Instruct, as the README runs it (its own local Ray cluster):
an invented fact taught through feedback; exit 0 only when the edit worked."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_demo_teaches_an_invented_fact(tmp_path, smollm2_cache_dir):
    data = tmp_path / "demo"
    data.mkdir()
    if smollm2_cache_dir.exists():          # the converted GGUF (conversion alone takes ~40 s)
        (data / "model_cache").symlink_to(smollm2_cache_dir, target_is_directory=True)
    from e2e_support import own_cluster_env

    r = subprocess.run([sys.executable, "-m", "srmoa_dist.cli", "demo", "--data-dir", str(data)],
                       capture_output=True, text=True, timeout=900, env=own_cluster_env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "the edit worked" in out
    assert "RIGHT" in out and "UNCHANGED" in out
    assert "relation gate: 1 edited relation(s) mirrored on the model server" in out   # synced after the edit
