import multiprocessing as mp
import os
import pickle
import subprocess
import threading

import numpy as np
import pytest

from srmoa_dist.config import StoreConfig
from srmoa_dist.experts.codec import CorruptExpertError, encode_expert
from srmoa_dist.experts.expert import DTYPES, LoRAExpert
from srmoa_dist.experts.shard import (
    DiskFullError,
    ExpertShard,
    MissingExpertError,
    NoPreviousVersionError,
    ShardFullError,
)

SHAPES = {"layers.7.mlp": (32, 32)}
CFG = StoreConfig(n_shards=1, map_size_mb=4, max_map_size_mb=64)


def ex(seed: int, dtype: str = "float16", shapes=SHAPES, rank: int = 4) -> LoRAExpert:
    return LoRAExpert.random(shapes, rank=rank, alpha=8.0, dtype=dtype, seed=seed)


@pytest.fixture
def shard(tmp_path):
    s = ExpertShard(tmp_path / "shard-000", CFG)
    yield s
    s.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_put_get_round_trip_every_dtype(shard, dtype):
    items = {i: ex(i, dtype) for i in range(5)}
    assert shard.put_many(items) == {i: 1 for i in range(5)}
    got = shard.get_many([3, 0, 4, 3])
    assert [g.same_weights(items[i]) for g, i in zip(got, [3, 0, 4, 3], strict=True)] == [True] * 4
    assert all(g.version == 1 and g.dtype == dtype for g in got)
    assert len(shard) == 5


def test_versions_and_previous_kept(shard):
    assert shard.put_many({1: ex(1), 2: ex(2)}) == {1: 1, 2: 1}
    assert shard.put_many({1: ex(10)}) == {1: 2}
    assert shard.put_many({1: ex(11), 3: ex(3)}) == {1: 3, 3: 1}
    assert shard.versions([1, 2, 3]) == [3, 1, 1]
    assert shard.get_previous(1).same_weights(ex(10))
    assert shard.get_previous(1).version == 2
    assert shard.stats()["prev_entries"] == 1


def test_rollback_returns_previous_version(shard):
    shard.put_many({7: ex(1)})
    shard.put_many({7: ex(2)})
    assert shard.get_many([7])[0].version == 2
    assert shard.rollback(7) == 1
    (back,) = shard.get_many([7])
    assert back.version == 1 and back.same_weights(ex(1))
    with pytest.raises(NoPreviousVersionError, match="expert 7 .* no previous version"):
        shard.rollback(7)
    with pytest.raises(MissingExpertError):
        shard.rollback(8)
    # editing again after a rollback keeps the restored version as the previous one
    assert shard.put_many({7: ex(3)}) == {7: 2}
    assert shard.get_previous(7).same_weights(ex(1))


def test_missing_ids_are_reported_never_zeros(shard):
    shard.put_many({1: ex(1), 2: ex(2)})
    with pytest.raises(MissingExpertError) as ei:
        shard.get_many([1, 5, 2, 9, 5])
    assert ei.value.ids == [5, 9]
    assert "[5, 9]" in str(ei.value) and str(shard.path) in str(ei.value)
    assert isinstance(ei.value, KeyError)
    with pytest.raises(MissingExpertError, match=r"\[4\]"):
        shard.get_raw_many([4])
    with pytest.raises(MissingExpertError, match=r"\[4\]"):
        shard.versions([1, 4])
    assert shard.contains([1, 4, 2]) == [True, False, True]


def test_delete(shard):
    shard.put_many({1: ex(1), 2: ex(2)})
    shard.put_many({1: ex(3)})
    assert shard.delete([1, 99]) == 1
    assert shard.contains([1, 2]) == [False, True]
    assert shard.stats()["prev_entries"] == 0
    with pytest.raises(MissingExpertError, match=r"\[99\]"):
        shard.delete([2, 99], missing_ok=False)
    assert shard.contains([2]) == [True]  # the failed delete changed nothing
    assert shard.put_many({1: ex(4)}) == {1: 1}


def test_raw_put_and_get(shard):
    e = ex(1)
    assert shard.put_raw_many({5: encode_expert(LoRAExpert(e.targets, e.alpha, version=40))}) == {5: 1}
    assert shard.put_raw_many({5: encode_expert(e)}) == {5: 2}
    (raw,) = shard.get_raw_many([5], verify=True)
    assert isinstance(raw, bytes)
    assert shard.get_many([5])[0].version == 2
    bad = bytearray(encode_expert(e))
    bad[-1] ^= 0xFF
    with pytest.raises(CorruptExpertError, match="expert 6"):
        shard.put_raw_many({6: bytes(bad)})
    assert shard.contains([6]) == [False]


def test_invalid_ids(shard):
    with pytest.raises(ValueError, match=r"-1.*no expert"):
        shard.get_many([-1])
    with pytest.raises(ValueError, match="2\\*\\*63"):
        shard.put_many({2**63: ex(1)})
    with pytest.raises(TypeError, match="not a LoRAExpert"):
        shard.put_many({1: "x"})


