"""k8s/storetool.py: backups of a store volume (LMDB + files) restore exactly, and unsafely never."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from manifest_tools import K8S_DIR

lmdb = pytest.importorskip("lmdb")
pytest.importorskip("pyarrow.fs")


@pytest.fixture(scope="module")
def tool() -> Any:
    spec = importlib.util.spec_from_file_location("storetool", K8S_DIR / "storetool.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["storetool"] = module
    spec.loader.exec_module(module)
    return module


def _write_shard(path: Path, items: dict[bytes, bytes]) -> None:
    """An LMDB environment shaped like ExpertShard's: two named databases."""
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=16 << 20, subdir=True, max_dbs=4)
    experts, prev = env.open_db(b"experts"), env.open_db(b"prev")
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v, db=experts)
            txn.put(k, v[::-1], db=prev)
    env.close()


def _read_shard(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True, max_dbs=4)
    try:
        db = env.open_db(b"experts", create=False)
        with env.begin() as txn:
            return dict(txn.cursor(db=db))
    finally:
        env.close()


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for i in range(2):
        _write_shard(data / "shards" / f"shard-{i:03d}",
                     {i.to_bytes(8, "big") + k.to_bytes(8, "big"): bytes([k]) * 5000 for k in range(20)})
    (data / "shards" / "store.json").write_text('{"n_shards": 2}')
    (data / "keystore").mkdir()
    (data / "keystore" / "keys.arrow").write_bytes(b"snapshot" * 100)
    (data / "keystore" / "wal.log").write_bytes(b"record\n" * 10)
    (data / "keystore" / "keys.arrow.tmp").write_bytes(b"half-written")
    (data / "model_cache").mkdir()
    (data / "model_cache" / "weights.bin").write_bytes(b"x" * 1000)
    return data


def test_scan_finds_environments_and_files(tool, store):
    plan = tool.scan(store)
    assert plan.lmdb_dirs == ("shards/shard-000", "shards/shard-001")
    assert set(plan.files) == {"shards/store.json", "keystore/keys.arrow", "keystore/wal.log"}


def test_backup_then_restore_everything(tool, store, tmp_path):
    dest = str(tmp_path / "backups")
    before = {i: _read_shard(store / "shards" / f"shard-{i:03d}") for i in range(2)}
    manifest = tool.backup(store, dest, group="store-0", stamp="20260510T120000Z")
    assert {e["kind"] for e in manifest["files"].values()} == {"lmdb", "file"}
    assert not (store / tool.STAGING).exists() or not any((store / tool.STAGING).iterdir())
    assert tool.verify(f"{dest}/20260510T120000Z/store-0")["ok"]
    assert tool.latest_backup(dest, "store-0") == f"{dest}/20260510T120000Z/store-0"

    _write_shard(store / "shards" / "shard-001", {b"new-key!": b"lost"})       # damage after the backup
    (store / "keystore" / "wal.log").write_bytes(b"garbage")
    result = tool.restore(store, f"{dest}/20260510T120000Z/store-0")
    assert set(result["restored"]) == {"shards/shard-000", "shards/shard-001", "shards/store.json",
                                       "keystore"}
    assert {i: _read_shard(store / "shards" / f"shard-{i:03d}") for i in range(2)} == before
    assert (store / "keystore" / "wal.log").read_bytes() == b"record\n" * 10
    assert not (store / "keystore" / "keys.arrow.tmp").exists()      # the restored dir is the backup's
    assert (Path(result["previous"]) / "keystore" / "wal.log").read_bytes() == b"garbage"


def test_restore_only_one_shard(tool, store, tmp_path):
    dest = str(tmp_path / "backups")
    tool.backup(store, dest, group="store-0", stamp="20260510T120000Z")
    _write_shard(store / "shards" / "shard-000", {b"zero-new": b"1"})
    _write_shard(store / "shards" / "shard-001", {b"one--new": b"1"})
    result = tool.restore(store, f"{dest}/20260510T120000Z/store-0", only=["shards/shard-001"])
    assert result["restored"] == ["shards/shard-001"]
    assert b"one--new" not in _read_shard(store / "shards" / "shard-001")
    assert b"zero-new" in _read_shard(store / "shards" / "shard-000")    # untouched


def test_corrupt_backup_is_refused_and_the_store_left_alone(tool, store, tmp_path):
    dest = tmp_path / "backups"
    tool.backup(store, str(dest), group="store-0", stamp="20260510T120000Z")
    victim = dest / "20260510T120000Z" / "store-0" / "shards" / "shard-000" / "data.mdb"
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(tool.CorruptBackupError):
        tool.verify(str(victim.parents[2]))
    _write_shard(store / "shards" / "shard-000", {b"keep-me!": b"1"})
    with pytest.raises(tool.CorruptBackupError):
        tool.restore(store, str(victim.parents[2]))
    assert b"keep-me!" in _read_shard(store / "shards" / "shard-000")


