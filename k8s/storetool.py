#!/usr/bin/env python3
"""Back up, restore and check the persistent store of one srmoa store node.

A store node (a pod of a KubeRay ``store-*`` worker group, or a launcher node with the store
resources) keeps all state that must outlive it on one single-writer volume at
``/data``::

    /data/shards/shard-NNN/        LMDB environments, one per expert shard
    /data/shards/store.json        the shard count
    /data/keystore/ /data/ledger/  key-store snapshot + write-ahead log, edit ledger

``model_cache/``, ``lost+found/`` and dot-entries are not backed up (rebuilt, or ours).

A backup is ``DEST/<stamp>/<group>/<relpath>`` plus ``DEST/<stamp>/<group>/manifest.json``, written
last: a backup without a manifest is incomplete and ignored. Each LMDB environment is copied with
``env.copy(compact=True)`` (one read transaction: a consistent copy of a live shard, free pages
dropped), staged on the same volume one shard at a time, then uploaded. Other files are copied as
they are and the copy is redone until no file was replaced, removed, added or shrunk while it ran;
append-only logs may grow meanwhile, leaving a torn last record exactly as a crash would.
DEST is a local path or any URI ``pyarrow.fs`` understands (``s3://``, ``gs://``, ``hdfs://``).

Commands (``python storetool.py <command> --help``)::

    backup          one node:   --data /data --dest URI [--group G] [--stamp S]
    backup-cluster  Ray job:    every alive store node (a srmoa_store / srmoa_keystore /
                                srmoa_shard_<i> resource) runs `backup`; --keep N
    restore         one node, writers stopped:  --data /data --src URI/<stamp>/<group> [--only REL]...
    init            initContainer: apply /data/.restore-request.json if present; else, with
                    SRMOA_RESTORE_URI set and an empty volume, restore the newest backup of the group
                    (or of SRMOA_RESTORE_GROUP, only SRMOA_RESTORE_ONLY: how a shard moves)
    list            complete backups under a DEST
    verify          re-read one backup and check every size and sha256

This file depends on lmdb and pyarrow only (ray for backup-cluster), not on srmoa_dist, so it also
runs against an image or a volume whose package version differs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("srmoa.storetool")

FORMAT = 1
MANIFEST = "manifest.json"
REQUEST = ".restore-request.json"
STAGING = ".backup-staging"
LMDB_DATA = "data.mdb"
LMDB_LOCK = "lock.mdb"
STORE_RESOURCE = "srmoa_store"
SKIP_TOP = frozenset({"model_cache", "lost+found"})
STAMP_RE = re.compile(r"^\d{8}T\d{6}Z$")
CHUNK = 8 << 20
MAX_COPY_TRIES = 5


class StoreToolError(RuntimeError):
    """A backup or restore that cannot go on; the message says why and what was left untouched."""


class CorruptBackupError(StoreToolError):
    """A backed-up file whose size or sha256 differs from its manifest."""


# -- locations -------------------------------------------------------------------------------------


def utc_stamp(now: dt.datetime | None = None) -> str:
    """Sortable UTC stamp of a backup, e.g. 20260510T120000Z."""
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def open_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) of a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


@dataclass(frozen=True)
class Plan:
    """What `backup` copies, as paths relative to the data root."""

    lmdb_dirs: tuple[str, ...]   # directories holding a data.mdb
    files: tuple[str, ...]       # every other regular file, outside those directories


def scan(data: Path) -> Plan:
    """Walk the data root: LMDB environments and plain files (skips SKIP_TOP, dot-entries, *.tmp)."""
    lmdb_dirs: list[str] = []
    files: list[str] = []
    if not data.is_dir():
        raise StoreToolError(f"data root {data} is not a directory")
    for top in sorted(data.iterdir()):
        if top.name in SKIP_TOP or top.name.startswith("."):
            continue
        if top.is_file():
            if not top.name.endswith(".tmp"):
                files.append(top.name)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(data).as_posix()
            if LMDB_DATA in filenames:
                lmdb_dirs.append(rel_dir)
                dirnames[:] = []          # an environment is one unit; nothing below it is ours
                continue
            files.extend(f"{rel_dir}/{f}" for f in sorted(filenames)
                         if not f.startswith(".") and not f.endswith(".tmp"))
    return Plan(tuple(lmdb_dirs), tuple(files))


def has_store_data(data: Path) -> bool:
    plan = scan(data) if data.is_dir() else Plan((), ())
    return bool(plan.lmdb_dirs or plan.files)


# -- copying ---------------------------------------------------------------------------------------


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _upload(fs: Any, src: Path, dest: str) -> dict[str, Any]:
    """Stream one local file to the backup; size and sha256 of the bytes actually sent."""
    fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as f, fs.open_output_stream(dest) as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}


def copy_lmdb(env_dir: Path, out_dir: Path) -> Path:
    """Compacting copy of a (possibly live) LMDB environment into out_dir; returns its data.mdb."""
    import lmdb

    out_dir.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(env_dir), readonly=True, lock=True, subdir=True, max_dbs=64, create=False)
    try:
        env.copy(str(out_dir), compact=True)
    finally:
        env.close()
    return out_dir / LMDB_DATA


def _changed(before: dict[str, tuple[int, int, int] | None], after: dict[str, tuple[int, int, int] | None],
             now_present: set[str]) -> list[str]:
    """Files replaced, removed, added or shrunk between two fingerprints (growth alone is fine)."""
    bad = sorted(now_present - set(before))
    for rel, fp in before.items():
        cur = after.get(rel)
        if fp is None or cur is None or cur[0] != fp[0] or cur[1] < fp[1]:
            bad.append(rel)
    return bad


def backup(data: Path, dest: str, *, group: str, stamp: str | None = None,
           staging: Path | None = None) -> dict[str, Any]:
    """Copy one node's store to DEST/<stamp>/<group>/; returns the manifest (written last)."""
    stamp = stamp or utc_stamp()
    if not STAMP_RE.match(stamp):
        raise StoreToolError(f"stamp must look like 20260510T120000Z, got {stamp!r}")
    fs, base = open_fs(dest)
    root = join(base, stamp, group)
    stage_root = (staging or data / STAGING) / stamp
    plan = scan(data)
    entries: dict[str, dict[str, Any]] = {}
    try:
        for rel in plan.lmdb_dirs:                       # one shard staged at a time
            stage = stage_root / rel
            shutil.rmtree(stage, ignore_errors=True)
            copied = copy_lmdb(data / rel, stage)
            entry = {"kind": "lmdb", **_upload(fs, copied, join(root, rel, LMDB_DATA))}
            entries[f"{rel}/{LMDB_DATA}"] = entry
            shutil.rmtree(stage, ignore_errors=True)
            log.info("backed up LMDB %s (%d bytes)", rel, entry["size"])
    finally:
        shutil.rmtree(stage_root, ignore_errors=True)
    plain = list(plan.files)
    for attempt in range(1, MAX_COPY_TRIES + 1):
        before = {rel: _fingerprint(data / rel) for rel in plain}
        copied_files: dict[str, dict[str, Any]] = {}
        for rel in plain:
            if before[rel] is not None:
                try:
                    copied_files[rel] = {"kind": "file", **_upload(fs, data / rel, join(root, rel))}
                except FileNotFoundError:
                    pass                                   # removed under us: caught by the re-check
        fresh = scan(data).files
        after = {rel: _fingerprint(data / rel) for rel in fresh}
        bad = _changed(before, after, set(fresh))
        if not bad:
            entries.update(copied_files)
            break
        log.info("files changed during copy (attempt %d): %s; copying again", attempt, bad[:5])
        plain = list(fresh)
    else:
        raise StoreToolError(f"files under {data} kept changing during {MAX_COPY_TRIES} copies; "
                             "no manifest written, so this backup stays incomplete")
    manifest = {
        "format": FORMAT, "stamp": stamp, "group": group, "host": socket.gethostname(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(), "files": entries,
    }
    with fs.open_output_stream(join(root, MANIFEST)) as out:
        out.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    log.info("backup %s complete: %d files, %d bytes", join(root), len(entries),
             sum(e["size"] for e in entries.values()))
    return manifest


# -- listing ---------------------------------------------------------------------------------------


def list_backups(dest: str) -> list[dict[str, Any]]:
    """Every stamp under DEST with its groups; complete = every group has its manifest."""
    import pyarrow.fs as pafs

    fs, base = open_fs(dest)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not STAMP_RE.match(info.base_name):
            continue
        groups = {}
        for g in fs.get_file_info(pafs.FileSelector(info.path)):
            if g.type == pafs.FileType.Directory:
                groups[g.base_name] = fs.get_file_info(join(g.path, MANIFEST)).type == pafs.FileType.File
        out.append({"stamp": info.base_name, "uri": join(dest, info.base_name), "groups": groups,
                    "complete": bool(groups) and all(groups.values())})
    return sorted(out, key=lambda b: b["stamp"])


def latest_backup(dest: str, group: str) -> str | None:
    """URI of the newest complete backup of one group, or None."""
    for b in reversed(list_backups(dest)):
        if b["groups"].get(group):
            return join(b["uri"], group)
    return None


def prune(dest: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete backups (and incomplete ones older than those)."""
    if keep <= 0:
        return []
    backups = list_backups(dest)
    complete = [b["stamp"] for b in backups if b["complete"]]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    fs, base = open_fs(dest)
    gone = [b["stamp"] for b in backups if b["stamp"] < oldest_kept]
    for stamp in gone:
        fs.delete_dir(join(base, stamp))
    log.info("pruned %d old backups under %s", len(gone), dest)
    return gone


# -- restoring -------------------------------------------------------------------------------------


def _read_manifest(fs: Any, root: str) -> dict[str, Any]:
    try:
        with fs.open_input_stream(join(root, MANIFEST)) as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError) as exc:
        raise StoreToolError(f"no readable {MANIFEST} at {root} ({exc}): incomplete or wrong backup path "
                             "(expected DEST/<stamp>/<group>)") from None
    if manifest.get("format") != FORMAT:
        raise StoreToolError(f"{root}: manifest format {manifest.get('format')!r}, this tool reads {FORMAT}")
    return manifest


def _download(fs: Any, src: str, dest: Path, expect: dict[str, Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    n = 0
    with fs.open_input_stream(src) as f, open(dest, "wb") as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            n += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if n != expect["size"] or h.hexdigest() != expect["sha256"]:
        raise CorruptBackupError(f"{src}: {n} bytes sha256 {h.hexdigest()[:12]}, manifest says "
                                 f"{expect['size']} bytes sha256 {expect['sha256'][:12]}")


def units_of(files: dict[str, dict[str, Any]], selected: Iterable[str]) -> list[str]:
    """Paths swapped as wholes: LMDB environment dirs; top-level dirs free of LMDB; else single files."""
    lmdb_dirs = {rel.rsplit("/", 1)[0] for rel, e in files.items() if e["kind"] == "lmdb"}
    units = set()
    for rel in selected:
        if files[rel]["kind"] == "lmdb":
            units.add(rel.rsplit("/", 1)[0])
            continue
        top = rel.split("/", 1)[0]
        mixed = any(d == top or d.startswith(top + "/") for d in lmdb_dirs)
        units.add(rel if mixed or "/" not in rel else top)
    return sorted(units)


def lmdb_in_use(env_dir: Path) -> bool:
    """True when another process has this LMDB environment open (it holds a lock on lock.mdb)."""
    lock = env_dir / LMDB_LOCK
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return True
        raise
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        return False
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(data: Path, src: str, *, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Replace units of the store with a verified backup; what was there moves to .pre-restore-<stamp>/.

    Every writer of the restored units must be stopped (run it in the init container, or in a pod
    that mounts the volume while no store pod runs); a live LMDB environment is refused.
    """
    fs, root = open_fs(src)
    manifest = _read_manifest(fs, root)
    files: dict[str, dict[str, Any]] = manifest["files"]
    if only:
        prefixes = [o.strip("/") for o in only]
        selected = [r for r in files if any(r == p or r.startswith(p + "/") for p in prefixes)]
        if not selected:
            raise StoreToolError(f"nothing in {src} matches {list(only)}; it holds {sorted(files)[:10]}")
    else:
        selected = list(files)
    units = units_of(files, selected)
    if only:   # a unit pulls in all its files, so a partial selection never leaves a mixed directory
        selected = [r for r in files if any(r == u or r.startswith(u + "/") for u in units)]
    busy = [u for u in units if (data / u).is_dir() and lmdb_in_use(data / u)]
    if busy:
        raise StoreToolError(f"LMDB environments {busy} under {data} are open in another process: stop "
                             "the store actors (restore from the init container, see k8s/README.md)")
    stamp = manifest["stamp"]
    tmp = data / f".restore-{stamp}"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in selected:
        _download(fs, join(root, rel), tmp / rel, files[rel])
    for rel in selected:
        if files[rel]["kind"] == "lmdb":
            import lmdb

            env = lmdb.open(str((tmp / rel).parent), readonly=True, lock=False, subdir=True, max_dbs=64)
            try:
                env.stat()
            finally:
                env.close()
    previous = data / f".pre-restore-{utc_stamp()}"
    moved = []
    for unit in units:
        target = data / unit
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            (previous / unit).parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, previous / unit)
            moved.append(unit)
        os.replace(tmp / unit, target)
        _fsync_dir(target.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("restored %s from %s (previous copies in %s)", units, src, previous if moved else "-")
    return {"restored": units, "src": src, "stamp": stamp, "previous": str(previous) if moved else None}


def init(data: Path, group: str) -> dict[str, Any]:
    """Init-container step: an explicit restore request first, else restore-if-empty, else nothing.

    Restore-if-empty reads SRMOA_RESTORE_URI (where the backups are), SRMOA_RESTORE_GROUP (whose
    backup: default this group) and SRMOA_RESTORE_ONLY (comma-separated paths: default all); it acts
    only on a volume without store data, so it runs once for a new or replaced volume.
    """
    req = data / REQUEST
    if req.exists():
        request = json.loads(req.read_text())
        result = restore(data, request["src"], only=request.get("only"))
        done = data / f".restore-done-{utc_stamp()}.json"
        done.write_text(json.dumps({**request, **result}, indent=1))
        req.unlink()
        return {"action": "restore-request", **result}
    uri = os.environ.get("SRMOA_RESTORE_URI", "").strip()
    if uri and not has_store_data(data):
        source = os.environ.get("SRMOA_RESTORE_GROUP", "").strip() or group
        only = [p for p in os.environ.get("SRMOA_RESTORE_ONLY", "").split(",") if p.strip()] or None
        src = latest_backup(uri, source)
        if src is None:
            log.warning("empty volume and no complete backup of group %r under %s: starting empty",
                        source, uri)
            return {"action": "none", "reason": "no backup"}
        return {"action": "restore-empty", **restore(data, src, only=only)}
    return {"action": "none"}


def verify(src: str) -> dict[str, Any]:
    """Re-read every file of one backup and check its size and sha256."""
    fs, root = open_fs(src)
    manifest = _read_manifest(fs, root)
    for rel, e in manifest["files"].items():
        h = hashlib.sha256()
        n = 0
        with fs.open_input_stream(join(root, rel)) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
        if n != e["size"] or h.hexdigest() != e["sha256"]:
            raise CorruptBackupError(f"{join(root, rel)} differs from its manifest")
    files = manifest["files"]
    return {"ok": True, "files": len(files), "bytes": sum(e["size"] for e in files.values())}


# -- the cluster-wide backup (a Ray job) -------------------------------------------------------------


def is_store_resource(name: str) -> bool:
    return name in (STORE_RESOURCE, "srmoa_keystore") or name.startswith("srmoa_shard_")


def store_nodes(nodes: Iterable[dict[str, Any]]) -> list[str]:
    """Node ids of the alive Ray nodes holding a store volume (srmoa_store, srmoa_keystore, srmoa_shard_*)."""
    return [n["NodeID"] for n in nodes if n.get("Alive")
            and any(is_store_resource(r) and v > 0 for r, v in n.get("Resources", {}).items())]


def _node_backup(data: str, dest: str, stamp: str) -> dict[str, Any]:
    group = os.environ.get("SRMOA_STORE_GROUP") or socket.gethostname()
    manifest = backup(Path(data), dest, group=group, stamp=stamp)
    return {"group": group, "files": len(manifest["files"]),
            "bytes": sum(e["size"] for e in manifest["files"].values())}


def backup_cluster(dest: str, *, data: str = "/data", keep: int = 0) -> dict[str, Any]:
    """Back up every store node at one stamp (run as a Ray job, e.g. by the srmoa-backup CronJob)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
    nodes = store_nodes(ray.nodes())
    if not nodes:
        raise StoreToolError("no alive Ray node advertises a store resource (srmoa_store, srmoa_shard_<i>)")
    stamp = utc_stamp()
    task = ray.remote(num_cpus=0, max_retries=0)(_node_backup)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
            .remote(data, dest, stamp) for n in nodes]
    results = ray.get(refs)
    groups = [r["group"] for r in results]
    if len(set(groups)) != len(groups):
        raise StoreToolError(f"two store nodes report the same SRMOA_STORE_GROUP: {groups}")
    pruned = prune(dest, keep)
    return {"stamp": stamp, "nodes": results, "pruned": pruned}


# -- command line ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    group_default = os.environ.get("SRMOA_STORE_GROUP") or socket.gethostname()

    b = sub.add_parser("backup", help="back up this node's store")
    b.add_argument("--data", type=Path, default=Path("/data"))
    b.add_argument("--dest", required=True)
    b.add_argument("--group", default=group_default)
    b.add_argument("--stamp")
    bc = sub.add_parser("backup-cluster", help="back up every store node (a Ray job)")
    bc.add_argument("--dest", required=True)
    bc.add_argument("--data", default="/data")
    bc.add_argument("--keep", type=int, default=0, help="keep the newest N complete backups (0 = all)")
    r = sub.add_parser("restore", help="restore this node's store (writers stopped)")
    r.add_argument("--data", type=Path, default=Path("/data"))
    r.add_argument("--src", required=True, help="DEST/<stamp>/<group>")
    r.add_argument("--only", action="append", help="a relative path to restore (repeatable)")
    i = sub.add_parser("init", help="init container: restore request or restore-if-empty")
    i.add_argument("--data", type=Path, default=Path("/data"))
    i.add_argument("--group", default=group_default)
    ls = sub.add_parser("list", help="backups under DEST")
    ls.add_argument("--dest", required=True)
    v = sub.add_parser("verify", help="check one backup's checksums")
    v.add_argument("--src", required=True)

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s storetool: %(message)s")
    try:
        if args.cmd == "backup":
            out: Any = backup(args.data, args.dest, group=args.group, stamp=args.stamp)
        elif args.cmd == "backup-cluster":
            out = backup_cluster(args.dest, data=args.data, keep=args.keep)
        elif args.cmd == "restore":
            out = restore(args.data, args.src, only=args.only)
        elif args.cmd == "init":
            out = init(args.data, args.group)
        elif args.cmd == "list":
            out = list_backups(args.dest)
        else:
            out = verify(args.src)
    except StoreToolError as exc:
        log.error("%s", exc)
        return 1
    sys.stdout.write(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
