"""Namespaces of routing keys: the table, filtered search (exact scan and over-sampled index search),
and persistence through the WAL and the snapshot (old snapshots load as "default")."""

import numpy as np
import pytest

from srmoa_dist.config import KeyStoreConfig
from srmoa_dist.routing import namespaces as nsmod
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.namespaces import NamespaceTable, check_name, exact_top_k, filtered_search
from srmoa_dist.routing.snapshot import read_snapshot, write_snapshot


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_table_codes_and_names():
    t = NamespaceTable()
    assert t.code("default") == 0 and t.code("a") == 1 and t.code("b") == 2 and t.code("a") == 1
    assert t.codes({"b", "zzz"}).tolist() == [2]
    assert NamespaceTable(t.names).names == ["default", "a", "b"]
    with pytest.raises(ValueError, match="namespace"):
        check_name("bad name!")
    with pytest.raises(ValueError, match="code 0"):
        NamespaceTable(["a"])


def test_exact_top_k_matches_brute_force():
    rng = np.random.default_rng(0)
    keys, xq = _unit(rng, 50, 8), _unit(rng, 3, 8)
    ids = np.arange(100, 150)
    D, I = exact_top_k(xq, keys, ids, 5)
    S = xq @ keys.T
    assert (I == ids[np.argsort(-S, axis=1)[:, :5]]).all()
    D, I = exact_top_k(xq, keys[:2], ids[:2], 5)           # fewer keys than k: padded
    assert (I[:, 2:] == -1).all() and np.isneginf(D[:, 2:]).all()


def test_filtered_search_oversampled_path_equals_exact(monkeypatch):
    monkeypatch.setattr(nsmod, "EXACT_SCAN_MAX", 10)          # force the index path on a small store
    rng = np.random.default_rng(1)
    keys, xq = _unit(rng, 400, 16), _unit(rng, 6, 16)
    allowed = np.zeros(400, bool)
    allowed[rng.choice(400, 60, replace=False)] = True
    calls = []

    def index_search(q, k):
        calls.append(k)
        return exact_top_k(q, keys, np.arange(400), k)

    D, I = filtered_search(xq, 4, allowed, keys, index_search, 400)
    ids = np.flatnonzero(allowed)
    De, Ie = exact_top_k(xq, keys[ids], ids, 4)
    assert calls and calls[0] > 4                               # over-sampled
    assert (I == Ie).all() and np.allclose(D, De)
    assert allowed[I[I >= 0]].all()


def test_keystore_search_filters_by_namespace_and_persists(tmp_path):
    cfg = KeyStoreConfig(d_key=8, k=3, tau=-1.0)
    rng = np.random.default_rng(2)
    ka, kb = _unit(rng, 5, 8), _unit(rng, 5, 8)
    with KeyStore.open(tmp_path / "ks", cfg) as ks:
        a = ks.add(ka, namespace="a")
        b = ks.add(kb, namespace="b")
        s = ks.add(_unit(rng, 1, 8), namespace="shared")
        D, I = ks.search(kb[:2], 3, namespaces=[{"a", "shared"}, {"b"}])
        assert set(I[0].tolist()) <= set(a.tolist()) | set(s.tolist())
        assert I[1, 0] == b[1] and set(I[1].tolist()) <= set(b.tolist())
        assert ks.namespace_of(b[:1]) == ["b"]
        assert ks.stats()["namespaces"] == {"a": 5, "b": 5, "shared": 1}
        ks.set_namespace(a[:2], "b")
        ks.free(b[:1])
        assert ks.namespace_counts() == {"a": 3, "b": 6, "shared": 1}
    with KeyStore.open(tmp_path / "ks", cfg) as ks:              # WAL replay
        assert ks.namespace_counts() == {"a": 3, "b": 6, "shared": 1}
        ks.snapshot()
    with KeyStore.open(tmp_path / "ks", cfg) as ks:              # snapshot
        assert ks.namespace_counts() == {"a": 3, "b": 6, "shared": 1}
        assert ks.namespace_of(a[2:3]) == ["a"]
        new = ks.add(_unit(rng, 1, 8))                             # a freed slot comes back as default
        assert ks.namespace_of(new) == ["default"]
        with pytest.raises(ValueError, match="namespace"):
            ks.add(_unit(rng, 1, 8), namespace="no spaces")
        with pytest.raises(ValueError, match="namespace sets"):
            ks.search(ka[:2], 2, namespaces=[{"a"}])


def test_snapshot_without_namespace_column_loads_as_default(tmp_path):
    cfg = KeyStoreConfig(d_key=8, k=2, tau=-1.0)
    rng = np.random.default_rng(3)
    with KeyStore.open(tmp_path / "ks", cfg) as ks:
        ks.add(_unit(rng, 4, 8), namespace="a")
        ks.snapshot()
    snap = read_snapshot(tmp_path / "ks")
    snap.namespaces = None                                          # an older snapshot: no column
    snap.meta.pop("namespaces")
    write_snapshot(tmp_path / "ks", snap)
    assert read_snapshot(tmp_path / "ks").namespaces is None
    with KeyStore.open(tmp_path / "ks", cfg) as ks:
        assert ks.namespace_counts() == {"default": 4}
        _, I = ks.search(_unit(rng, 1, 8), 2, namespaces=[{"a"}])
        assert (I == -1).all()


def test_row_without_namespaces_sees_every_key():
    cfg = KeyStoreConfig(d_key=8, k=2, tau=-1.0)
    rng = np.random.default_rng(4)
    ks = KeyStore(cfg)
    ka = ks.add(_unit(rng, 3, 8), namespace="a")
    q = ks.get(ka[:1])
    _, I = ks.search(np.concatenate([q, q]), 2, namespaces=[None, {"b"}])
    assert I[0, 0] == ka[0] and (I[1] == -1).all()


def test_a_reach_covering_every_namespace_searches_unfiltered(monkeypatch):
    """A store whose keys are all in reach (every store without tenants) takes the plain index search;
    the filtered path (spied on, still run) starts once a key of another namespace exists."""
    import srmoa_dist.routing.keystore as ksmod

    cfg = KeyStoreConfig(d_key=8, k=2, tau=-1.0)
    rng = np.random.default_rng(5)
    ks = KeyStore(cfg)
    ks.add(_unit(rng, 3, 8))
    calls = []
    real = ksmod.filtered_search
    monkeypatch.setattr(ksmod, "filtered_search", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = _unit(rng, 2, 8)
    D0, I0 = ks.search(q, 2)
    D, I = ks.search(q, 2, namespaces=[{"default", "shared"}] * 2)
    assert calls == [] and (I == I0).all()
    a = ks.add(_unit(rng, 1, 8), namespace="a")
    _, I = ks.search(ks.get(a), 2, namespaces=[{"default", "shared"}])
    assert calls == [1] and a[0] not in I