def test_incomplete_backups_are_ignored_and_old_ones_pruned(tool, store, tmp_path):
    dest = str(tmp_path / "backups")
    for stamp in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):
        tool.backup(store, dest, group="store-0", stamp=stamp)
    (tmp_path / "backups" / "20260104T000000Z" / "store-0").mkdir(parents=True)    # still running
    assert tool.latest_backup(dest, "store-0").endswith("20260103T000000Z/store-0")
    assert tool.prune(dest, keep=2) == ["20260101T000000Z"]
    assert [b["stamp"] for b in tool.list_backups(dest)] == ["20260102T000000Z", "20260103T000000Z",
                                                             "20260104T000000Z"]


def test_restore_refuses_a_shard_open_in_another_process(tool, store, tmp_path):
    dest = str(tmp_path / "backups")
    tool.backup(store, dest, group="store-0", stamp="20260510T120000Z")
    shard = store / "shards" / "shard-000"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import lmdb, sys, time; e = lmdb.open(sys.argv[1], max_dbs=4); "
         "print('open', flush=True); time.sleep(60)", str(shard)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert tool.lmdb_in_use(shard)
        with pytest.raises(tool.StoreToolError, match="open in another process"):
            tool.restore(store, f"{dest}/20260510T120000Z/store-0")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 5
    while tool.lmdb_in_use(shard) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tool.lmdb_in_use(shard)


def test_init_applies_a_restore_request_once(tool, store, tmp_path):
    dest = str(tmp_path / "backups")
    tool.backup(store, dest, group="store-0", stamp="20260510T120000Z")
    _write_shard(store / "shards" / "shard-000", {b"zero-new": b"1"})
    request = {"src": f"{dest}/20260510T120000Z/store-0", "only": ["shards/shard-000"]}
    (store / tool.REQUEST).write_text(json.dumps(request))
    assert tool.init(store, "store-0")["action"] == "restore-request"
    assert b"zero-new" not in _read_shard(store / "shards" / "shard-000")
    assert not (store / tool.REQUEST).exists() and list(store.glob(".restore-done-*.json"))
    assert tool.init(store, "store-0") == {"action": "none"}


def test_init_restores_an_empty_volume_from_the_newest_backup(tool, store, tmp_path, monkeypatch):
    dest = str(tmp_path / "backups")
    tool.backup(store, dest, group="store-0", stamp="20260510T120000Z")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert tool.init(fresh, "store-0") == {"action": "none"}          # not asked to
    monkeypatch.setenv("SRMOA_RESTORE_URI", dest)
    assert tool.init(fresh, "store-1")["action"] == "none"            # no backup of that group
    assert tool.init(fresh, "store-0")["action"] == "restore-empty"
    assert _read_shard(fresh / "shards" / "shard-001") == _read_shard(store / "shards" / "shard-001")
    assert tool.init(fresh, "store-0") == {"action": "none"}          # not empty any more


def test_init_moves_one_shard_onto_a_new_volume(tool, store, tmp_path, monkeypatch):
    """A new group's empty volume takes one shard from another group's newest backup."""
    dest = str(tmp_path / "backups")
    tool.backup(store, dest, group="store-0", stamp="20260510T120000Z")
    target = tmp_path / "store-1"
    target.mkdir()
    monkeypatch.setenv("SRMOA_RESTORE_URI", dest)
    monkeypatch.setenv("SRMOA_RESTORE_GROUP", "store-0")
    monkeypatch.setenv("SRMOA_RESTORE_ONLY", "shards/shard-001")
    assert tool.init(target, "store-1")["restored"] == ["shards/shard-001"]
    assert sorted(p.name for p in (target / "shards").iterdir()) == ["shard-001"]
    assert _read_shard(target / "shards" / "shard-001") == _read_shard(store / "shards" / "shard-001")


def test_cli_round_trip(tool, store, tmp_path, capsys):
    dest = str(tmp_path / "backups")
    assert tool.main(["backup", "--data", str(store), "--dest", dest, "--group", "g",
                      "--stamp", "20260510T120000Z"]) == 0
    assert json.loads(capsys.readouterr().out)["group"] == "g"
    assert tool.main(["list", "--dest", dest]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["complete"] and listed["groups"] == {"g": True}
    assert tool.main(["restore", "--data", str(store), "--src", f"{dest}/20260101T000000Z/g"]) == 1


def test_store_nodes_are_the_alive_ones_with_a_store_resource(tool):
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0, "srmoa_store": 100.0}},
             {"NodeID": "b", "Alive": False, "Resources": {"srmoa_store": 100.0}},
             {"NodeID": "c", "Alive": True, "Resources": {"GPU": 1.0}},
             {"NodeID": "d", "Alive": True, "Resources": {"CPU": 4.0, "srmoa_shard_3": 1.0}}]
    assert tool.store_nodes(nodes) == ["a", "d"]
