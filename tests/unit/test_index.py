"""index.py: exact / IVF FAISS indexes over slot ids, device selection, margin-based reassignment."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from srmoa_dist.routing import index as ix
from srmoa_dist.routing.index import KeyIndex, auto_nlist, rescore, select_device, train_centroids

D = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator, n_clusters: int = 64, noise: float = 0.5) -> np.ndarray:
    centres = unit(rng.standard_normal((n_clusters, D)))
    return unit(centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, D)) / np.sqrt(D))


def test_select_device():
    assert select_device("cpu", gpu_available=True) == "cpu"
    assert select_device("auto", gpu_available=True) == "gpu"
    assert select_device("auto", gpu_available=False) == "cpu"
    assert select_device("gpu", gpu_available=True) == "gpu"
    with pytest.raises(ValueError, match="faiss-gpu"):
        select_device("gpu", gpu_available=False)
    with pytest.raises(ValueError, match="device"):
        select_device("tpu", gpu_available=False)
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0     # this FAISS build
    assert ix.faiss_gpu_available() is gpu
    assert select_device("auto") == ("gpu" if gpu else "cpu")


def test_gpu_detection_follows_faiss(monkeypatch):
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert ix.faiss_gpu_available() and select_device("auto") == "gpu"
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert not ix.faiss_gpu_available()


def test_auto_nlist():
    assert auto_nlist(1_000_000) == 4000
    assert auto_nlist(10_000) == 400
    assert auto_nlist(100) == 12                       # clamped to n // 8
    assert auto_nlist(5, 0) == 1
    assert auto_nlist(10_000, 50) == 50


def test_exact_index_matches_faiss_knn():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((500, D)))
    ids = rng.permutation(10_000)[:500].astype(np.int64)
    idx = KeyIndex.build(D, "exact", x, ids)
    q = unit(rng.standard_normal((20, D)))
    Dx, Ix, stale = idx.search(q, 10)
    Dr, Ir = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert not stale
    assert np.array_equal(Ix, ids[Ir])
    np.testing.assert_allclose(Dx, Dr, rtol=1e-5, atol=1e-6)
    idx.remove(ids[Ir[:, 0]])
    assert not np.isin(idx.search(q, 10)[1], ids[Ir[:, 0]]).any()


def test_ivf_update_moves_key_and_keeps_assignment_exact():
    rng = np.random.default_rng(1)
    x = clustered(4000, rng)
    ids = np.arange(4000, dtype=np.int64)
    idx = KeyIndex.build(D, "ivf", x, ids, nlist=32, nprobe=32, train_per_list=64)
    assert idx.kind == "ivf" and idx.nlist == 32 and idx.ntotal == 4000
    cur = x.copy()
    skipped = 0
    for _ in range(20):                                # many small moves: margins run down
        sel = rng.choice(4000, 300, replace=False)
        new = unit(cur[sel] + 0.05 * rng.standard_normal((300, D)))
        before = idx.margin[sel].copy()
        idx.update(sel, new, old=cur[sel])
        skipped += int((idx.margin[sel] < before).sum())
        cur[sel] = new
    true_lists, _ = idx.lists_of(cur)
    assert np.array_equal(idx.assign[:4000], true_lists)          # the margin shortcut stays exact
    assert skipped > 0
    # a far move: found at the new place, not the old one
    target = unit(rng.standard_normal((1, D)))
    idx.update(np.array([7]), target, old=cur[7:8])
    _, I, _ = idx.search(target, 1)
    assert I[0, 0] == 7
    _, I, _ = idx.search(cur[7:8], 5)
    assert 7 not in I[0] or np.dot(cur[7], target[0]) > 0.5


def test_ivf_rescale_keeps_lists():
    rng = np.random.default_rng(2)
    x = clustered(2000, rng)
    idx = KeyIndex.build(D, "ivf", x, np.arange(2000), nlist=16)
    lists = idx.assign[:2000].copy()
    sel = np.arange(0, 2000, 3)
    idx.update(sel, x[sel] * 0.5, same_lists=True)
    assert np.array_equal(idx.assign[:2000], lists) and idx.ntotal == 2000
    D_, I, _ = idx.search(x[sel[:5]], 2000, nprobe=16)                # every key: scores are the new ones
    for r in range(5):
        got = dict(zip(I[r].tolist(), D_[r].tolist()))
        assert got[int(sel[r])] == pytest.approx(0.5, abs=1e-5)


def test_build_from_saved_centroids_and_lists():
    rng = np.random.default_rng(3)
    x = clustered(3000, rng)
    ids = np.arange(3000)
    a = KeyIndex.build(D, "ivf", x, ids, nlist=24)
    lists = a.assign[:3000].copy()
    lists[::5] = -1                                                  # unknown: recomputed
    b = KeyIndex.build(D, "ivf", x, ids, centroids=a.centroids, lists=lists)
    assert np.array_equal(a.assign[:3000], b.assign[:3000])
    q = x[:50]
    assert np.array_equal(a.search(q, 8)[1], b.search(q, 8)[1])


def test_train_centroids_unit_norm():
    rng = np.random.default_rng(4)
    c = train_centroids(clustered(1000, rng), 10, niter=5)
    assert c.shape == (10, D) and np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="cannot train"):
        train_centroids(clustered(5, rng), 10)


def test_rescore_masks_invalid_and_sorts():
    rng = np.random.default_rng(5)
    keys = unit(rng.standard_normal((10, D)))
    valid = np.ones(10, bool)
    valid[3] = False
    q = keys[[3]]
    D_, I = rescore(q, np.array([[1, 3, 2, -1, 42]]), keys, valid)
    assert 3 not in I[0] and 42 not in I[0]
    assert (np.diff(D_[0][np.isfinite(D_[0])]) <= 0).all()
    assert I[0, -1] == -1 and D_[0, -1] == -np.inf
    np.testing.assert_allclose(D_[0, :2], np.sort(keys[[1, 2]] @ q[0])[::-1], atol=1e-6)


def test_remove_unknown_ids_is_noop_and_disagreement_raises():
    rng = np.random.default_rng(6)
    x = unit(rng.standard_normal((100, D)))
    idx = KeyIndex.build(D, "exact", x, np.arange(100))
    idx.remove(np.array([500, 600]))
    assert idx.ntotal == 100
    with pytest.raises(RuntimeError):
        ivf = KeyIndex.build(D, "ivf", x, np.arange(100), nlist=4)
        ivf.update(np.array([200]), x[:1])


def test_gpu_mirror_sync_and_staleness_with_a_fake_gpu(monkeypatch):
    """The GPU clone logic, on CPU: 'index_cpu_to_gpu' is replaced by a CPU clone."""
    clones = []

    def fake_to_gpu(res, device, index):
        clones.append(faiss.clone_index(index))
        return clones[-1]

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_to_gpu, raising=False)
    rng = np.random.default_rng(7)
    x = clustered(1000, rng)
    idx = KeyIndex.build(D, "ivf", x, np.arange(1000), nlist=8, device="gpu", gpu_sync_s=3600)
    q = x[:4]
    _, I, stale = idx.search(q, 3)
    assert len(clones) == 1 and not stale and (I[:, 0] == np.arange(4)).all()
    idx.remove(np.array([0]))
    _, I, stale = idx.search(q, 3)
    assert stale and len(clones) == 1 and I[0, 0] == 0            # the clone lags: caller must rescore
    idx.gpu_sync_s = 0.0
    _, I, stale = idx.search(q, 3)
    assert not stale and len(clones) == 2 and 0 not in I[0]


def test_keystore_on_a_fake_gpu_never_returns_freed_slots(monkeypatch):
    from srmoa_dist.config import KeyStoreConfig
    from srmoa_dist.routing.keystore import KeyStore

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: faiss.clone_index(index),
                        raising=False)
    ks = KeyStore(KeyStoreConfig(d_key=D, device="auto"))
    assert ks.device == "gpu"
    ks._index.gpu_sync_s = 3600.0
    x = unit(np.random.default_rng(8).standard_normal((50, D)))
    ks.add(x)
    ks.search(x[:1], 5, tau=-np.inf)                              # clone made
    ks.free([0, 1])
    ks.update([2], x[3:4])
    D_, I = ks.search(x[:3], 5, tau=-np.inf)                      # stale clone, rescored
    assert not np.isin(I, [0, 1]).any()
    for r in range(3):                                            # scores are exact for the current keys
        ok = I[r] >= 0
        np.testing.assert_allclose(D_[r, ok], ks.get(I[r, ok]) @ x[r], atol=1e-5)
