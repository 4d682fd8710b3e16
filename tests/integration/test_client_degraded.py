"""ExpertStoreClient.fetch_available on the session Ray cluster: a shard actor that is gone (as on a
lost node) leaves its experts out at once instead of failing the read, and is left alone for a while."""

from __future__ import annotations

import time

import pytest

from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.runtime.client import ExpertStoreClient
from srmoa_dist.runtime.shard_actor import ShardActor

pytestmark = pytest.mark.ray

SHAPES = {"layers.1.mlp": (16, 16)}


def test_fetch_available_skips_an_unreachable_shard(ray_cluster, tmp_path):
    from srmoa_dist.config import StoreConfig

    cfg = StoreConfig(n_shards=2, map_size_mb=16, max_map_size_mb=64)
    hs = [ShardActor.options(num_cpus=0.05, max_restarts=0, max_task_retries=0)
          .remote(str(tmp_path / f"shard-{i:03d}"), cfg, i) for i in range(2)]
    try:
        c = ExpertStoreClient(hs, cache_size=0)
        ids = list(range(12))
        c.put_many({i: LoRAExpert.random(SHAPES, rank=2, alpha=4.0, dtype="float16", seed=i) for i in ids})
        home = dict(zip(ids, c.shard_of(ids).tolist()))
        assert set(home.values()) == {0, 1}
        got, unavailable = c.fetch_available(ids, timeout_s=5)
        assert sorted(got) == ids and unavailable == []

        ray_cluster.kill(hs[1], no_restart=True)
        lost = [i for i in ids if home[i] == 1]
        t0 = time.monotonic()
        got, unavailable = c.fetch_available(ids, timeout_s=5)
        assert sorted(unavailable) == lost and sorted(got) == [i for i in ids if home[i] == 0]
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()                       # marked down: not asked again for DOWN_RETRY_S
        got2, unavailable2 = c.fetch_available(ids, timeout_s=5)
        assert sorted(unavailable2) == lost and sorted(got2) == sorted(got)
        assert time.monotonic() - t0 < 1.0
        from ray.exceptions import RayActorError

        with pytest.raises(RayActorError):           # the strict read still fails loudly
            c.get_many(lost)
    finally:
        for h in hs:
            ray_cluster.kill(h, no_restart=True)
