import json

import numpy as np
import pytest

from srmoa_dist.config import StoreConfig
from srmoa_dist.experts.codec import encode_expert
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.placement import shard_of
from srmoa_dist.experts.shard import ExpertShard, MissingExpertError, ShardFullError
from srmoa_dist.experts.store import META_FILE, ShardedExpertStore

CFG = StoreConfig(n_shards=4, map_size_mb=4)


def ex(seed: int) -> LoRAExpert:
    return LoRAExpert.random({"layers.9.mlp": (16, 16)}, rank=2, alpha=4.0, dtype="float16", seed=seed)


@pytest.fixture
def store(tmp_path):
    s = ShardedExpertStore(tmp_path / "shards", CFG)
    yield s
    s.close()


def test_layout_and_meta(store, tmp_path):
    root = tmp_path / "shards"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["shard-000", "shard-001", "shard-002", "shard-003", META_FILE]
    assert json.loads((root / META_FILE).read_text())["n_shards"] == 4


def test_order_preserved_across_shards(store):
    ids = list(range(100))
    store.put_many({i: ex(i) for i in ids})
    query = [57, 3, 99, 3, 12, 0, 41]
    assert len({int(s) for s in shard_of(query, 4)}) > 1
    got = store.get_many(query)
    assert [g.same_weights(ex(i)) for g, i in zip(got, query, strict=True)] == [True] * len(query)
    raw = store.get_raw_many(query)
    assert raw[1] == raw[3] and raw[0] == store.shard_for(57).get_raw_many([57])[0]
    assert store.versions(query) == [1] * len(query)
    assert store.contains([5, 500]) == [True, False]
    assert len(store) == 100


def test_grouped_per_shard(store, monkeypatch):
    ids = list(range(64))
    store.put_many({i: ex(i) for i in ids})
    where = shard_of(ids, 4)
    for k, s in enumerate(store.shards):  # every id lives in the shard placement names, only there
        assert len(s) == int((where == k).sum())
        assert all(s.contains([i for i in ids if where[i] == k]))
    calls = []
    for s in store.shards:
        orig = s.get_many

        def spy(sub, _orig=orig, _s=s):
            calls.append((_s.path.name, list(sub)))
            return _orig(sub)

        monkeypatch.setattr(s, "get_many", spy)
    query = [9, 1, 33, 2, 17, 60, 5, 40]
    store.get_many(query)
    assert len(calls) == len({int(w) for w in shard_of(query, 4)})  # one call (one transaction) per shard
    for name, sub in calls:
        k = int(name.split("-")[1])
        assert sub == [i for i in query if where[i] == k]  # caller order kept inside each group


def test_missing_reported_across_shards(store):
    store.put_many({i: ex(i) for i in range(10)})
    with pytest.raises(MissingExpertError) as ei:
        store.get_many([1, 500, 2, 11, 500, 3])
    assert ei.value.ids == [500, 11]


def test_versions_rollback_delete(store):
    store.put_many({1: ex(1), 2: ex(2)})
    assert store.put_many({1: ex(5), 3: ex(3)}) == {1: 2, 3: 1}
    assert store.rollback(1) == 1
    assert store.get_many([1])[0].same_weights(ex(1))
    assert store.delete([1, 2, 77]) == 2
    assert store.contains([1, 2, 3]) == [False, False, True]


def test_raw_round_trip(store):
    v = store.put_raw_many({i: encode_expert(ex(i)) for i in range(20)})
    assert v == {i: 1 for i in range(20)}
    assert store.get_many([19])[0].same_weights(ex(19))


def test_stats(store):
    store.put_many({i: ex(i) for i in range(30)})
    st = store.stats()
    assert st["entries"] == 30 and st["n_shards"] == 4 and len(st["shards"]) == 4
    assert sum(s["entries"] for s in st["shards"]) == 30


def test_refuses_other_shard_count(tmp_path):
    root = tmp_path / "shards"
    with ShardedExpertStore(root, CFG) as s:
        s.put_many({1: ex(1)})
    with pytest.raises(ValueError, match=r"has 4 shards but store.n_shards is 2.*migration"):
        ShardedExpertStore(root, StoreConfig(n_shards=2, map_size_mb=4))
    with ShardedExpertStore(root, CFG) as s:  # durable reopen
        assert s.get_many([1])[0].same_weights(ex(1))
    with ShardedExpertStore(root, CFG, readonly=True) as s:
        assert len(s) == 1


def test_refuses_unrecorded_shard_dirs(tmp_path):
    root = tmp_path / "shards"
    ExpertShard(root / "shard-000", CFG).close()
    with pytest.raises(ValueError, match="refusing to guess"):
        ShardedExpertStore(root, CFG)


def test_single_shard_store(tmp_path):
    with ShardedExpertStore(tmp_path / "one", StoreConfig(n_shards=1, map_size_mb=4)) as s:
        s.put_many({i: ex(i) for i in range(5)})
        got = s.get_many([4, 0])
        assert got[0].same_weights(ex(4)) and got[1].same_weights(ex(0))
        assert s.get_many([]) == []


def test_invalid_ids(store):
    with pytest.raises(ValueError, match="-1"):
        store.get_many([1, -1])
    with pytest.raises(ValueError):
        store.get_many(np.array([2**63], dtype=np.uint64).tolist())


def test_a_full_shard_undoes_the_whole_batch_across_shards(tmp_path):
    cfg = StoreConfig(n_shards=2, map_size_mb=1, max_map_size_mb=1)
    big = {"layers.1.mlp": (2048, 2048)}                      # 64 KiB per expert
    mk = lambda i: LoRAExpert.random(big, rank=4, alpha=8.0, dtype="float32", seed=i)  # noqa: E731
    ids = np.arange(400)
    on = {k: [int(i) for i in ids[shard_of(ids, 2) == k]] for k in (0, 1)}
    with ShardedExpertStore(tmp_path / "s", cfg) as st:
        st.put_many({on[0][0]: mk(1)})                        # shard 0: one expert, version 1
        full = []
        for i in on[1]:                                       # fill shard 1 until it refuses
            try:
                st.put_many({i: mk(i)})
            except ShardFullError:
                break
            full.append(i)
        before = [s.snapshot(st.shards[k].ids()) for k, s in enumerate(st.shards)]
        batch = {on[0][0]: mk(2), on[0][1]: mk(3), on[1][len(full)]: mk(4)}   # shard 0 first, then 1
        with pytest.raises(ShardFullError, match="nothing of this batch was written"):
            st.put_many(batch)
        after = [s.snapshot(st.shards[k].ids()) for k, s in enumerate(st.shards)]
        assert after == before                                # shard 0's write was undone exactly
        assert st.versions([on[0][0]]) == [1] and on[0][1] not in st.shards[0]
