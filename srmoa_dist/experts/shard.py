"""One LMDB shard of experts.

Layout: one LMDB environment (a directory with ``data.mdb`` and ``lock.mdb``) with two named
databases, ``experts`` (the current record of each expert) and ``prev`` (the record it replaced, kept
so that an edit can be rolled back). Key = the expert id as 8 bytes big-endian (so LMDB's byte order
is id order); value = a record in the format of :mod:`srmoa_dist.experts.codec`.

Versions: the first put of an id stores version 1, each later put stores the current version + 1 and
moves the current record to ``prev``. :meth:`ExpertShard.rollback` restores ``prev`` (with its own,
older version number) and drops it; there is one level of history. A version number is therefore not
a content id across rollbacks: caches must be invalidated explicitly on commit and rollback.

Reads: :meth:`get_many` reads a batch in one read transaction with ``getmulti`` on a ``buffers=True``
transaction. LMDB buffers are valid only until the transaction ends, so each value is copied exactly
once, to ``bytes``, inside the transaction; decoding is then zero-copy over those bytes (the arrays
are read-only views that keep them alive).

Writes: one write transaction per batch (``putmulti``). Durable by default (``sync=True``: fsync at
every commit); ``StoreConfig.durable=False`` turns fsync off for bulk loads and :meth:`sync` (also
called by :meth:`close`) flushes explicitly. A full map doubles (up to ``store.max_map_size_mb``) and
the batch is retried; past the limit :class:`ShardFullError` says which setting to raise. A full
filesystem (LMDB reports ENOSPC, or EIO for the short write that filled the disk) is a
:class:`DiskFullError` saying how much room is left. Either way the write transaction is aborted: the
batch wrote nothing (no version moved, nothing in ``prev``), and reads and smaller writes go on.

Processes: LMDB environments must not cross a ``fork``. Open a shard in the process that uses it
(the Ray layer opens shards inside its actors), never before forking; a shard refuses to be pickled
and refuses use from a process other than the one that opened it. Within a process, reads may run on
several threads, concurrently with one writer; writes are serialised by a lock, and a map
resize waits until no read transaction is open (remapping under a reader is unsafe). py-lmdb
refuses to open one environment twice in a process: close a shard before reopening it (and a process
forked while a shard is open cannot open that shard at all).
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from srmoa_dist.config import StoreConfig
from srmoa_dist.experts.codec import (
    Buffer,
    CorruptExpertError,
    decode_expert,
    decode_relation,
    encode_expert,
    read_header,
    restamp,
    verify_record,
)
from srmoa_dist.experts.expert import ExpertRelation, LoRAExpert

log = logging.getLogger(__name__)

MiB = 1 << 20
_MAX_ID = (1 << 63) - 1
_DB_EXPERTS = b"experts"
_DB_PREV = b"prev"
T = TypeVar("T")


class MissingExpertError(KeyError):
    """Some requested expert ids are not stored. ``.ids`` lists them (in request order, unique)."""

    def __init__(self, ids: Iterable[int], where: str = "") -> None:
        self.ids = list(dict.fromkeys(int(i) for i in ids))
        self.where = where
        shown = self.ids[:20]
        more = f" (+{len(self.ids) - 20} more)" if len(self.ids) > 20 else ""
        loc = f" in {where}" if where else ""
        self.message = f"{len(self.ids)} expert id(s) not found{loc}: {shown}{more}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class NoPreviousVersionError(LookupError):
    """rollback() on an expert that has no previous version kept."""


class ShardFullError(RuntimeError):
    """The shard cannot take the batch: its LMDB map reached ``store.max_map_size_mb``. Nothing of the
    batch was written."""


class DiskFullError(ShardFullError):
    """The filesystem holding the shard is full (ENOSPC). Nothing of the batch was written."""


# Free bytes under which an LMDB I/O error on write is taken for a full filesystem (a short write that
# filled the disk comes back as EIO, not ENOSPC).
_LOW_DISK_BYTES = 4 * MiB


def _disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether a write error means the filesystem is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, lmdb.DiskError) or "No space left" in str(exc):
        return True
    free = _disk_free(path)
    return isinstance(exc, lmdb.Error) and "Input/output error" in str(exc) and free is not None \
        and free < _LOW_DISK_BYTES


def expert_key(expert_id: int) -> bytes:
    """Expert id -> 8-byte big-endian LMDB key (ids are 0 .. 2**63 - 1, like FAISS ids)."""
    i = int(expert_id)
    if not 0 <= i <= _MAX_ID:
        raise ValueError(
            f"expert id must be in [0, 2**63), got {expert_id!r}"
            + (" (the key store returns -1 for 'no expert': filter those out)" if i == -1 else "")
        )
    return i.to_bytes(8, "big")


def _keys(ids: Iterable[int]) -> list[bytes]:
    return [expert_key(i) for i in ids]


class _ResizeGuard:
    """Readers share it; a map resize holds it alone (remapping under a live read txn is unsafe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    def __enter__(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True  # new readers wait from here on
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class ExpertShard:
    """One LMDB environment of experts with a batch API. See the module docstring."""

    def __init__(self, path: str | Path, cfg: StoreConfig, readonly: bool = False) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.readonly = readonly
        self._where = f"shard {self.path}"
        self._pid = os.getpid()
        self._wlock = threading.Lock()
        self._guard = _ResizeGuard()
        self._max_map = cfg.max_map_size_mb * MiB
        if readonly and not (self.path / "data.mdb").exists():
            raise FileNotFoundError(
                f"no expert shard at {self.path} (data.mdb missing); cannot open it read-only"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._env: lmdb.Environment | None = lmdb.open(
            str(self.path),
            map_size=cfg.map_size_mb * MiB,
            subdir=True,
            readonly=readonly,
            lock=True,
            max_dbs=4,
            readahead=False,  # random reads: do not pull neighbouring pages
            sync=cfg.durable,
            metasync=cfg.durable,
            create=not readonly,
        )
        try:
            self._db = self._env.open_db(_DB_EXPERTS, create=not readonly)
            self._prev = self._env.open_db(_DB_PREV, create=not readonly)
        except lmdb.NotFoundError:
            self._env.close()
            raise FileNotFoundError(
                f"{self.path} is not an expert shard (no '{_DB_EXPERTS.decode()}' db)"
            ) from None
        if not readonly:
            # A grown shard reopens at its data size (LMDB's minimum): resume the doubling sequence.
            cur, size = self.map_size, cfg.map_size_mb * MiB
            while size < cur:
                size *= 2
            if min(size, self._max_map) > cur:
                self._env.set_mapsize(min(size, self._max_map))
        log.debug("opened %s (map %d MiB, durable=%s)", self._where, self.map_size // MiB, cfg.durable)

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise RuntimeError(f"{self._where} is closed")
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"{self._where} was opened in process {self._pid} and used in process {os.getpid()}: "
                "LMDB environments must not cross fork(); open the shard in the process that uses it"
            )
        return self._env

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def __getstate__(self) -> Any:
        raise TypeError(
            f"ExpertShard ({self.path}) cannot be pickled: open it inside the process that uses it"
        )

    def _read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        env = self.env
        while True:
            try:
                with self._guard, env.begin(buffers=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                with self._guard.exclusive():
                    env.set_mapsize(0)

    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run fn in one write transaction; on a full map, grow and rerun it (fn must be rerunnable)."""
        if self.readonly:
            raise PermissionError(f"{self._where} is open read-only")
        env = self.env
        with self._wlock:
            while True:
                try:
                    with env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    with self._guard.exclusive():
                        env.set_mapsize(0)
                except (lmdb.Error, OSError) as exc:
                    if not _is_disk_full(exc, self.path):
                        raise
                    raise self._disk_full(exc) from None

    def _disk_full(self, exc: BaseException) -> DiskFullError:
        free = _disk_free(self.path)
        room = f"{free // 1024} KiB free" if free is not None else "free space unknown"
        log.error("%s: write failed, the filesystem is full (%s): %s", self._where, room, exc)
        return DiskFullError(
            f"{self._where} cannot be written: its filesystem is full ({room}; {exc}). Nothing of this "
            "batch was written; free disk space there (or move store.root to a larger disk) and retry"
        )

    def _grow(self) -> None:
        cur = self.map_size
        if cur >= self._max_map:
            raise ShardFullError(
                f"{self._where} is full: its LMDB map reached {cur // MiB} MiB = store.max_map_size_mb "
                f"({self.cfg.max_map_size_mb}); raise "
                "store.max_map_size_mb in the config (it reserves address space, not disk) and reopen the "
                "store; nothing of this batch was written"
            ) from None
        new = min(cur * 2, self._max_map)
        log.info("%s: map full at %d MiB, growing to %d MiB", self._where, cur // MiB, new // MiB)
        with self._guard.exclusive():
            self.env.set_mapsize(new)

    # -- writes -----------------------------------------------------------------------------------
    def put_many(self, items: Mapping[int, LoRAExpert]) -> dict[int, int]:
        """Store a batch in one transaction: id -> new version (the replaced record is kept in prev)."""
        for i, e in items.items():
            if not isinstance(e, LoRAExpert):
                raise TypeError(f"put_many: value for expert {i} is a {type(e).__name__}, not a LoRAExpert")
        return self._put(items, lambda e, i, v: encode_expert(e, version=v))

    def put_raw_many(self, items: Mapping[int, Buffer]) -> dict[int, int]:
        """Store encoded records (checked: header and crc) in one transaction; versions are restamped."""
        for i, buf in items.items():
            verify_record(buf, expert_id=int(i), where=f"put_raw_many input for {self._where}")
        return self._put(items, lambda buf, i, v: restamp(buf, v, expert_id=i, where=self._where))

    def _put(self, items: Mapping[int, Any], make: Callable[[Any, int, int], bytes]) -> dict[int, int]:
        if not items:
            return {}
        order = sorted((expert_key(i), int(i), v) for i, v in items.items())

        def run(txn: lmdb.Transaction) -> dict[int, int]:
            cur = txn.cursor(self._db)
            old = dict(cur.getmulti([k for k, _, _ in order]))
            # LMDB buffers die with the next write: copy the replaced records before writing.
            prev_items = []
            versions: dict[int, int] = {}
            new_items = []
            for k, i, v in order:
                o = old.get(k)
                if o is None:
                    ver = 1
                else:
                    o = bytes(o)
                    try:
                        ver = read_header(o, expert_id=i, where=self._where)[0]["ver"] + 1
                        prev_items.append((k, o))
                    except CorruptExpertError as exc:  # overwriting repairs it; keep no corrupt prev
                        log.warning("%s; overwriting it with version 1", exc)
                        txn.delete(k, db=self._prev)
                        ver = 1
                versions[i] = ver
                new_items.append((k, make(v, i, ver)))
            if prev_items:
                txn.cursor(self._prev).putmulti(prev_items)
            # Keys past the current last key are appended (MDB_APPEND): full pages instead of the
            # half-full ones a mid-page split leaves, and no comparisons (bulk loads of rising ids).
            last = bytes(cur.key()) if cur.last() else b""
            split = bisect.bisect_right(new_items, last, key=lambda kv: kv[0])
            if split:
                cur.putmulti(new_items[:split])
            if split < len(new_items):
                cur.putmulti(new_items[split:], append=True)
            return versions

        out = self._write(run)
        return {int(i): out[int(i)] for i in items}

    def delete(self, ids: Sequence[int], *, missing_ok: bool = True) -> int:
        """Delete experts (current and previous versions); returns how many were stored."""
        keys = _keys(ids)

        def run(txn: lmdb.Transaction) -> int:
            missing = [i for i, k in zip(ids, keys, strict=True) if txn.get(k, db=self._db) is None]
            if missing and not missing_ok:
                raise MissingExpertError(missing, self._where)
            n = 0
            for k in set(keys):
                n += txn.delete(k, db=self._db)
                txn.delete(k, db=self._prev)
            return n

        return self._write(run)

    def rollback(self, expert_id: int) -> int:
        """Restore the previous version of an expert (and drop it from prev); returns its version."""
        k = expert_key(expert_id)

        def run(txn: lmdb.Transaction) -> int:
            if txn.get(k, db=self._db) is None:
                raise MissingExpertError([expert_id], self._where)
            prev = txn.get(k, db=self._prev)
            if prev is None:
                raise NoPreviousVersionError(
                    f"expert {expert_id} in {self._where} has no previous version to restore"
                )
            prev = bytes(prev)
            ver = verify_record(prev, expert_id=int(expert_id), where=f"{self._where} (prev)")["ver"]
            txn.put(k, prev, db=self._db)
            txn.delete(k, db=self._prev)
            return ver

        ver = self._write(run)
        log.info("%s: rolled expert %d back to version %d", self._where, expert_id, ver)
        return ver

    def snapshot(self, ids: Sequence[int]) -> dict[int, tuple[bytes | None, bytes | None]]:
        """id -> (current record, previous record), None where absent: what :meth:`restore` puts back."""
        keys = _keys(ids)

        def run(txn: lmdb.Transaction) -> dict[int, tuple[bytes | None, bytes | None]]:
            out = {}
            for i, k in zip(ids, keys, strict=True):
                cur, prev = txn.get(k, db=self._db), txn.get(k, db=self._prev)
                out[int(i)] = (None if cur is None else bytes(cur), None if prev is None else bytes(prev))
            return out

        return self._read(run)

    def restore(self, snap: Mapping[int, tuple[bytes | None, bytes | None]]) -> None:
        """Put back the records of a :meth:`snapshot` exactly (versions included), in one transaction."""

        def run(txn: lmdb.Transaction) -> None:
            for i, (cur, prev) in snap.items():
                k = expert_key(i)
                for db, val in ((self._db, cur), (self._prev, prev)):
                    if val is None:
                        txn.delete(k, db=db)
                    else:
                        txn.put(k, val, db=db)

        self._write(run)

    def sync(self) -> None:
        """Flush to disk (needed after non-durable writes; a no-op cost when durable)."""
        if not self.readonly:
            self.env.sync(True)

    # -- reads ------------------------------------------------------------------------------------
    def _fetch(self, ids: Sequence[int], db: Any) -> list[bytes]:
        keys = _keys(ids)

        def run(txn: lmdb.Transaction) -> dict[bytes, bytes]:
            found = txn.cursor(db).getmulti(sorted(set(keys)))
            return {bytes(k): bytes(v) for k, v in found}  # the one copy, inside the txn

        got = self._read(run)
        if len(got) != len(set(keys)):
            raise MissingExpertError([i for i, k in zip(ids, keys, strict=True) if k not in got], self._where)
        return [got[k] for k in keys]

    def get_raw_many(self, ids: Sequence[int], *, verify: bool = False) -> list[bytes]:
        """Encoded records in the order of `ids` (for moving bytes without decoding).
        `verify=True` checks each crc here; otherwise the eventual decode does."""
        raw = self._fetch(ids, self._db)
        if verify:
            for i, b in zip(ids, raw, strict=True):
                verify_record(b, expert_id=int(i), where=self._where)
        return raw

    def get_many(self, ids: Sequence[int]) -> list[LoRAExpert]:
        """Decoded experts in the order of `ids` (duplicates allowed). Raises MissingExpertError
        naming every missing id, CorruptExpertError naming a damaged one."""
        raw = self._fetch(ids, self._db)
        return [decode_expert(b, expert_id=int(i), where=self._where) for i, b in zip(ids, raw, strict=True)]

    def get_previous(self, expert_id: int) -> LoRAExpert:
        """The version rollback() would restore."""
        try:
            (raw,) = self._fetch([expert_id], self._prev)
        except MissingExpertError:
            raise NoPreviousVersionError(
                f"expert {expert_id} in {self._where} has no previous version"
            ) from None
        return decode_expert(raw, expert_id=int(expert_id), where=f"{self._where} (prev)")

    def versions(self, ids: Sequence[int]) -> list[int]:
        """Current version of each id (MissingExpertError for unknown ids)."""
        keys = _keys(ids)

        def run(txn: lmdb.Transaction) -> list[int | None]:
            out: list[int | None] = []
            for i, k in zip(ids, keys, strict=True):
                v = txn.get(k, db=self._db)
                if v is not None:
                    v = read_header(v, expert_id=int(i), where=self._where)[0]["ver"]
                out.append(v)
            return out

        vers = self._read(run)
        missing = [i for i, v in zip(ids, vers, strict=True) if v is None]
        if missing:
            raise MissingExpertError(missing, self._where)
        return vers  # type: ignore[return-value]

    def relations(self, ids: Sequence[int]) -> list[ExpertRelation | None]:
        """Each id's relation (`decode_relation`, headers only), None for an id this shard does not hold
        or an expert without one."""
        keys = _keys(ids)

        def run(txn: lmdb.Transaction) -> list[ExpertRelation | None]:
            out: list[ExpertRelation | None] = []
            for i, k in zip(ids, keys, strict=True):
                v = txn.get(k, db=self._db)
                out.append(None if v is None else decode_relation(v, expert_id=int(i), where=self._where))
            return out

        return self._read(run)

    def contains(self, ids: Sequence[int]) -> list[bool]:
        keys = _keys(ids)

        def run(txn: lmdb.Transaction) -> set[bytes]:
            return {bytes(k) for k in txn.cursor(self._db).getmulti(sorted(set(keys)), values=False)}

        found = self._read(run)
        return [k in found for k in keys]

    def ids(self) -> list[int]:
        """All stored ids, ascending."""

        def run(txn: lmdb.Transaction) -> list[int]:
            return [int.from_bytes(k, "big") for k in txn.cursor(self._db).iternext(keys=True, values=False)]

        return self._read(run)

    def __len__(self) -> int:
        return self._read(lambda txn: txn.stat(self._db)["entries"])

    def __contains__(self, expert_id: object) -> bool:
        return isinstance(expert_id, int) and self.contains([expert_id])[0]

    def stats(self) -> dict[str, Any]:
        """entries, prev_entries, map_size, used_bytes, page_size, path, durable, readonly."""
        env = self.env
        info, st = env.info(), env.stat()

        def run(txn: lmdb.Transaction) -> tuple[int, int]:
            return txn.stat(self._db)["entries"], txn.stat(self._prev)["entries"]

        entries, prev_entries = self._read(run)
        return {
            "path": str(self.path),
            "entries": entries,
            "prev_entries": prev_entries,
            "map_size": info["map_size"],
            "max_map_size": self._max_map,
            "used_bytes": (info["last_pgno"] + 1) * st["psize"],
            "page_size": st["psize"],
            "durable": self.cfg.durable,
            "readonly": self.readonly,
        }

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush (when not durable) and close; idempotent."""
        if self._env is None:
            return
        if os.getpid() == self._pid:
            if not self.readonly and not self.cfg.durable:
                self._env.sync(True)
            self._env.close()
        self._env = None

    @property
    def closed(self) -> bool:
        return self._env is None

    def __enter__(self) -> ExpertShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._env is None else "open"
        return f"ExpertShard({str(self.path)!r}, {state})"


__all__ = [
    "CorruptExpertError",
    "DiskFullError",
    "ExpertShard",
    "MissingExpertError",
    "NoPreviousVersionError",
    "ShardFullError",
    "expert_key",
]