def test_stats(shard):
    shard.put_many({i: ex(i) for i in range(10)})
    st = shard.stats()
    assert st["entries"] == 10 and st["path"] == str(shard.path)
    assert st["map_size"] == 4 << 20 and 0 < st["used_bytes"] <= st["map_size"]
    assert st["durable"] is True


@pytest.mark.parametrize("durable", [True, False])
def test_reopen_after_close(tmp_path, durable):
    cfg = StoreConfig(map_size_mb=4, durable=durable)
    with ExpertShard(tmp_path / "s", cfg) as s:
        s.put_many({i: ex(i) for i in range(20)})
        s.put_many({3: ex(33)})
        s.sync()
    with ExpertShard(tmp_path / "s", cfg, readonly=True) as s:
        assert len(s) == 20
        assert s.get_many([3])[0].same_weights(ex(33))
        assert s.versions([3, 4]) == [2, 1]
        with pytest.raises(PermissionError, match="read-only"):
            s.put_many({1: ex(1)})
    with pytest.raises(FileNotFoundError):
        ExpertShard(tmp_path / "nothing", cfg, readonly=True)


def test_map_grows_then_fails_clearly(tmp_path):
    cfg = StoreConfig(map_size_mb=1, max_map_size_mb=4)
    big = {"layers.1.mlp": (2048, 2048)}  # rank 4 fp32: 64 KiB per expert
    s = ExpertShard(tmp_path / "s", cfg)
    s.put_many({i: ex(i, "float32", big) for i in range(24)})  # ~1.5 MiB: one doubling
    assert s.map_size == 2 << 20
    s.put_many({i: ex(i, "float32", big) for i in range(24, 40)})  # ~2.6 MiB
    assert s.map_size == 4 << 20
    assert len(s) == 40 and s.get_many([39])[0].same_weights(ex(39, "float32", big))
    with pytest.raises(ShardFullError, match=r"store.max_map_size_mb \(4\); raise store.max_map_size_mb"):
        s.put_many({i: ex(i, "float32", big) for i in range(40, 120)})
    assert len(s) == 40  # the failed batch wrote nothing
    s.close()
    # reopening with the small configured map keeps the grown size
    with ExpertShard(tmp_path / "s", cfg) as s2:
        assert s2.map_size >= 4 << 20 and len(s2) == 40


BIG = {"layers.1.mlp": (2048, 2048)}  # rank 4 fp32: 64 KiB per expert


def _fill(s: ExpertShard, start: int, error: type[Exception]) -> tuple[int, Exception]:
    """Put experts one at a time from id `start` until the shard refuses one; (next id, the error)."""
    i = start
    while i < start + 10_000:
        try:
            s.put_many({i: ex(i, "float32", BIG)})
        except error as exc:
            return i, exc
        i += 1
    raise AssertionError("the shard never filled up")


def test_full_map_refuses_whole_batch_keeps_versions_and_serves(tmp_path):
    cfg = StoreConfig(map_size_mb=1, max_map_size_mb=1)     # a map that cannot grow
    with ExpertShard(tmp_path / "s", cfg) as s:
        s.put_many({0: ex(0, "float32", BIG)})
        s.put_many({0: ex(100, "float32", BIG)})              # version 2, version 1 kept in prev
        n, exc = _fill(s, 1, ShardFullError)
        assert not isinstance(exc, DiskFullError)
        assert "nothing of this batch was written" in str(exc) and "store.max_map_size_mb" in str(exc)
        before = s.stats()
        # an overwrite of a stored expert plus new ones: refused as a whole
        with pytest.raises(ShardFullError):
            s.put_many({0: ex(200, "float32", BIG), **{i: ex(i, "float32", BIG) for i in range(n, n + 4)}})
        after = s.stats()
        counts = [(st["entries"], st["prev_entries"]) for st in (before, after)]
        assert counts == [(n, 1), (n, 1)]
        assert s.versions([0]) == [2] and s.get_many([0])[0].same_weights(ex(100, "float32", BIG))
        assert s.get_previous(0).same_weights(ex(0, "float32", BIG))
        assert s.get_raw_many(list(range(n)), verify=True)   # serving goes on: every record reads, crc ok
        with pytest.raises(ShardFullError):                  # copy-on-write: even a rollback needs room
            s.rollback(0)
        assert s.versions([0]) == [2]
        s.delete([1, 2, 3])                                   # deletes still work and free room (LMDB
        s.delete([4, 5, 6])                                   # reuses a page one commit after its free)
        assert s.rollback(0) == 1
        assert s.put_many({n: ex(n, "float32", BIG)}) == {n: 1}   # room again: writes go on
    with ExpertShard(tmp_path / "s", cfg) as s:               # and the file reopens consistent
        assert len(s) == n - 5 and s.versions([0, n]) == [1, 1]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 3 MiB tmpfs (needs root: mount); the shard's map (64 MiB) is far larger than the disk."""
    mnt = tmp_path / "tiny-fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_is_a_clear_error_nothing_half_written(tiny_filesystem):
    cfg = StoreConfig(map_size_mb=64, max_map_size_mb=64)
    with ExpertShard(tiny_filesystem / "s", cfg) as s:
        n, exc = _fill(s, 0, DiskFullError)
        assert isinstance(exc, ShardFullError)                # callers that catch "full" catch both
        assert "filesystem is full" in str(exc) and "free disk space" in str(exc)
        assert "nothing of this batch was written" in str(exc).lower()
        assert len(s) == n and s.get_raw_many(list(range(n)), verify=True)
        with pytest.raises(DiskFullError):
            s.put_many({0: ex(500, "float32", BIG), **{i: ex(i, "float32", BIG) for i in (n, n + 1)}})
        assert len(s) == n and s.versions([0]) == [1] and s.stats()["prev_entries"] == 0
        s.delete([0, 1])
        s.delete([2, 3])
        assert s.put_many({n: ex(n, "float32", BIG)}) == {n: 1}   # freed pages are reused
    with ExpertShard(tiny_filesystem / "s", cfg) as s:
        assert len(s) == n - 3 and s.get_raw_many(list(range(4, n + 1)), verify=True)


