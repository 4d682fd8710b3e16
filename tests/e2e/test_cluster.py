"""Several Ray nodes on this machine: `srmoa bench cluster` in a subprocess (its own 3-node cluster on
its own ports and temp dirs, the tiny random Llama), a worker node killed under chat load and started
again on its data directory: requests keep being answered (those needing its shards degraded), its
shards come back on it, and every planted expert reads back byte-identical. The session's own cluster
is untouched (the subprocess drops RAY_ADDRESS; the bench's nodes are stopped by their process ids)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def test_cluster_node_killed_and_restarted_nothing_lost(tmp_path, e2e_tiny_model_dir):
    from e2e_support import own_cluster_config, own_cluster_env

    cfg = own_cluster_config(tmp_path, e2e_tiny_model_dir)
    out = tmp_path / "cluster.json"
    env = own_cluster_env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                          TOKENIZERS_PARALLELISM="false")
    base_port = random.Random().randrange(22000, 28000, 100)
    r = subprocess.run([sys.executable, "-m", "srmoa_dist.cli", "bench", "cluster", "--config", str(cfg),
                        "--out", str(out), "--base-port", str(base_port), "--warm-s", "3", "--outage-s", "6",
                        "--chat-workers", "1", "--experts", "8", "--max-tokens", "4"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads(out.read_text())
    for k in ("nodes", "shards_by_node", "answered", "degraded", "failed", "lost_experts", "recovery_s"):
        assert k in doc, k
    assert [n["role"] for n in doc["nodes"]] == ["head", "worker", "worker"]
    assert doc["shards_by_node"] == {"0": [], "1": [0, 2], "2": [1, 3]}
    before = doc["placement_before_kill"]
    assert before["0"]["keystore"] == 1 and before["0"]["trainer"] == 1 and before["0"]["shard"] == 0, before
    assert before["1"]["shard"] == before["2"]["shard"] == 2, before
    assert before["1"]["replica"] == before["2"]["replica"] == 1, before
    assert doc["recovered"] and doc["recovery_s"] < 120, doc["events"]
    assert doc["lost_experts"] == 0, doc["lost_ids"]
    # during the outage nothing went unanswered; replies that routed to an expert of the lost node came
    # back degraded (or, once it was back, answered), and only those
    assert doc["failed"] == 0, doc["timeline"]
    assert doc["answered"] + doc["degraded"] >= 3, doc["timeline"]
    assert doc["outage_needing_lost_node"].get("degraded", 0) >= 1, doc["outage_needing_lost_node"]
    assert doc["outage_other"].get("degraded", 0) == 0, doc["outage_other"]
    assert doc["placement_end"]["1"]["shard"] == 2, doc["placement_end"]
