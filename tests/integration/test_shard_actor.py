"""ShardActor + ExpertStoreClient on the session Ray cluster (no key store)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from srmoa_dist.experts.codec import encode_expert
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.shard import MissingExpertError
from srmoa_dist.runtime.client import ExpertStoreClient
from srmoa_dist.runtime.shard_actor import ShardActor

pytestmark = pytest.mark.ray

SHAPES = {"layers.1.mlp": (16, 16), "layers.2.mlp": (16, 16)}


def _expert(seed: int) -> LoRAExpert:
    return LoRAExpert.random(SHAPES, rank=2, alpha=4.0, dtype="float16", seed=seed)


@pytest.fixture
def shards(ray_cluster, tmp_path):
    from srmoa_dist.config import StoreConfig

    cfg = StoreConfig(n_shards=2, map_size_mb=16, max_map_size_mb=64)
    hs = [ShardActor.options(num_cpus=0.05, max_restarts=3, max_task_retries=3, max_concurrency=4)
          .remote(str(tmp_path / f"shard-{i:03d}"), cfg, i) for i in range(2)]
    yield hs
    for h in hs:
        ray_cluster.kill(h, no_restart=True)


def test_put_get_versions_rollback_through_client(shards):
    c = ExpertStoreClient(shards, cache_size=8)
    experts = {i: _expert(i) for i in range(10)}
    v = c.put_many(experts)
    assert v == {i: 1 for i in range(10)}
    got = c.get_many([3, 7, 3])
    assert [g.version for g in got] == [1, 1, 1]
    assert got[0].same_weights(experts[3]) and got[1].same_weights(experts[7])
    # both shards hold some of the ids
    assert set(c.shard_of(list(range(10))).tolist()) == {0, 1}
    assert len(c) == 10
    assert c.contains([1, 99]) == [True, False]
    with pytest.raises(MissingExpertError) as ei:
        c.get_many([1, 98, 99])
    assert set(ei.value.ids) == {98, 99}
    # a new version invalidates our cached copy
    assert c.put_many({3: _expert(100)}) == {3: 2}
    assert c.get_many([3])[0].same_weights(_expert(100))
    assert c.versions([3, 4]) == [2, 1]
    assert c.rollback(3) == 1
    back = c.get_many([3])[0]
    assert back.same_weights(experts[3]) and back.version == 1
    c.delete([4])
    assert c.contains([4]) == [False]
    assert c.fetch([4, 5]).keys() == {5}


def test_cache_hits_and_lru(shards):
    c = ExpertStoreClient(shards, cache_size=2)
    c.put_many({i: _expert(i) for i in range(4)})
    c.get_many([0, 1])
    c.get_many([0, 1])
    st = c.cache_stats()
    assert st["hits"] == 2 and st["misses"] == 2 and st["size"] == 2
    c.get_many([2])
    assert c.cache_stats()["size"] == 2


def test_raw_bytes_round_trip_and_restart(ray_cluster, shards):
    c = ExpertStoreClient(shards, cache_size=0)
    e = _expert(5)
    c.put_raw_many({5: encode_expert(e)})
    raw_before = c.get_raw_many([5])[0]
    s = int(c.shard_of([5])[0])
    pid = ray_cluster.get(shards[s].info.remote())["pid"]
    ray_cluster.kill(shards[s], no_restart=False)
    raw_after = c.get_raw_many([5])[0]          # retried across the restart
    assert raw_after == raw_before
    # ray.kill is asynchronous: the read above may have beaten it, so wait for the new process.
    deadline = time.monotonic() + 60
    while ray_cluster.get(shards[s].info.remote())["pid"] == pid:
        assert time.monotonic() < deadline, "the shard actor was not restarted"
        time.sleep(0.2)
    assert c.get_raw_many([5])[0] == raw_before
    assert np.array_equal(c.get_many([5])[0].targets["layers.1.mlp"][0], e.targets["layers.1.mlp"][0])


def test_a_full_shard_actor_says_so_and_keeps_serving(ray_cluster, tmp_path):
    """A shard actor whose LMDB map cannot grow: the client raises ShardFullError itself (its message
    says which setting to raise, not Ray's wrapper naming the actor), nothing of the refused batch is
    stored, and the actor, alive, goes on serving reads."""
    from srmoa_dist.config import StoreConfig
    from srmoa_dist.experts.shard import ShardFullError

    cfg = StoreConfig(n_shards=1, map_size_mb=1, max_map_size_mb=1)
    h = ShardActor.options(num_cpus=0.05, max_restarts=0).remote(str(tmp_path / "shard-000"), cfg, 0)
    big = {"layers.1.mlp": (2048, 2048)}                     # 64 KiB per expert
    c = ExpertStoreClient([h], cache_size=0)
    try:
        n = 0
        with pytest.raises(ShardFullError) as ei:
            while n < 100:
                c.put_many({n: LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=n)})
                n += 1
        assert type(ei.value) is ShardFullError and "raise store.max_map_size_mb" in str(ei.value)
        assert "nothing of this batch was written" in str(ei.value) and "ray::" not in str(ei.value)
        assert 0 < n < 100 and len(c) == n and c.contains([n]) == [False]
        assert [e.version for e in c.get_many(list(range(n)))] == [1] * n     # serving goes on
    finally:
        ray_cluster.kill(h, no_restart=True)


def test_a_batch_over_shards_is_undone_when_one_is_full(ray_cluster, tmp_path):
    """Shard 0 full, shard 1 not: a batch over both is refused whole; shard 1's part is put back
    (a new id absent again, an existing one at its old version and weights)."""
    from srmoa_dist.config import StoreConfig
    from srmoa_dist.experts.shard import ShardFullError

    tight = StoreConfig(n_shards=2, map_size_mb=1, max_map_size_mb=1)
    roomy = StoreConfig(n_shards=2)
    hs = [ShardActor.options(num_cpus=0.05, max_restarts=0).remote(str(tmp_path / f"shard-{i:03d}"), cfg, i)
          for i, cfg in enumerate((tight, roomy))]
    big = {"layers.1.mlp": (2048, 2048)}                     # 64 KiB per expert
    c = ExpertStoreClient(hs, cache_size=0)
    try:
        ids = list(range(400))
        on0 = [i for i in ids if c.shard_of([i])[0] == 0]
        on1 = [i for i in ids if c.shard_of([i])[0] == 1]
        kept = on1[0]
        c.put_many({kept: LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=1)})
        before = c.get_many([kept])[0]
        with pytest.raises(ShardFullError):
            for n, i in enumerate(on0):                      # fill shard 0 in batches with shard 1
                c.put_many({i: LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=i),
                            kept: LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=1000 + n),
                            on1[n + 1]: LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=i)})
        refused = n
        assert 0 < refused < len(on0)
        assert c.contains([on1[refused + 1]]) == [False]     # its new id is gone again
        after = c.get_many([kept])[0]
        assert after.version == before.version + refused      # the refused batch's version undone
        last_ok = LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=1000 + refused - 1)
        np.testing.assert_array_equal(after.targets["layers.1.mlp"][0], last_ok.targets["layers.1.mlp"][0])
    finally:
        for h in hs:
            ray_cluster.kill(h, no_restart=True)
