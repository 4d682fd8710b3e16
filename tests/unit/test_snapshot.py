"""snapshot.py and KeyStore persistence: Arrow snapshot, WAL replay, crash recovery."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from srmoa_dist.config import GravityConfig, KeyStoreConfig
from srmoa_dist.routing.gravity import Activations
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.snapshot import SNAPSHOT_NAME, Snapshot, read_snapshot, write_snapshot
from srmoa_dist.routing.wal import wal_files

D = 16
REPO = Path(__file__).resolve().parents[2]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def snap(n: int = 10, centroids: bool = True) -> Snapshot:
    rng = np.random.default_rng(0)
    return Snapshot(
        keys=unit(rng.standard_normal((n, D))), usage=rng.random(n).astype(np.float32),
        utick=np.arange(n, dtype=np.int64), dtick=np.arange(n, dtype=np.int64) + 1,
        pinned=np.arange(n) % 3 == 0, free=np.arange(n) % 4 == 1, versions=np.arange(n, dtype=np.int64) * 2,
        lists=np.arange(n, dtype=np.int64) % 5 - 1,
        meta={"wal_seq": 42, "step": 7, "cursor": 3, "drift_sum": 0.5, "n_trained": 9, "index_kind": "ivf"},
        centroids=unit(rng.standard_normal((5, D))) if centroids else None)


def test_snapshot_roundtrip(tmp_path):
    s = snap()
    path = write_snapshot(tmp_path, s)
    assert path.name == SNAPSHOT_NAME and not list(tmp_path.glob("*.tmp"))
    r = read_snapshot(tmp_path)
    for f in ("keys", "usage", "utick", "dtick", "pinned", "free", "versions", "lists", "centroids"):
        a, b = getattr(s, f), getattr(r, f)
        assert a.dtype == b.dtype or f == "lists", f
        assert np.array_equal(a, b), f
    assert r.meta["wal_seq"] == 42 and r.meta["d_key"] == D and r.meta["format"].startswith("srmoa")
    # the file is plain Arrow IPC with a FixedSizeList key column
    with pa.memory_map(str(path)) as src:
        t = pa.ipc.open_file(src).read_all()
    assert t.schema.field("key").type == pa.list_(pa.float32(), D)
    # a new snapshot without centroids drops the centroid file
    write_snapshot(tmp_path, snap(centroids=False))
    assert read_snapshot(tmp_path).centroids is None and not list(tmp_path.glob("centroids-*"))


def test_interrupted_snapshot_leaves_the_old_one(tmp_path):
    write_snapshot(tmp_path, snap(10))
    (tmp_path / (SNAPSHOT_NAME + ".tmp")).write_bytes(b"ARROW1 half a file")
    r = read_snapshot(tmp_path)
    assert r.n == 10 and not (tmp_path / (SNAPSHOT_NAME + ".tmp")).exists()
    (tmp_path / "empty").mkdir()
    assert read_snapshot(tmp_path / "empty") is None


# ----------------------------------------------------------------------------- KeyStore persistence
def cfg(**kw) -> KeyStoreConfig:
    return KeyStoreConfig(d_key=D, **kw)


def state_of(ks: KeyStore) -> dict:
    n = ks._n
    return {"keys": ks._keys[:n].copy(), "usage": ks._usage[:n].copy(), "free": ks._free[:n].copy(),
            "pinned": ks._pinned[:n].copy(), "versions": ks._versions[:n].copy(),
            "utick": ks._utick[:n].copy(), "dtick": ks._dtick[:n].copy(), "step": ks.step}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def workload(ks: KeyStore, rng: np.random.Generator, rounds: int = 5) -> None:
    for _ in range(rounds):
        ids = ks.add(unit(rng.standard_normal((50, D))), pinned=rng.random(50) < 0.1)
        ks.update(ids[:5], unit(rng.standard_normal((5, D))))
        q = unit(rng.standard_normal((20, D)))
        _, I = ks.search(q, 4, tau=-np.inf)
        ks.consolidate(Activations(q, I, np.full(I.shape, 0.25, np.float32)))
        ks.free(ids[10:15])
        ks.pin(ids[20:22])


def test_reopen_replays_wal_exactly(tmp_path):
    g = GravityConfig(delta=0.05, sweep_min=16, sweep_batches=4)
    ks = KeyStore.open(tmp_path, cfg(), g)
    workload(ks, np.random.default_rng(1))
    want = state_of(ks)
    ks.close()
    ks2 = KeyStore.open(tmp_path, cfg(), g)
    assert_same(state_of(ks2), want)
    q = unit(np.random.default_rng(2).standard_normal((8, D)))
    ks3 = KeyStore(cfg(), g)                          # same ops in memory: same search results
    workload(ks3, np.random.default_rng(1))
    assert np.array_equal(ks2.search(q, 5, tau=-np.inf)[1], ks3.search(q, 5, tau=-np.inf)[1])
    # snapshot + more WAL
    ks2.snapshot()
    assert len(wal_files(tmp_path)) == 1
    workload(ks2, np.random.default_rng(3), rounds=2)
    want = state_of(ks2)
    ks2.close()
    assert_same(state_of(KeyStore.open(tmp_path, cfg(), g)), want)


def test_auto_snapshot_and_rotation(tmp_path):
    ks = KeyStore.open(tmp_path, cfg(snapshot_every=120))
    rng = np.random.default_rng(4)
    ks.add(unit(rng.standard_normal((100, D))))
    assert not (tmp_path / SNAPSHOT_NAME).exists()
    ks.add(unit(rng.standard_normal((30, D))))         # 130 logged rows >= 120
    assert (tmp_path / SNAPSHOT_NAME).exists()
    assert ks.stats()["logged_since_snapshot"] == 0
    seq = read_snapshot(tmp_path).meta["wal_seq"]
    assert seq == ks.stats()["wal_seq"] == 2
    assert [first for first, _ in wal_files(tmp_path)] == [3]


def test_d_key_mismatch(tmp_path):
    ks = KeyStore.open(tmp_path, cfg())
    ks.add(unit(np.ones((1, D))))
    ks.snapshot()
    ks.close()
    with pytest.raises(ValueError, match="d_key"):
        KeyStore.open(tmp_path, KeyStoreConfig(d_key=D + 1))


def test_ivf_store_reopens_with_saved_centroids(tmp_path, caplog):
    rng = np.random.default_rng(5)
    c = cfg(index="ivf", nlist=8, nprobe=8)
    ks = KeyStore.open(tmp_path, c)
    ks.add(unit(rng.standard_normal((2000, D))))
    assert ks.index_kind == "ivf"
    cents = ks._index.centroids
    ks.snapshot()
    ks.update([3], unit(rng.standard_normal((1, D))))
    q = unit(rng.standard_normal((10, D)))
    want = ks.search(q, 8, tau=-np.inf)
    ks.close()
    with caplog.at_level(logging.INFO, logger="srmoa_dist.routing.index"):
        ks2 = KeyStore.open(tmp_path, c)
    assert "trained" not in caplog.text                 # no k-means on open
    assert np.array_equal(ks2._index.centroids, cents)
    got = ks2.search(q, 8, tau=-np.inf)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from srmoa_dist.config import GravityConfig, KeyStoreConfig
    from srmoa_dist.routing.gravity import Activations
    from srmoa_dist.routing.keystore import KeyStore
    path, D = sys.argv[1], int(sys.argv[2])
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(7)
    ks = KeyStore.open(path, KeyStoreConfig(d_key=D, snapshot_every=150), GravityConfig(delta=0.05))
    for i in range(6):
        ids = ks.add(unit(rng.standard_normal((40, D))))
        ks.update(ids[:3], unit(rng.standard_normal((3, D))))
        q = unit(rng.standard_normal((10, D)))
        _, I = ks.search(q, 4, tau=-np.inf)
        ks.consolidate(Activations(q, I, np.full(I.shape, 0.25, np.float32)))
        ks.free(ids[5:7])
        ks.pin(ids[8:9])
    ids = ks.add(unit(rng.standard_normal((10, D))))      # committed after the last auto-snapshot
    ks.update(ids[:2], unit(rng.standard_normal((2, D))))
    n = ks._n
    np.savez(os.path.join(path, "..", "expected.npz"), keys=ks._keys[:n], usage=ks._usage[:n],
             free=ks._free[:n], pinned=ks._pinned[:n], versions=ks._versions[:n], step=ks.step)
    os.kill(os.getpid(), signal.SIGKILL)      # crash: no close(), no final snapshot
""")


