"""KeyStoreActor: batched search, background consolidation, snapshots, restart recovery, and the
cache-invalidation log that ExpertStoreClient follows."""

from __future__ import annotations

import time

import numpy as np
import pytest
from itest_support import small_config

from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.runtime.client import ExpertStoreClient

pytestmark = pytest.mark.ray


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _wait(pred, timeout: float = 20.0, every: float = 0.1):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_search_consolidate_in_background_and_recover(ray_cluster, store_runtime):
    ks = store_runtime.keystore
    rng = np.random.default_rng(0)
    keys = _unit(rng.standard_normal((8, 16)))
    ids = np.asarray(ray_cluster.get(ks.add.remote(keys)))
    assert ids.tolist() == list(range(8))
    D, I, inc, entries, epoch = ray_cluster.get(ks.search.remote(keys[:3], 2, 0.5, None, 0))
    assert I[:, 0].tolist() == [0, 1, 2] and np.allclose(D[:, 0], 1.0, atol=1e-5)
    assert isinstance(inc, str) and entries == []

    # activations go in without waiting; the background loop consolidates them (query pull moves key 0)
    q = _unit(keys[0] + 0.5 * _unit(rng.standard_normal(16)))
    before = ray_cluster.get(ks.get.remote([0]))[0]
    for _ in range(5):
        ks.record.remote(q[None], np.array([[0, -1]]), np.array([[1.0, 0.0]], np.float32))
    _wait(lambda: ray_cluster.get(ks.stats.remote())["consolidated_activations"] >= 5)
    after = ray_cluster.get(ks.get.remote([0]))[0]
    assert not np.allclose(after, before)
    assert float(after @ q) > float(before @ q)          # pulled toward the query

    # committed keys survive a crash: snapshot + WAL replayed by the restarted actor
    ray_cluster.get(ks.pin.remote([3], True))
    ray_cluster.get(ks.update.remote([5], _unit(rng.standard_normal((1, 16)))))
    ray_cluster.get(ks.flush.remote())
    truth = ray_cluster.get(ks.get.remote(list(range(8))))
    pid = ray_cluster.get(ks.info.remote())["pid"]
    ray_cluster.kill(ks, no_restart=False)
    info = _wait(lambda: _info_if_new(ray_cluster, ks, pid), timeout=60)
    assert info["keys"] == 8 and info["incarnation"] != inc
    assert np.array_equal(ray_cluster.get(ks.get.remote(list(range(8)))), truth)
    assert bool(ray_cluster.get(ks.call.remote("is_pinned", [3]))[0])


def _info_if_new(ray, ks, pid):
    try:
        info = ray.get(ks.info.remote(), timeout=5)
    except Exception:
        return None
    return info if info["pid"] != pid else None


def test_stats_and_key_info(ray_cluster, store_runtime):
    ks = store_runtime.keystore
    ray_cluster.get(ks.add.remote(_unit(np.ones((2, 16)))))
    st = ray_cluster.get(ks.stats.remote())
    assert st["n_active"] == 2 and "energy" in st and "usage_hist" in st
    info = ray_cluster.get(ks.key_info.remote([0, 1, 7]))
    assert info[0]["norm"] == pytest.approx(1.0, abs=1e-5) and info[2] is None


def test_cache_invalidation_across_clients(ray_cluster, store_runtime):
    rt = store_runtime
    shapes = {"layers.2.mlp": (16, 16)}
    ks = rt.keystore
    [eid] = ray_cluster.get(ks.add.remote(_unit(np.ones((1, 16)))))
    writer = ExpertStoreClient(rt.shards, keystore=ks)
    reader = ExpertStoreClient(rt.shards, keystore=ks)      # a serving replica's client
    e1 = LoRAExpert.random(shapes, 2, 4.0, "float16", seed=1)
    e2 = LoRAExpert.random(shapes, 2, 4.0, "float16", seed=2)
    writer.put_many({int(eid): e1})
    assert reader.get_many([eid])[0].same_weights(e1)
    assert reader.get_many([eid])[0].same_weights(e1)       # cached now
    assert reader.cache_stats()["hits"] == 1
    writer.put_many({int(eid): e2})                          # an edit commits elsewhere
    assert reader.get_many([eid])[0].same_weights(e1)       # not seen yet: stale cache
    # a replica sees the invalidation in the reply of its next search
    D, I, inc, entries, _ = ray_cluster.get(ks.search.remote(_unit(np.ones((1, 16))), 1, None,
                                                          reader.incarnation, reader.seen_seq))
    reader.apply_invalidations(inc, entries)
    got = reader.get_many([eid])[0]
    assert got.same_weights(e2) and got.version == 2
    writer.rollback(int(eid))
    reader.refresh()
    assert reader.get_many([eid])[0].same_weights(e1)


