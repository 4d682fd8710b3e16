"""A local store over ``cfg.n_shards`` LMDB shards (no Ray): ``root/shard-000``, ``root/shard-001``, ...

Ids are placed by jump consistent hash (:mod:`srmoa_dist.experts.placement`). Every batch call
groups its ids by shard, runs one transaction per shard touched, and returns results in the
caller's order. A batch spanning several shards is atomic per shard, not across shards, with one
exception: a put that one shard refuses for lack of room (:class:`ShardFullError`, a full map or a
full disk) undoes the shards the batch already wrote, so a full store never holds half a batch.

``root/store.json`` records the shard count; opening with another ``n_shards`` is refused, since
changing it moves ids between shards (a migration, not a config edit).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from srmoa_dist.config import StoreConfig
from srmoa_dist.experts.codec import Buffer
from srmoa_dist.experts.expert import ExpertRelation, LoRAExpert
from srmoa_dist.experts.placement import shard_of
from srmoa_dist.experts.shard import ExpertShard, MissingExpertError, ShardFullError, expert_key

log = logging.getLogger(__name__)

META_FILE = "store.json"
META_FORMAT = 1
T = TypeVar("T")


def shard_dir_name(k: int) -> str:
    return f"shard-{k:03d}"


def _write_meta(root: Path, n_shards: int) -> None:
    tmp = root / (META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": META_FORMAT, "n_shards": n_shards, "placement": "jump"}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / META_FILE)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_store_meta(root: str | Path, cfg: StoreConfig, readonly: bool = False) -> None:
    """Check `root`'s recorded shard count against cfg (ValueError on a mismatch); record it when new."""
    root = Path(root)
    meta_path = root / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            n = int(meta["n_shards"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{meta_path} is unreadable ({exc}); it records the store's shard count"
            ) from None
        if n != cfg.n_shards:
            raise ValueError(
                f"the expert store at {root} has {n} shards but store.n_shards is {cfg.n_shards}: "
                f"set store.n_shards: {n} (changing the shard count moves experts between shards; "
                "resharding is a migration, not a config change)"
            )
        return
    existing = sorted(p.name for p in root.glob("shard-*") if p.is_dir()) if root.exists() else []
    if existing and len(existing) != cfg.n_shards:
        raise ValueError(
            f"{root} holds {len(existing)} shard directories but no {META_FILE}, and store.n_shards is "
            f"{cfg.n_shards}: refusing to guess (resharding is a migration)"
        )
    if readonly:
        raise FileNotFoundError(f"no expert store at {root} ({META_FILE} missing); cannot open it read-only")
    root.mkdir(parents=True, exist_ok=True)
    _write_meta(root, cfg.n_shards)




class ShardedExpertStore:
    """The ExpertShard batch API over ``cfg.n_shards`` shards under `root`."""

    def __init__(self, root: str | Path, cfg: StoreConfig, *, readonly: bool = False) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.n_shards = cfg.n_shards
        ensure_store_meta(self.root, cfg, readonly)
        self.shards: list[ExpertShard] = []
        try:
            for k in range(cfg.n_shards):
                self.shards.append(ExpertShard(self.root / shard_dir_name(k), cfg, readonly=readonly))
        except BaseException:
            self.close()
            raise

    # -- placement --------------------------------------------------------------------------------
    def shard_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Shard index of each id (int64 array)."""
        return shard_of(np.asarray(ids, dtype=np.int64), self.n_shards)

    def _groups(self, ids: Sequence[int]) -> Iterator[tuple[int, list[int], list[int]]]:
        """(shard index, positions in `ids`, ids) for each shard touched, after validating ids."""
        ids = [int(i) for i in ids]
        for i in ids:
            expert_key(i)  # validates the range with a clear error
        if self.n_shards == 1:
            if ids:
                yield 0, list(range(len(ids))), ids
            return
        where = self.shard_of(ids)
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for pos, (i, s) in enumerate(zip(ids, where.tolist(), strict=True)):
            g = groups.setdefault(s, ([], []))
            g[0].append(pos)
            g[1].append(i)
        for s, (pos, sub) in groups.items():
            yield s, pos, sub

    def _gather(self, ids: Sequence[int], method: str, **kw: Any) -> list[Any]:
        out: list[Any] = [None] * len(ids)
        missing: list[int] = []
        for s, pos, sub in self._groups(ids):
            try:
                vals = getattr(self.shards[s], method)(sub, **kw)
            except MissingExpertError as exc:
                missing.extend(exc.ids)
                continue
            for p, v in zip(pos, vals, strict=True):
                out[p] = v
        if missing:
            bad = set(missing)
            raise MissingExpertError([i for i in ids if int(i) in bad], f"expert store {self.root}")
        return out

    def _split(self, items: Mapping[int, Any]) -> dict[int, dict[int, Any]]:
        keys = list(items)
        per: dict[int, dict[int, Any]] = {}
        for s, _, sub in self._groups(keys):
            per[s] = {i: items[i] for i in sub}
        return per

    # -- batch API --------------------------------------------------------------------------------
    def put_many(self, items: Mapping[int, LoRAExpert]) -> dict[int, int]:
        """id -> new version. One transaction per shard touched (see the module docstring on a full one)."""
        return self._put(items, "put_many")

    def put_raw_many(self, items: Mapping[int, Buffer]) -> dict[int, int]:
        return self._put(items, "put_raw_many")

    def _put(self, items: Mapping[int, Any], method: str) -> dict[int, int]:
        per = self._split(items)
        out: dict[int, int] = {}
        written: list[tuple[int, dict[int, tuple[bytes | None, bytes | None]]]] = []
        for s, sub in per.items():
            snap = self.shards[s].snapshot(list(sub)) if len(per) > 1 else {}
            try:
                out.update(getattr(self.shards[s], method)(sub))
            except ShardFullError:
                for w, before in reversed(written):
                    self.shards[w].restore(before)
                if written:
                    log.warning("a full shard refused a batch: undid its writes to %d other shard(s)",
                                len(written))
                raise
            written.append((s, snap))
        return {int(i): out[int(i)] for i in items}

    def get_many(self, ids: Sequence[int]) -> list[LoRAExpert]:
        """Experts in the caller's order; MissingExpertError names every missing id over all shards."""
        return self._gather(ids, "get_many")

    def get_raw_many(self, ids: Sequence[int], *, verify: bool = False) -> list[bytes]:
        return self._gather(ids, "get_raw_many", verify=verify)

    def versions(self, ids: Sequence[int]) -> list[int]:
        return self._gather(ids, "versions")

    def contains(self, ids: Sequence[int]) -> list[bool]:
        return self._gather(ids, "contains")

    def relations(self, ids: Sequence[int]) -> list[ExpertRelation | None]:
        """Each id's relation (headers only); None for a missing id or an expert without one."""
        return self._gather(ids, "relations")

    def delete(self, ids: Sequence[int], *, missing_ok: bool = True) -> int:
        n = 0
        for s, _, sub in self._groups(ids):
            n += self.shards[s].delete(sub, missing_ok=missing_ok)
        return n

    def rollback(self, expert_id: int) -> int:
        return self.shard_for(expert_id).rollback(expert_id)

    def get_previous(self, expert_id: int) -> LoRAExpert:
        return self.shard_for(expert_id).get_previous(expert_id)

    def shard_for(self, expert_id: int) -> ExpertShard:
        expert_key(expert_id)
        return self.shards[int(self.shard_of([expert_id])[0])]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def stats(self) -> dict[str, Any]:
        """Totals plus per-shard stats."""
        per = [s.stats() for s in self.shards]
        return {
            "root": str(self.root),
            "n_shards": self.n_shards,
            "entries": sum(p["entries"] for p in per),
            "prev_entries": sum(p["prev_entries"] for p in per),
            "used_bytes": sum(p["used_bytes"] for p in per),
            "map_size": sum(p["map_size"] for p in per),
            "shards": per,
        }

    def sync(self) -> None:
        for s in self.shards:
            s.sync()

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> ShardedExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedExpertStore({str(self.root)!r}, n_shards={self.n_shards})"
