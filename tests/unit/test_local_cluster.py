"""The local multi-node cluster's plan (ports, resources, shard homes, mounts) and its process-id
bookkeeping, without Ray: a node is a `setsid` session, and kill_node ends every process of it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from srmoa_dist.runtime.local_cluster import ClusterSpec, LocalCluster, NodeState, session_pids


def test_ports_are_distinct_and_below_the_ephemeral_range(tmp_path):
    spec = ClusterSpec(root=str(tmp_path), workers=2, base_port=26000)
    ports = [spec.base_port]
    for n in range(3):
        p = spec.ports(n)
        ports += [v for k, v in p.items() if k not in ("min_worker", "max_worker")]
        ports += list(range(p["min_worker"], p["max_worker"] + 1))
    assert len(ports) == len(set(ports)) and max(ports) < 32768


def test_resources_pin_shards_to_workers_and_store_to_the_head(tmp_path):
    spec = ClusterSpec(root=str(tmp_path), workers=2, shards=5)
    head, w1, w2 = (spec.resources(n) for n in range(3))
    assert {"srmoa_keystore", "srmoa_store", "srmoa_ingress"} <= set(head) and "srmoa_replica" not in head
    assert spec.shards_of(1) == [0, 2, 4] and spec.shards_of(2) == [1, 3] and spec.shards_of(0) == []
    assert w1["srmoa_shards"] == 3 and {"srmoa_shard_0", "srmoa_shard_2", "srmoa_shard_4"} <= set(w1)
    assert "srmoa_shard_1" in w2 and "srmoa_shard_0" not in w2
    assert w1["srmoa_replica"] == w2["srmoa_replica"] == 1
    assert all(spec.node_of_shard(i) == n for n in (1, 2) for i in spec.shards_of(n))


@pytest.mark.parametrize("bad, match", [({"workers": 0}, "workers"), ({"shards": 1}, "shards"),
                                        ({"base_port": 32500}, "base_port"),
                                        ({"object_store_mb": 10}, "object_store_mb"),
                                        ({"head_cpus": 0.5}, "head_cpus")])
def test_bad_spec_is_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        ClusterSpec(root=str(tmp_path), **bad)


def test_mount_links_each_shard_to_its_node_and_refuses_a_real_dir(tmp_path):
    c = LocalCluster(ClusterSpec(root=str(tmp_path / "c"), workers=2, shards=4))
    data = tmp_path / "store"
    out = c.mount_shards(data)
    for i in range(4):
        link = data / "shards" / f"shard-{i:03d}"
        home = tmp_path / "c" / f"node-{i % 2 + 1}" / "data" / "shards" / f"shard-{i:03d}"
        assert link.is_symlink() and link.resolve() == home.resolve()
        assert out[i] == os.readlink(link)
    assert c.mount_shards(data) == out            # idempotent
    other = tmp_path / "plain"
    (other / "shards" / "shard-000").mkdir(parents=True)
    with pytest.raises(ValueError, match="directory of its own"):
        c.mount_shards(other)


def test_kill_node_ends_every_process_of_its_session(tmp_path):
    # a "node": a session leader whose children make their own process groups (as Ray's workers do)
    script = "set -m; sleep 300 & sleep 300 & wait"
    leader = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(session_pids(leader.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = session_pids(leader.pid)
        assert leader.pid in pids and len(pids) == 3, pids
        assert len({os.getpgid(p) for p in pids}) == 3     # a group each: killpg would miss some
        c = LocalCluster(ClusterSpec(root=str(tmp_path)))
        c.nodes[1] = NodeState(index=1, role="worker", sid=leader.pid)
        assert c.alive(1)
        assert c.kill_node(1) >= 2
        leader.wait(timeout=10)
        assert session_pids(leader.pid) == [] and not c.alive(1)
    finally:
        for pid in session_pids(leader.pid):
            os.kill(pid, 9)