def test_late_activation_of_a_reused_slot_is_dropped(ray_cluster, store_runtime):
    ks = store_runtime.keystore
    rng = np.random.default_rng(3)
    keys = _unit(rng.standard_normal((2, 16)))
    ray_cluster.get(ks.add.remote(keys))
    q = _unit(keys[1] + 0.5 * _unit(rng.standard_normal(16)))
    *_, inc, _, epoch = ray_cluster.get(ks.search.remote(q[None], 2, -1.0, None, 0))
    # slot 1 is freed and reused by another expert before the activation routed to it arrives
    ray_cluster.get(ks.free.remote([1]))
    new_key = _unit(rng.standard_normal((1, 16)))
    assert ray_cluster.get(ks.add.remote(new_key)).tolist() == [1]
    one = (q[None], np.array([[1, -1]]), np.array([[1.0, 0.0]], np.float32))
    # (waited for: calls to a threaded actor may run out of order, and flush must come after)
    ray_cluster.get(ks.record.remote(*one, inc, epoch))                      # routed before the reuse
    ray_cluster.get(ks.record.remote(*one, "an-earlier-incarnation", 10**9))  # by a previous actor
    ray_cluster.get(ks.flush.remote())
    kept = ray_cluster.get(ks.get.remote([1]))[0]
    assert float(_unit(kept) @ new_key[0]) == pytest.approx(1.0, abs=1e-6)   # decayed, not pulled
    st = ray_cluster.get(ks.stats.remote())
    assert st["stale_activations"] == 2

    # routed after the reuse: it pulls the new owner's key as usual
    *_, inc, _, epoch = ray_cluster.get(ks.search.remote(q[None], 2, -1.0, None, 0))
    ray_cluster.get(ks.record.remote(*one, inc, epoch))
    ray_cluster.get(ks.flush.remote())
    after = ray_cluster.get(ks.get.remote([1]))[0]
    assert float(_unit(after) @ q) > float(new_key[0] @ q) + 1e-3                # pulled toward q
    assert ray_cluster.get(ks.stats.remote())["stale_activations"] == 2

    # the generic `call` path (the trainer's KeyStore proxy) marks slot lifecycles too
    ray_cluster.get(ks.call.remote("free", [1]))
    *_, later = ray_cluster.get(ks.search.remote(q[None], 2, -1.0, None, 0))
    assert later == epoch + 1


def test_free_is_idempotent_and_add_is_not_retried(ray_cluster, store_runtime):
    ks = store_runtime.keystore
    rng = np.random.default_rng(5)
    ray_cluster.get(ks.add.remote(_unit(rng.standard_normal((3, 16)))))
    ray_cluster.get(ks.free.remote([1]))
    *_, epoch = ray_cluster.get(ks.search.remote(_unit(np.ones((1, 16))), 1, None, None, 0))
    ray_cluster.get(ks.free.remote([1]))                   # a retried free: no KeyError, nothing changes
    ray_cluster.get(ks.free.remote([1, 2, 2]))             # frees 2, skips 1
    *_, later = ray_cluster.get(ks.search.remote(_unit(np.ones((1, 16))), 1, None, None, 0))
    assert later == epoch + 1                              # one lifecycle event: slot 2's free
    assert ray_cluster.get(ks.size.remote()) == 1
    assert ray_cluster.get(ks.key_info.remote([0, 1, 2]))[1:] == [None, None]
    with pytest.raises(ray_cluster.exceptions.RayTaskError, match="must be >= 0"):
        ray_cluster.get(ks.free.remote([-1]))
    # Ray never resubmits an add to a restarted actor (it could take a second slot); reads still retry
    assert ks.add._max_task_retries == 0
    assert ks.search._max_task_retries == store_runtime.cfg.runtime.max_task_retries > 0


