"""`ExpertStoreClient`: the expert store behind Ray actors, with the `ShardedExpertStore` batch API.

Callers never see Ray: `get_many(ids)` checks a per-process LRU cache of decoded experts, groups the
misses by shard (`placement.shard_of`, jump consistent hash), calls the shard actors in parallel, and
decodes the raw records on this side (zero-copy `np.frombuffer`).

Cache invalidation by version: a write through any client (`put_many`, `rollback`, `delete`)
publishes `{expert id: new version}` to the key-store actor's invalidation log *before* the edit's key
is updated, and every `search` a replica makes returns the log entries it has not seen yet
(`apply_invalidations`), so a replica that routes to an edited expert has already dropped its old
copy. A key-store restart changes its incarnation id and clears the cache. The log keeps only the last
`runtime.invalidation_log` entries: a client that fell further behind gets entries whose first seq is
not the next one it expects (a gap), and clears its whole cache. A fetch that raced with an
invalidation does not put its (possibly old) result in the cache.

Serving reads through `fetch_available`: a shard that does not answer in time (dead, restarting, on a
lost node) leaves its experts out instead of failing the request, which is then answered without them
and marked degraded (serve/engine.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class ExpertStoreClient:
    """Batch access to the shard actors of one store, with an LRU cache of decoded experts."""

    DOWN_RETRY_S = 2.0      # fetch_available: how long a shard that failed is left alone

    def __init__(self, shards: Sequence[Any], *, keystore: Any | None = None, cache_size: int = 4096,
                 timeout_s: float = 30.0) -> None:
        if not shards:
            raise ValueError("ExpertStoreClient needs at least one shard actor")
        self.shards = list(shards)
        self.keystore = keystore
        self.cache_size = int(cache_size)
        self.timeout_s = float(timeout_s)
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._tick = 0                       # bumped by each invalidation
        self._invalidated_at: dict[int, int] = {}
        self._all_at = -1                    # tick of the last invalidate-all
        self._incarnation: str | None = None
        self._seq = 0                        # last invalidation-log entry applied
        self.hits = 0
        self.misses = 0
        self.gaps = 0                        # whole-cache clears after a gap in the invalidation log
        self._down_until: dict[int, float] = {}   # shard -> monotonic time before which it is not asked

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    # -- placement ------------------------------------------------------------------------------------

    def shard_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        from srmoa_dist.experts.placement import shard_of

        return shard_of(np.asarray(ids, dtype=np.int64), self.n_shards)

    def _group(self, ids: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, s in zip(ids, self.shard_of(ids).tolist()):
            groups.setdefault(int(s), []).append(int(i))
        return groups

    def _get(self, refs: list[Any]) -> list[Any]:
        import ray

        return ray.get(refs, timeout=self.timeout_s)

    def _get_written(self, refs: list[Any]) -> list[Any]:
        """`_get` of write calls: a shard that is full raises its own ShardFullError / DiskFullError
        (its message says what to do), not Ray's wrapper, whose first line names only the actor."""
        from srmoa_dist.experts.shard import ShardFullError

        try:
            return self._get(refs)
        except ShardFullError as e:             # a RayTaskError(ShardFullError) is one too
            cause = getattr(e, "cause", None) or e
            raise type(cause)(str(cause)) from None

    # -- reads ----------------------------------------------------------------------------------------

    def get_raw_many(self, ids: Sequence[int]) -> list[bytes]:
        """Encoded records of `ids` (no cache); raises MissingExpertError naming missing ids."""
        ids = [int(i) for i in ids]
        found = self._fetch_raw(ids)
        missing = [i for i in ids if found.get(i) is None]
        if missing:
            raise _missing(missing)
        return [found[i] for i in ids]

    def fetch_raw(self, ids: Sequence[int]) -> dict[int, bytes | None]:
        """id -> encoded record, None for ids the store does not hold (no cache)."""
        return self._fetch_raw(ids)

    def _fetch_raw(self, ids: Sequence[int]) -> dict[int, bytes | None]:
        uniq = list(dict.fromkeys(int(i) for i in ids))
        if not uniq:
            return {}
        groups = self._group(uniq)
        refs = [self.shards[s].get_raw.remote(sub) for s, sub in groups.items()]
        out: dict[int, bytes | None] = {}
        for sub, raws in zip(groups.values(), self._get(refs)):
            out.update(zip(sub, raws))
        return out

    def fetch(self, ids: Sequence[int]) -> dict[int, Any]:
        """id -> decoded LoRAExpert for the ids the store holds (missing ids are left out, logged)."""
        return self._fetch(ids, None)[0]

    def fetch_available(self, ids: Sequence[int], timeout_s: float) -> tuple[dict[int, Any], list[int]]:
        """`fetch` that does not fail when a shard is unreachable: (experts, ids whose shard did not
        answer within `timeout_s`: dead, restarting, or on a lost node). A shard that failed is not
        asked again for `DOWN_RETRY_S` (its ids come back unavailable at once), so that serving
        degrades at once instead of waiting on every request."""
        return self._fetch(ids, float(timeout_s))

    def _fetch(self, ids: Sequence[int], tolerant_s: float | None) -> tuple[dict[int, Any], list[int]]:
        from srmoa_dist.experts.codec import decode_expert

        ids = [int(i) for i in ids if int(i) >= 0]
        out: dict[int, Any] = {}
        misses: list[int] = []
        with self._lock:
            for i in dict.fromkeys(ids):
                e = self._cache.get(i)
                if e is None:
                    misses.append(i)
                else:
                    self._cache.move_to_end(i)
                    out[i] = e
            self.hits += len(ids) - len(misses)
            self.misses += len(misses)
            start = self._tick
        unavailable: list[int] = []
        if misses:
            if tolerant_s is None:
                raws = self._fetch_raw(misses)
            else:
                raws, unavailable = self._fetch_raw_available(misses, tolerant_s)
            decoded = {}
            for i in misses:
                buf = raws.get(i)
                if buf is None:
                    continue
                decoded[i] = decode_expert(buf, expert_id=i, where=f"shard {int(self.shard_of([i])[0])}")
            gone = set(unavailable)
            absent = [i for i in misses if i not in decoded and i not in gone]
            if absent:
                log.warning("experts %s are routed to but not in the store", absent[:8])
            out.update(decoded)
            self._cache_put(decoded, start)
        return out, unavailable

    def _fetch_raw_available(self, ids: list[int],
                             timeout_s: float) -> tuple[dict[int, bytes | None], list[int]]:
        """`_fetch_raw` over the shards that answer in time; (records, ids of the shards that did not)."""
        import time

        import ray
        from ray.exceptions import RayActorError

        now = time.monotonic()
        groups = self._group(ids)
        down = {s for s in groups if self._down_until.get(s, 0.0) > now}
        asked = {s: self.shards[s].get_raw.remote(sub) for s, sub in groups.items() if s not in down}
        ready: list[Any] = []
        if asked:
            ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=timeout_s)
        ready_set = set(ready)
        out: dict[int, bytes | None] = {}
        for s, ref in asked.items():
            if ref in ready_set:
                try:
                    out.update(zip(groups[s], ray.get(ref)))
                    self._down_until.pop(s, None)
                    continue
                except RayActorError as e:   # dead, restarting, or its node lost
                    why = type(e).__name__
            else:
                why = f"no answer in {timeout_s:g} s"
            down.add(s)
            self._down_until[s] = time.monotonic() + self.DOWN_RETRY_S
            log.warning("shard %d is unavailable (%s): serving without its experts", s, why)
        return out, [i for s in sorted(down) for i in groups[s]]

    def get_many(self, ids: Sequence[int]) -> list[Any]:
        """Decoded experts in the order of `ids`; raises MissingExpertError naming missing ids."""
        ids = [int(i) for i in ids]
        got = self.fetch(ids)
        missing = [i for i in ids if i not in got]
        if missing:
            raise _missing(missing)
        return [got[i] for i in ids]

    def _per_id(self, method: str, ids: Sequence[int]) -> list[Any]:
        """A per-id read of the shard actors (`method` takes a list of ids, answers one value each), in
        the order of `ids`: one call per shard touched, all in flight together."""
        ids = [int(i) for i in ids]
        groups = self._group(ids)
        refs = [getattr(self.shards[s], method).remote(sub) for s, sub in groups.items()]
        by_id: dict[int, Any] = {}
        for sub, vals in zip(groups.values(), self._get(refs)):
            by_id.update(zip(sub, vals))
        return [by_id[i] for i in ids]

    def versions(self, ids: Sequence[int]) -> list[int | None]:
        """Current version of each id; None for an id the store does not hold."""
        return self._per_id("versions", ids)

    def relations(self, ids: Sequence[int]) -> list[Any]:
        """Each id's `ExpertRelation` (record headers only, no cache); None for an id the store does not
        hold or an expert without one."""
        return self._per_id("relations", ids)

    def contains(self, ids: Sequence[int]) -> list[bool]:
        return self._per_id("contains", ids)

    def __len__(self) -> int:
        return int(sum(self._get([s.size.remote() for s in self.shards])))

    def stats(self) -> dict[str, Any]:
        shards = self._get([s.stats.remote() for s in self.shards])
        n = int(sum(int(s.get("experts", s.get("entries", 0))) for s in shards))
        return {"shards": shards, "experts": n,
                "cache": self.cache_stats()}

    # -- writes ---------------------------------------------------------------------------------------

    def put_many(self, items: Mapping[int, Any]) -> dict[int, int]:
        """Store experts (new version of each; the previous one is kept). Returns id -> new version."""
        from srmoa_dist.experts.codec import encode_expert

        return self.put_raw_many({int(i): encode_expert(e) for i, e in items.items()})

    def put_raw_many(self, items: Mapping[int, bytes]) -> dict[int, int]:
        items = {int(i): bytes(b) for i, b in items.items()}
        if not items:
            return {}
        from srmoa_dist.experts.shard import ShardFullError

        groups = self._group(list(items))
        # a batch over several shards is all or nothing: a shard that is full refuses its part, and the
        # parts other shards wrote are put back from snapshots taken before
        snaps: dict[int, Any] = {}
        if len(groups) > 1:
            snaps = dict(zip(groups, self._get([self.shards[s].snapshot.remote(sub)
                                                for s, sub in groups.items()])))
        refs = {s: self.shards[s].put_raw.remote({i: items[i] for i in sub}) for s, sub in groups.items()}
        versions: dict[int, int] = {}
        full: Exception | None = None
        written: list[int] = []
        for s, ref in refs.items():
            try:
                [v] = self._get_written([ref])
            except ShardFullError as e:
                full = e
                continue
            versions.update(v)
            written.append(s)
        if full is not None:
            if written and snaps:
                self._get([self.shards[s].restore.remote(snaps[s]) for s in written])
                log.warning("a full shard refused a batch: undid its writes to %d other shard(s)",
                            len(written))
            raise full
        self.publish(versions)
        return versions

    def delete(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        groups = self._group(ids)
        self._get([self.shards[s].delete.remote(sub) for s, sub in groups.items()])
        self.publish({i: -1 for i in ids})

    def rollback(self, expert_id: int) -> int:
        """Restore the previous version of one expert; returns the restored version."""
        s = int(self.shard_of([expert_id])[0])
        v = int(self._get_written([self.shards[s].rollback.remote(int(expert_id))])[0])
        self.publish({int(expert_id): v})
        return v

    def close(self) -> None:
        """Nothing to release on this side (the actors own the LMDB files)."""

    # -- cache ----------------------------------------------------------------------------------------

    def _cache_put(self, experts: Mapping[int, Any], start_tick: int) -> None:
        if self.cache_size <= 0 or not experts:
            return
        with self._lock:
            for i, e in experts.items():
                if self._all_at > start_tick or self._invalidated_at.get(i, -1) > start_tick:
                    continue          # invalidated while we fetched: the copy may be old
                self._cache[i] = e
                self._cache.move_to_end(i)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def invalidate(self, ids: Iterable[int] | None = None) -> None:
        """Drop cached copies of `ids` (all when None)."""
        with self._lock:
            self._tick += 1
            if ids is None:
                self._cache.clear()
                self._invalidated_at.clear()
                self._all_at = self._tick
                return
            for i in ids:
                i = int(i)
                self._cache.pop(i, None)
                self._invalidated_at[i] = self._tick
            if len(self._invalidated_at) > 4 * max(self.cache_size, 1024):
                self._invalidated_at = dict(list(self._invalidated_at.items())[-max(self.cache_size, 1024):])

    def publish(self, versions: Mapping[int, int]) -> None:
        """After a write (id -> new version; -1 deleted): drop our copies and tell every replica
        through the key store's invalidation log."""
        self.invalidate(versions)
        if self.keystore is not None and versions:
            self._get([self.keystore.publish_versions.remote({int(k): int(v) for k, v in versions.items()})])

    def apply_invalidations(self, incarnation: str, entries: Sequence[tuple[int, int, int]]) -> None:
        """Apply the key-store's invalidation-log entries (seq, expert id, version) newer than ours;
        entries that do not start right after the last seq we applied (a gap) clear the whole cache."""
        restarted = incarnation != self._incarnation
        if restarted:
            if self._incarnation is not None:
                log.info("key store restarted (incarnation %s): clearing the expert cache", incarnation)
            self.invalidate(None)
            self._incarnation = incarnation
            self._seq = 0
        fresh = [(s, i) for s, i, _ in entries if s > self._seq]
        if not fresh:
            return
        first = min(s for s, _ in fresh)
        if not restarted and first > self._seq + 1:  # entries in between fell out of the log
            log.warning("expert-cache invalidations %d..%d are no longer in the key store's log: clearing "
                        "the whole expert cache", self._seq + 1, first - 1)
            self.invalidate(None)
            self.gaps += 1
        else:
            self.invalidate(i for _, i in fresh)
        self._seq = max(s for s, _ in fresh)

    @property
    def seen_seq(self) -> int:
        return self._seq

    @property
    def incarnation(self) -> str | None:
        return self._incarnation

    def refresh(self) -> None:
        """Pull the invalidations published since the last search (no-op without a key store)."""
        if self.keystore is None:
            return
        inc, entries = self._get([self.keystore.invalidations_since.remote(self._incarnation, self._seq)])[0]
        self.apply_invalidations(inc, entries)

    def cache_stats(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {"size": len(self._cache), "capacity": self.cache_size, "hits": self.hits,
                "misses": self.misses, "invalidation_gaps": self.gaps,
                "hit_rate": (self.hits / total) if total else 0.0}


def _missing(ids: list[int]) -> Exception:
    try:
        from srmoa_dist.experts.shard import MissingExpertError

        return MissingExpertError(ids)
    except Exception:   # pragma: no cover - the shard module defines it
        return KeyError(f"experts not in the store: {ids}")


__all__ = ["ExpertStoreClient"]
