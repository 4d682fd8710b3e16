"""`ShardActor`: one LMDB expert shard inside a Ray actor, moving raw expert records.

The LMDB environment is opened in the actor's constructor, inside the actor process (never before a
fork). Values cross the actor boundary as the encoded record bytes of `experts/codec.py`; callers
decode them (zero-copy) on their side. Created by `bootstrap.ensure_actors` with `max_restarts` (a
restarted actor reopens the same LMDB file) and `max_task_retries` for reads; writes are not retried
automatically (`max_task_retries=0` per method): a write whose actor died is reported to the caller.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from srmoa_dist.config import StoreConfig

log = logging.getLogger(__name__)


@ray.remote
class ShardActor:
    """Batch get/put/delete/versions/rollback over one `ExpertShard`."""

    def __init__(self, path: str, cfg: StoreConfig, index: int) -> None:
        from srmoa_dist.experts.shard import ExpertShard

        self.path = str(Path(path))
        self.index = int(index)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._shard = ExpertShard(self.path, cfg)
        log.info("shard %d open at %s (%d experts, pid %d)", self.index, self.path, len(self._shard),
                 os.getpid())

    def info(self) -> dict[str, Any]:
        return {"name": f"shard-{self.index}", "index": self.index, "path": self.path, "pid": os.getpid(),
                "experts": len(self._shard)}

    def ping(self) -> bool:
        return True

    # -- reads (idempotent: retried across restarts) ---------------------------------------------------

    def get_raw(self, ids: Sequence[int]) -> list[bytes | None]:
        """Encoded records of `ids`, None for an id this shard does not hold."""
        from srmoa_dist.experts.shard import MissingExpertError

        ids = [int(i) for i in ids]
        try:
            return list(self._shard.get_raw_many(ids))
        except MissingExpertError as e:
            gone = set(e.ids)
        have = [i for i in dict.fromkeys(ids) if i not in gone]
        raw = dict(zip(have, self._shard.get_raw_many(have))) if have else {}
        return [raw.get(i) for i in ids]

    def versions(self, ids: Sequence[int]) -> list[int | None]:
        """Current version of each id, None for an id this shard does not hold."""
        from srmoa_dist.experts.shard import MissingExpertError

        ids = [int(i) for i in ids]
        try:
            return [int(v) for v in self._shard.versions(ids)]
        except MissingExpertError as e:
            gone = set(e.ids)
        have = [i for i in dict.fromkeys(ids) if i not in gone]
        vs = dict(zip(have, self._shard.versions(have))) if have else {}
        return [int(vs[i]) if i in vs else None for i in ids]

    def contains(self, ids: Sequence[int]) -> list[bool]:
        return [bool(b) for b in self._shard.contains([int(i) for i in ids])]

    def relations(self, ids: Sequence[int]) -> list[Any]:
        """Each id's `ExpertRelation` (record headers only), None where this shard holds no record or
        the expert has none."""
        return self._shard.relations([int(i) for i in ids])

    def size(self) -> int:
        return len(self._shard)

    def stats(self) -> dict[str, Any]:
        return {"index": self.index, "path": self.path, **self._shard.stats()}

    def snapshot(self, ids: Sequence[int]) -> dict[int, tuple[bytes | None, bytes | None]]:
        """id -> (current record, previous record): what `restore` puts back (a batch's undo)."""
        return self._shard.snapshot([int(i) for i in ids])

    # -- writes (not retried) -------------------------------------------------------------------------

    @ray.method(max_task_retries=0)
    def restore(self, snap: Mapping[int, tuple[bytes | None, bytes | None]]) -> None:
        """Put back the records of a `snapshot` exactly, in one transaction."""
        self._shard.restore({int(k): v for k, v in snap.items()})

    @ray.method(max_task_retries=0)
    def put_raw(self, items: Mapping[int, bytes]) -> dict[int, int]:
        """Store encoded records; returns id -> new version (the previous version is kept)."""
        versions = self._shard.put_raw_many({int(k): v for k, v in items.items()})
        return {int(k): int(v) for k, v in versions.items()}

    @ray.method(max_task_retries=0)
    def delete(self, ids: Sequence[int]) -> None:
        self._shard.delete([int(i) for i in ids])

    @ray.method(max_task_retries=0)
    def rollback(self, expert_id: int) -> int:
        """Restore the previous version of one expert; returns the restored version."""
        return int(self._shard.rollback(int(expert_id)))

    def close(self) -> None:
        self._shard.close()


__all__ = ["ShardActor"]