def test_add_with_a_request_id_answers_a_repeat_with_the_same_slots(ray_cluster, store_runtime):
    ks = store_runtime.keystore
    rng = np.random.default_rng(6)
    keys = _unit(rng.standard_normal((2, 16)))
    first = ray_cluster.get(ks.add.remote(keys, False, "req-1"))
    again = ray_cluster.get(ks.add.remote(keys, False, "req-1"))      # the caller resubmits
    assert again.tolist() == first.tolist() == [0, 1]
    assert ray_cluster.get(ks.size.remote()) == 2
    other = ray_cluster.get(ks.add.remote(keys[:1], True, "req-2"))
    assert other.tolist() == [2] and ray_cluster.get(ks.size.remote()) == 3
    with pytest.raises(ray_cluster.exceptions.RayTaskError, match="new request id"):
        ray_cluster.get(ks.add.remote(keys, False, "req-2"))           # same id, another request
    assert ray_cluster.get(ks.add.remote(keys[:1])).tolist() == [3]    # no id: a plain add


def test_a_client_behind_the_invalidation_log_drops_its_whole_cache(ray_cluster, tmp_path):
    from srmoa_dist.runtime.bootstrap import ensure_actors

    rt = ensure_actors(small_config(tmp_path / "data", runtime={"invalidation_log": 4}), trainer=False)
    try:
        ks = rt.keystore
        shapes = {"layers.2.mlp": (16, 16)}
        ray_cluster.get(ks.add.remote(_unit(np.ones((3, 16)))))
        writer = ExpertStoreClient(rt.shards, keystore=ks)
        reader = ExpertStoreClient(rt.shards, keystore=ks)
        old = {i: LoRAExpert.random(shapes, 2, 4.0, "float16", seed=i) for i in range(3)}
        writer.put_many(old)                                      # seqs 1..3
        reader.refresh()
        assert all(e.same_weights(old[i]) for i, e in enumerate(reader.get_many([0, 1, 2])))   # cached
        new0 = LoRAExpert.random(shapes, 2, 4.0, "float16", seed=10)
        writer.put_many({0: new0})                                # seq 4: the one that matters
        for _ in range(4):
            writer.put_many({2: old[2]})                          # seqs 5..8: seq 4 falls out of the log
        inc, entries = ray_cluster.get(ks.invalidations_since.remote(reader.incarnation, reader.seen_seq))
        assert reader.seen_seq == 3 and [s for s, _, _ in entries] == [5, 6, 7, 8]   # the gap: 4 is missing
        reader.apply_invalidations(inc, entries)
        assert reader.cache_stats()["size"] == 0 and reader.cache_stats()["invalidation_gaps"] == 1
        assert reader.seen_seq == 8
        assert reader.get_many([0])[0].same_weights(new0)        # not the stale cached copy
        # caught up: the next invalidation is applied one by one again
        reader.get_many([1])
        writer.put_many({2: old[2]})
        reader.refresh()
        assert reader.cache_stats()["invalidation_gaps"] == 1 and reader.cache_stats()["size"] == 2
    finally:
        rt.kill_actors()


def test_the_edited_relation_mirror_syncs_through_the_actors(ray_cluster, store_runtime):
    """`EditedRelations.sync` over Ray as a replica runs it: the pinned slots and key versions from the
    key-store actor (the proxy's generic `call`), the relations from the shard actors' record headers."""
    from srmoa_dist.experts.expert import ExpertRelation, LoRAExpert
    from srmoa_dist.routing.relation_bank import EditedRelations
    from srmoa_dist.runtime.keystore_proxy import KeyStoreProxy

    ks, client = store_runtime.keystore, store_runtime.client()
    ids = ray_cluster.get(ks.add.remote(_unit(np.ones((3, 16))), True)).tolist()
    rel = ExpertRelation("Zorblax", np.eye(6, dtype=np.float32)[:2])
    e = LoRAExpert.random({"layers.1.mlp": (8, 8)}, rank=2, alpha=4.0, seed=1)
    client.put_many({ids[0]: e.with_relation(rel), ids[1]: e})           # ids[2]: pinned, no record yet
    proxy = KeyStoreProxy(ks, store_runtime.cfg.keystore)
    got_ids, versions, namespaces = proxy.pinned_versions()
    assert got_ids.tolist() == ids and len(versions) == 3 and namespaces == ["default"] * 3
    assert [r is None for r in client.relations(ids)] == [False, True, True]
    bank = EditedRelations()
    assert bank.sync(proxy, client) == 3 and bank.stats()["rows"] == 2
    ray_cluster.get(ks.pin.remote([ids[0]], False))
    assert bank.sync(proxy, client) == 1 and len(bank) == 0