def test_crash_between_wal_append_and_snapshot_loses_nothing(tmp_path):
    store = tmp_path / "ks"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", CHILD, str(store), str(D)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    exp = np.load(tmp_path / "expected.npz")
    assert (store / SNAPSHOT_NAME).exists()               # snapshot_every=150 fired mid-run: snapshot + WAL
    assert wal_files(store)[-1][1].stat().st_size > 600  # ... and committed batches after it
    ks = KeyStore.open(store, KeyStoreConfig(d_key=D), GravityConfig(delta=0.05))
    got = state_of(ks)
    for k in ("keys", "usage", "free", "pinned", "versions"):
        assert np.array_equal(got[k], exp[k]), k
    assert got["step"] == int(exp["step"])


def test_torn_wal_tail_of_a_store_drops_only_the_last_batch(tmp_path, caplog):
    rng = np.random.default_rng(8)
    ks = KeyStore.open(tmp_path, cfg())
    ids = ks.add(unit(rng.standard_normal((30, D))))
    want = state_of(ks)
    ks.update(ids[:2], unit(rng.standard_normal((2, D))))        # the batch that will be torn
    ks.close()
    path = wal_files(tmp_path)[-1][1]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 7)
    with caplog.at_level(logging.WARNING):
        ks2 = KeyStore.open(tmp_path, cfg())
    assert "torn" in caplog.text
    assert_same(state_of(ks2), want)
    ks2.update(ids[:1], unit(rng.standard_normal((1, D))))        # and the log goes on
    want = state_of(ks2)
    ks2.close()
    assert_same(state_of(KeyStore.open(tmp_path, cfg())), want)
