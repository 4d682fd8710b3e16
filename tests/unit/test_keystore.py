"""KeyStore: search (exact vs brute force, IVF recall), add/update/free/pin, deferral, consolidation."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from srmoa_dist.config import GravityConfig, KeyStoreConfig
from srmoa_dist.routing.gravity import Activations
from srmoa_dist.routing.keystore import ConsolidationStats, KeyStore

D = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator, n_clusters: int = 100, noise: float = 0.6) -> np.ndarray:
    centres = unit(rng.standard_normal((n_clusters, D)))
    return unit(centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, D)) / np.sqrt(D))


def store(**kw) -> KeyStore:
    g = kw.pop("gravity", None)
    return KeyStore(KeyStoreConfig(d_key=D, **kw), g)


def test_exact_search_equals_brute_force():
    rng = np.random.default_rng(0)
    ks = store(index="exact")
    x = unit(rng.standard_normal((3000, D))) * rng.uniform(0.3, 1.0, (3000, 1)).astype(np.float32)
    ids = ks.add(x)
    assert ids.tolist() == list(range(3000)) and len(ks) == 3000 and ks.index_kind == "exact"
    q = unit(rng.standard_normal((50, D)))
    Dk, Ik = ks.search(q, 10, tau=-np.inf)
    Df, If = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert np.array_equal(Ik, If)
    np.testing.assert_allclose(Dk, Df, rtol=1e-5, atol=1e-6)
    scores = q @ x.T                                                   # numpy brute force
    np.testing.assert_allclose(Dk, -np.sort(-scores, axis=1)[:, :10], rtol=1e-5, atol=1e-6)
    assert Dk.dtype == np.float32 and Ik.dtype == np.int64 and Dk.shape == (50, 10)


def test_ivf_recall_against_exact():
    rng = np.random.default_rng(1)
    x = clustered(20_000, rng)
    ks = store(index="ivf", nprobe=16)
    ks.add(x)
    st = ks.stats()
    assert st["index"] == "ivf" and st["nlist"] == 566                # ~4 sqrt(N)
    q = clustered(300, rng)
    _, I = ks.search(q, 8, tau=-np.inf)
    _, G = faiss.knn(q, x, 8, metric=faiss.METRIC_INNER_PRODUCT)
    recall = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(I, G)])
    assert recall >= 0.9, recall
    _, I1 = ks.search(q, 8, tau=-np.inf, nprobe=1)
    recall1 = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(I1, G)])
    assert recall1 < recall                                             # nprobe is honoured


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_update_moves_key_to_its_new_place(kind):
    rng = np.random.default_rng(2)
    ks = store(index=kind, nlist=16, nprobe=16)
    x = clustered(2000, rng)
    ks.add(x)
    assert ks.index_kind == kind
    target = unit(rng.standard_normal((1, D)))
    old = x[5:6].copy()
    v0 = ks.versions([5])[0]
    ks.update([5], target)
    assert ks.versions([5])[0] == v0 + 1
    np.testing.assert_array_equal(ks.get([5]), target)
    D_, I = ks.search(target, 1, tau=-np.inf)
    assert I[0, 0] == 5 and D_[0, 0] == pytest.approx(1.0, abs=1e-5)
    _, I = ks.search(old, 10, tau=-np.inf)
    assert 5 not in I[0]


def test_free_and_reuse_slots():
    rng = np.random.default_rng(3)
    ks = store(index="exact")
    x = unit(rng.standard_normal((100, D)))
    ks.add(x)
    v = ks.versions([10, 20, 30])
    ks.free([30, 10, 20])
    assert len(ks) == 97 and ks.stats()["n_free"] == 3
    _, I = ks.search(x[[10, 20, 30]], 100, tau=-np.inf)
    assert not np.isin(I, [10, 20, 30]).any() and (I[:, -3:] == -1).all()   # only 97 keys left
    with pytest.raises(KeyError, match="free"):
        ks.get([10])
    with pytest.raises(KeyError, match="free"):
        ks.update([10], x[:1])
    new = ks.add(unit(rng.standard_normal((5, D))))
    assert new.tolist() == [10, 20, 30, 100, 101]                          # freed slots first
    assert (ks.versions([10, 20, 30]) == v + 2).all()
    assert len(ks) == 102


def test_tau_deferral_and_missing_results():
    ks = store(index="exact", tau=0.6)
    e = np.eye(D, dtype=np.float32)
    ks.add(e[:2])
    q = unit(e[0:1] + 0.5 * e[1:2])                                        # scores 0.894, 0.447
    D_, I = ks.search(q, 4)
    assert I[0].tolist() == [0, -1, -1, -1]
    np.testing.assert_allclose(D_[0, :2], [0.894427, 0.447214], rtol=1e-5)
    assert np.isneginf(D_[0, 2:]).all()                                    # fewer than k keys
    _, I = ks.search(q, 4, tau=-np.inf)
    assert I[0].tolist() == [0, 1, -1, -1]
    _, I = ks.search(q, 4, tau=0.95)
    assert I[0].tolist() == [-1, -1, -1, -1]
    D_, I = store().search(q)                                              # empty store, default k
    assert I.shape == (1, 8) and (I == -1).all()


def test_validation_names_the_field():
    ks = store()
    with pytest.raises(ValueError, match="xq"):
        ks.search(np.ones(D, np.float32))
    with pytest.raises(ValueError, match="xq"):
        ks.search(np.ones((2, D + 1), np.float32))
    with pytest.raises(ValueError, match="xq"):
        ks.search(np.ones((2, D), np.int64))
    with pytest.raises(ValueError, match="k must"):
        ks.search(np.ones((2, D), np.float32), 0)
    with pytest.raises(ValueError, match="keys"):
        ks.add(np.ones((2, D + 1), np.float32))
    with pytest.raises(ValueError, match="finite"):
        ks.add(np.full((1, D), np.inf, np.float32))
    ks.add(np.ones((2, D), np.float32))
    np.testing.assert_allclose(np.linalg.norm(ks.get([0, 1]), axis=1), 1.0, rtol=1e-6)  # clamped
    with pytest.raises(KeyError, match="no such"):
        ks.update([5], np.ones((1, D), np.float32))
    with pytest.raises(ValueError, match="repeat"):
        ks.update([0, 0], np.ones((2, D), np.float32))
    with pytest.raises(ValueError, match="rows"):
        ks.update([0, 1], np.ones((1, D), np.float32))
    with pytest.raises(TypeError):
        ks.consolidate("not activations")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_key"):
        ks.consolidate(Activations(np.ones((1, D + 1)), np.zeros((1, 1), np.int64), np.ones((1, 1))))


def test_consolidate_pulls_decays_and_frees():
    g = GravityConfig(alpha=0.5, beta=0.0, delta=0.3, theta=0.5, usage_ema=0.5, min_norm=0.2)
    ks = store(index="exact", gravity=g)
    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((6, D)))
    ks.add(x[:4])
    ks.add(x[4:], pinned=True)
    q = unit(x[0:1] + x[1:2])
    st = ks.consolidate(Activations(q, np.array([[0]]), np.ones((1, 1))))
    assert isinstance(st, ConsolidationStats) and st.step == 1 and st.n_moved == 1
    assert st.n_decayed == 3                                               # 1..3 decay; pinned 4, 5 do not
    assert np.linalg.norm(ks.get([0]) - q) < np.linalg.norm(x[0] - q)      # pulled toward its query
    np.testing.assert_allclose(np.linalg.norm(ks.get([1, 2, 3]), axis=1), 0.7, rtol=1e-5)
    assert ks.usage([0])[0] == pytest.approx(0.5)
    for _ in range(5):
        st = ks.consolidate(Activations(q, np.array([[0]]), np.ones((1, 1))))
    assert len(ks) == 3 and ks.active_ids().tolist() == [0, 4, 5]          # 0.7**5 < 0.2: freed
    np.testing.assert_array_equal(ks.get([4, 5]), x[4:])                   # pinned: untouched
    _, I = ks.search(x[1:4], 6, tau=-np.inf)
    assert not np.isin(I, [1, 2, 3]).any()
    assert ks.add(x[1:2]).tolist() == [1]                                  # reuse


def test_consolidate_is_o_batch_with_sweep_window():
    g = GravityConfig(sweep_batches=4, sweep_min=10, delta=0.1)
    ks = store(index="exact", gravity=g)
    ks.add(unit(np.random.default_rng(5).standard_normal((100, D))))
    empty = Activations(np.zeros((0, D)), np.zeros((0, 1), np.int64), np.zeros((0, 1)))
    seen = []
    for _ in range(4):
        seen.append(ks.consolidate(empty).n_decayed)
    assert seen == [25, 25, 25, 25]                                        # ceil(100 / 4) per batch
    norms = np.linalg.norm(ks.get(ks.active_ids()), axis=1)
    np.testing.assert_allclose(norms[:25], 0.9 ** 1, rtol=1e-5)            # visited at batch 1
    np.testing.assert_allclose(norms[75:], 0.9 ** 4, rtol=1e-5)            # visited at 4, 4 batches' worth


def test_pin_unpin_and_stats():
    g = GravityConfig(delta=0.5, theta=1.0, min_norm=0.0, sweep_min=1, sweep_batches=100)
    ks = store(index="exact", gravity=g)
    x = unit(np.random.default_rng(6).standard_normal((4, D)))
    ks.add(x)
    empty = Activations(np.zeros((0, D)), np.zeros((0, 1), np.int64), np.zeros((0, 1)))
    ks.consolidate(empty)
    ks.consolidate(empty)                       # 2 batches of pending decay on every key
    ks.pin([3])                                 # pin applies the pending decay first
    np.testing.assert_allclose(np.linalg.norm(ks.get([3])), 0.25, rtol=1e-5)
    assert ks.is_pinned([3]).tolist() == [True]
    for _ in range(4):
        ks.consolidate(empty)
    np.testing.assert_allclose(np.linalg.norm(ks.get([3])), 0.25, rtol=1e-5)
    ks.unpin([3])
    assert ks.is_pinned([3]).tolist() == [False]
    st = ks.stats()
    for key in ("n_active", "n_free", "n_pinned", "capacity", "index", "nlist", "drift", "energy",
                "usage_hist"):
        assert key in st
    assert st["n_active"] == 4 and st["n_pinned"] == 0 and st["capacity"] >= 4
    assert sum(st["usage_hist"]["counts"]) == 4
    assert np.isfinite(ks.energy())


def test_auto_switches_exact_to_ivf_and_drift_retrains():
    rng = np.random.default_rng(7)
    ks = store(index="auto", ivf_threshold=3000, nlist=16, drift_retrain=0.05,
               gravity=GravityConfig(alpha=0.5))
    ks.add(clustered(2000, rng))
    assert ks.index_kind == "exact"
    ks.add(clustered(1500, rng))
    assert ks.index_kind == "ivf" and ks.stats()["nlist"] == 16
    retrained = False
    for _ in range(30):
        q = clustered(64, rng)
        _, I = ks.search(q, 8, tau=-np.inf)
        st = ks.consolidate(Activations(q, I, np.full(I.shape, 0.125, np.float32)))
        retrained |= st.retrained
        if retrained:
            break
    assert retrained and ks.drift < 0.05


def test_stale_gpu_results_are_rescored(monkeypatch):
    """The GPU path's stale-clone fix-up, exercised on CPU: exact scores, free slots dropped."""
    ks = store(index="exact")
    e = np.eye(D, dtype=np.float32)
    ks.add(e[:3])
    ks.free([1])
    stale = (np.array([[0.9, 0.8, 0.7]], np.float32), np.array([[1, 2, 0]]), True)
    monkeypatch.setattr(ks._index, "search", lambda xq, k, nprobe=None: stale)
    D_, I = ks.search(e[2:3], 3, tau=-np.inf)
    assert I[0].tolist() == [2, 0, -1]
    np.testing.assert_allclose(D_[0, :2], [1.0, 0.0])


