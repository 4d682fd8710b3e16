"""Placement of the store actors on the local cluster (which advertises no srmoa_* resources)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from itest_support import small_config

pytestmark = pytest.mark.ray


def test_auto_placement_requests_nothing_the_cluster_lacks(ray_cluster, tmp_path):
    from srmoa_dist.runtime.bootstrap import placement

    cfg = small_config(tmp_path)
    place = placement(cfg)
    assert place["store"] == {} and place["keystore"] == {}
    assert all(place[f"shard_{i}"] == {} for i in range(cfg.store.n_shards))


def test_pinned_placement_waits_then_says_what_is_missing(ray_cluster, tmp_path):
    from srmoa_dist.runtime.bootstrap import placement

    cfg = small_config(tmp_path)
    cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, store_placement="pinned", store_wait_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="srmoa_keystore.*store_placement"):
        placement(cfg)
    assert time.monotonic() - t0 >= 1.0