def test_crc_corruption_on_disk_names_id_and_path(tmp_path):
    path = tmp_path / "shard-003"
    e = LoRAExpert.random({"layers.2.mlp": (64, 64)}, 4, 8.0, "float32", seed=123)
    with ExpertShard(path, CFG) as s:
        s.put_many({77: e, 78: ex(1)})
    data = (path / "data.mdb").read_bytes()
    needle = e.targets["layers.2.mlp"][1].tobytes()  # B's bytes inside the payload
    pos = data.find(needle)
    assert pos >= 0 and data.find(needle, pos + 1) == -1
    flipped = bytearray(data)
    flipped[pos + 10] ^= 0x40
    (path / "data.mdb").write_bytes(bytes(flipped))
    with ExpertShard(path, CFG) as s:
        with pytest.raises(CorruptExpertError) as ei:
            s.get_many([78, 77])
        msg = str(ei.value)
        assert "expert 77" in msg and str(path) in msg and "crc32" in msg
        assert ei.value.expert_id == 77
        with pytest.raises(CorruptExpertError, match="expert 77"):
            s.get_raw_many([77], verify=True)
        assert s.get_many([78])[0].same_weights(ex(1))  # neighbours are fine
        s.get_raw_many([77])  # raw bytes move without a check unless asked
        assert s.put_many({77: e}) == {77: 2}  # overwriting repairs it
        assert s.get_many([77])[0].same_weights(e)


def test_refuses_pickle_and_fork(shard):
    shard.put_many({1: ex(1)})
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(shard)

    def child():
        try:
            shard.get_many([1])
        except RuntimeError as exc:
            os._exit(3 if "fork" in str(exc) else 4)
        os._exit(0)

    p = mp.get_context("fork").Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == 3


def _open_in_child(path: str, q) -> None:
    s = ExpertShard(path, CFG)
    q.put([int(v) for v in s.versions([1, 2])])
    s.close()


def test_open_after_fork(tmp_path):
    with ExpertShard(tmp_path / "s", CFG) as s:
        s.put_many({1: ex(1), 2: ex(2)})
        s.put_many({2: ex(3)})
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_open_in_child, args=(str(tmp_path / "s"), q))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and q.get(timeout=5) == [1, 2]


def test_many_small_experts_one_transaction(shard):
    items = {int(i): ex(int(i) % 4) for i in np.random.default_rng(0).permutation(2000)}
    assert set(shard.put_many(items).values()) == {1}
    ids = list(range(0, 2000, 7))
    got = shard.get_many(ids)
    assert [g.same_weights(ex(i % 4)) for g, i in zip(got, ids, strict=True)] == [True] * len(ids)
    assert shard.ids() == list(range(2000))


def test_concurrent_reads_while_the_map_grows(tmp_path):
    cfg = StoreConfig(map_size_mb=1, max_map_size_mb=16)
    big = {"layers.1.mlp": (2048, 2048)}
    s = ExpertShard(tmp_path / "s", cfg)
    s.put_many({i: ex(i) for i in range(50)})
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                got = s.get_many([3, 17, 42])
                assert got[1].same_weights(ex(17))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for k in range(10):
        s.put_many({1000 + 8 * k + j: ex(j, "float32", big) for j in range(8)})
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert s.map_size >= 8 << 20 and len(s) == 130
    s.close()


def test_relations_read_from_the_headers(shard):
    from srmoa_dist.experts.codec import decode_relation
    from srmoa_dist.experts.expert import ExpertRelation

    rel = ExpertRelation("Zorblax", np.eye(4, dtype=np.float32)[:2])
    shard.put_many({1: ex(1).with_relation(rel), 2: ex(2)})
    got = shard.relations([2, 1, 99])
    assert got[0] is None and got[2] is None                       # no relation; no record
    assert got[1].subject == "Zorblax" and np.array_equal(got[1].keys, rel.keys)
    assert decode_relation(encode_expert(ex(3))) is None