def test_background_rebuild_serves_old_index_and_reapplies_changes(monkeypatch):
    import threading

    from srmoa_dist.routing import keystore as ksmod

    gate = threading.Event()
    real = ksmod.KeyIndex.build
    monkeypatch.setattr(ksmod.KeyIndex, "build",
                        classmethod(lambda cls, *a, **kw: (gate.wait(20), real(*a, **kw))[1]))
    rng = np.random.default_rng(8)
    ks = store(index="auto", ivf_threshold=1000, nlist=8, rebuild_in_background=True)
    ks.add(clustered(900, rng))
    assert ks.index_kind == "exact"
    ids = ks.add(clustered(200, rng))                                     # past the threshold
    assert ks.index_kind == "exact" and ks.stats()["rebuilding"]          # the old index serves
    moved = unit(rng.standard_normal((3, D)))
    ks.update(ids[:3], moved)                                             # changes during the build
    ks.free(ids[3:5])
    ks.add(clustered(4, rng))
    _, I = ks.search(moved, 1, tau=-np.inf)
    assert I[:, 0].tolist() == ids[:3].tolist()
    gate.set()
    assert ks.wait_rebuild(20)
    assert ks.index_kind == "ivf" and ks._index.ntotal == len(ks) == 1102
    act = ks.active_ids()
    _, I = ks.search(ks.get(act), 1, tau=-np.inf, nprobe=8)               # every key at its own place
    assert np.array_equal(I[:, 0], act)


