"""`srmoa bench serve --store-experts` (bench/scale_serve.py) end to end at tiny sizes: a store of real
seed experts per size (the tiny random Llama), routed vs base chat, the key-store actor killed with -9
and serving routed again; the JSON the README's scale figures come from. A subprocess: it starts (and
stops) a local Ray cluster of its own per size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

SCRIPT = """
import sys
from pathlib import Path
from srmoa_dist.bench.scale_serve import run_scale_serve_bench
from srmoa_dist.config import SrmoaConfig

cfg = SrmoaConfig.load_yaml(sys.argv[1])
d = cfg.to_dict()
overrides = {k: d[k] for k in ("model", "ttt", "serve", "expert", "keystore", "runtime")}
run_scale_serve_bench(Path(sys.argv[2]), (200, 50), work_dir=Path(sys.argv[3]), overrides=overrides,
                      model=cfg.model.name_or_path, requests=3, burst=2, max_tokens=2, shared_ray=True,
                      say=print)
"""


def test_scale_serve_bench_tiny(tmp_path, e2e_tiny_model_dir):
    from e2e_support import own_cluster_config, own_cluster_env

    cfg_file = own_cluster_config(tmp_path, e2e_tiny_model_dir)
    out = tmp_path / "scale.json"
    work = tmp_path / "stores"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(cfg_file), str(out), str(work)],
                       capture_output=True, text=True, timeout=600, env=own_cluster_env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert [s["experts"] for s in doc["sizes"]] == [50, 200]
    for s in doc["sizes"]:
        assert s["keys"] == s["experts"] == s["init_added"]
        assert s["latency_errors"] == 0 and s["routed_share"] == 1.0 and s["experts_per_request"] >= 1
        for k in ("routed_p50_ms", "routed_p99_ms", "base_p50_ms", "routed_rps", "base_rps"):
            assert s[k] > 0
        assert s["routed_p99_ms"] >= s["routed_p50_ms"]
        assert s["keystore_rss_mb"] > 0 and s["model_server_rss_mb"] > 0
        assert 0 < s["keystore_restart_s"] < 120               # killed -9, then routed again
        assert 0 <= s["cache_hit_rate"] <= 1
    t = doc["targets"]
    assert t["routed_p50_ratio_largest_vs_smallest"] == pytest.approx(
        doc["sizes"][1]["routed_p50_ms"] / doc["sizes"][0]["routed_p50_ms"])
    assert not list(work.glob("store-*"))                      # stores deleted unless kept
