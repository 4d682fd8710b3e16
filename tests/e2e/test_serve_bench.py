"""`bench/serve_bench.py` end to end at a tiny size: its own local Ray cluster and app (a tiny random
Llama), routed, base and mixed-sampling load at two concurrency levels, and a JSON whose derived
figures agree with its raw ones. It runs in a subprocess because it starts (and stops) a Ray
cluster of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

SCRIPT = """
import json, sys
from pathlib import Path
from srmoa_dist.bench.serve_bench import run_serve_bench
from srmoa_dist.config import SrmoaConfig

cfg = SrmoaConfig.load_yaml(sys.argv[1])
d = cfg.to_dict()
overrides = {k: d[k] for k in ("model", "ttt", "serve", "expert", "keystore", "runtime", "store")}
run_serve_bench(Path(sys.argv[2]), model=cfg.model.name_or_path, concurrency=(1, 2), requests=2,
                max_tokens=2, data_dir=Path(sys.argv[3]), train=False, overrides=overrides, mixed=True)
"""


def test_serve_bench_writes_consistent_json(tmp_path, e2e_tiny_model_dir):
    from e2e_support import own_cluster_config, own_cluster_env

    cfg_file = own_cluster_config(tmp_path, e2e_tiny_model_dir)
    out = tmp_path / "bench_serve.json"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(cfg_file), str(out),
                        str(tmp_path / "data")], capture_output=True, text=True, timeout=600,
                       env=own_cluster_env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2]
    for lv in doc["levels"]:
        base, routed = lv["base"], lv["routed"]
        assert base["errors"] == 0 and routed["errors"] == 0
        assert routed["routed_share"] == 1.0 and base["routed_share"] == 0.0
        assert lv["overhead_p50"] == pytest.approx(routed["p50_ms"] / base["p50_ms"] - 1)
        assert lv["overhead_rps"] == pytest.approx(base["rps"] / routed["rps"] - 1)
        mixed = lv["mixed"]                                  # per-request sampling parameters, all routed
        assert mixed["errors"] == 0 and mixed["routed_share"] == 1.0 and mixed["requests"] == lv["requests"]
        assert lv["mixed_vs_routed_rps"] == pytest.approx(mixed["rps"] / routed["rps"] - 1)
        assert doc["summary"]["rps_mixed"][str(lv["concurrency"])] == round(mixed["rps"], 3)
        assert doc["summary"]["overhead_mean_by_concurrency"][str(lv["concurrency"])] == pytest.approx(
            routed["mean_ms"] / base["mean_ms"] - 1, abs=1e-4)
    assert "during_edit" not in doc