def test_hold_keeps_candidate_keys_still_while_consolidation_moves_the_rest():
    g = GravityConfig(alpha=0.5, beta=0.0, delta=0.0, theta=0.0, usage_ema=0.5, min_norm=0.01)
    ks = store(index="exact", gravity=g)
    rng = np.random.default_rng(7)
    x = unit(rng.standard_normal((3, D)))
    ks.add(x)
    q = unit(x[:1] + x[1:2] + x[2:3])
    ks.hold([1], ttl_s=60)
    assert ks.held_ids().tolist() == [1] and ks.stats()["n_held"] == 1
    st = ks.consolidate(Activations(np.repeat(q, 3, 0), np.array([[0], [1], [2]]), np.ones((3, 1))))
    assert st.n_moved == 3
    np.testing.assert_array_equal(ks.get([1]), x[1:2])                    # held: bit-identical
    assert not np.allclose(ks.get([0, 2]), x[[0, 2]])                     # the others moved meanwhile
    ks.release([1])
    ks.release([1])                                                      # a repeated release is a no-op
    ks.consolidate(Activations(q, np.array([[1]]), np.ones((1, 1))))
    assert not np.allclose(ks.get([1]), x[1:2])                          # released: it moves again
    with pytest.raises(ValueError, match="ttl_s"):
        ks.hold([0], ttl_s=0)


def test_pinned_versions_lists_the_edited_slots():
    ks = store()
    ids = ks.add(unit(np.ones((4, D), np.float32)), pinned=np.array([True, False, True, True]))
    ks.set_namespace([ids[3]], "tenant-b")
    before = ks.pinned_versions()
    assert before[0].tolist() == [0, 2, 3] and before[2] == ["default", "default", "tenant-b"]
    ks.update([2], unit(np.arange(D, dtype=np.float32))[None])
    ks.free([3])
    got, versions, _ = ks.pinned_versions()
    assert got.tolist() == [0, 2] and versions[1] == before[1][1] + 1 and versions[0] == before[1][0]
