"""`srmoa bench chaos` for 30 seconds (and on until every kind was killed once) in a subprocess (its
own local Ray cluster, the tiny random Llama): kills of every kind (shard, key store, trainer, model
replica) under chat load and edits, then the invariants on the files. The run is short, so kills come
every 4-8 s; each kind is hit at least once (the kinds are taken in a shuffled cycle, and a run too
short for a whole cycle goes on until it is done: 3 of 4 kinds in 60 s once failed CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def test_chaos_bench_short_run(tmp_path, e2e_tiny_model_dir):
    from e2e_support import own_cluster_config, own_cluster_env

    cfg = own_cluster_config(tmp_path, e2e_tiny_model_dir)
    out = tmp_path / "chaos.json"
    env = own_cluster_env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                          TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "srmoa_dist.cli", "bench", "chaos", "--minutes", "0.5",
                        "--config", str(cfg), "--out", str(out), "--kill-min-s", "4", "--kill-max-s", "8"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    for k in ("kills", "lost_experts", "lost_keys", "orphaned_slots", "replies", "non_json_replies",
              "recovery_s_p50", "recovery_s_p99"):
        assert k in doc, k
    assert doc["kills"] >= 4 and set(doc["kills_by_kind"]) == {"shard", "keystore", "trainer", "replica"}, (
        doc["kill_events"])
    assert doc["not_recovered"] == 0, doc["kill_events"]
    # the 30 s target is the 10-minute bench's; a replica restart here is its constructor (imports, model
    # load: 18-25 s when four test runs share the 2 cores), so the short run only bounds it loosely
    assert doc["recovery_s_p99"] < 60, doc["kill_events"]
    assert doc["lost_experts"] == doc["lost_keys"] == doc["corrupt_experts"] == 0, doc["disk"]
    assert doc["orphaned_slots"] == 0 and doc["in_flight"] == 0, doc["disk"]
    assert doc["non_json_replies"] == 0, doc["non_json_examples"]
    replies = doc["replies"]
    assert replies["no_reply"] == 0 and replies["2xx"] + replies["retried"] > 20, replies
    assert doc["edits"]["posted"] >= 1 and doc["disk"]["ledger_entries"] >= 1, doc["edit_events"]
