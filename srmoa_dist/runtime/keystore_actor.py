"""`KeyStoreActor`: the routing keys of one store in a named Ray actor.

- `search` answers a batch of queries (one FAISS search) and hands back, in the same reply, the
  expert-cache invalidations the caller has not seen yet (see `runtime/client.py`).
- `record` takes the activations (q, ids, gates) of served requests without the caller waiting
  (fire-and-forget), stamped with the (incarnation, slot epoch) that `search` returned. A slot that was
  freed and reused after that search belongs to another expert now: its entries are dropped, so a late
  activation never pulls the new owner's key; a batch from a previous incarnation is dropped whole.
  A background thread consolidates what has accumulated every
  `runtime.consolidate_interval_s` (gravity + index update + WAL, one batch) and writes a snapshot every
  `runtime.snapshot_interval_s` when keys changed.
- Writes of committed keys (`add`, `update`, `pin`, `free`) go through the KeyStore's write-ahead log
  before the call returns; on a restart (`max_restarts`) the constructor recovers snapshot + log.
- Retries: the actor is created with `runtime.max_task_retries`, and Ray resubmits a call that was in
  flight when the actor died to its restarted incarnation. `free` is idempotent (a slot already free is
  skipped, logged), so a retried free is harmless. `add` is never retried by Ray (a retry after the
  first try was logged would take a second slot): the caller sees the failure. A caller that resubmits
  an `add` itself passes the same `request_id`: the actor remembers the last `MAX_ADD_REQUESTS`
  request ids (in memory, per incarnation) and answers a repeat with the ids of the first.

The actor is threaded (`max_concurrency` > 1) so a search is not queued behind a slow call; one lock
serialises every access to the (not thread-safe) KeyStore.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray

from srmoa_dist.config import GravityConfig, KeyStoreConfig, RuntimeConfig

log = logging.getLogger(__name__)

MAX_PENDING_ROWS = 65_536      # activations waiting for consolidation; older ones are dropped past this
MAX_ADD_REQUESTS = 4096        # recent `add` request ids remembered (request id -> slot ids)


@ray.remote
class KeyStoreActor:
    """Batched search, asynchronous consolidation, periodic snapshots over one `KeyStore`."""

    def __init__(self, path: str, cfg: KeyStoreConfig, gravity: GravityConfig,
                 runtime: RuntimeConfig) -> None:
        from srmoa_dist.routing.keystore import KeyStore
        from srmoa_dist.runtime.keystore_metrics import KeyStoreMetrics

        t0 = time.perf_counter()
        self.path = str(path)
        self.cfg = cfg
        self.runtime = runtime
        os.makedirs(self.path, exist_ok=True)
        self._ks = KeyStore.open(self.path, cfg, gravity)
        self._lock = threading.RLock()
        self.incarnation = uuid.uuid4().hex
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, int | None]] = []
        self._pending_rows = 0
        self._dropped = 0
        self._dropped_stale = 0                     # activation entries of a since-reused slot
        self._epoch = 0                             # slot lifecycle events (add, free) so far
        self._born = np.zeros(0, dtype=np.int64)    # (N,) epoch of each slot's last add or free
        self._consolidations = 0
        self._consolidated_rows = 0
        self._last_consolidation: dict[str, Any] = {}
        self._dirty = False
        self._snapshots = 0
        self._last_snapshot = time.monotonic()
        self._seq = 0
        self._inval: deque[tuple[int, int, int]] = deque(maxlen=runtime.invalidation_log)
        self._add_requests: OrderedDict[str, np.ndarray] = OrderedDict()   # request id -> slot ids
        self._searches = 0
        self._queries = 0
        self._metrics = KeyStoreMetrics(store=runtime.namespace)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="keystore-consolidate", daemon=True)
        self._thread.start()
        log.info("key store open at %s: %d keys, recovered in %.2f s (pid %d, incarnation %s)",
                 self.path, len(self._ks), time.perf_counter() - t0, os.getpid(), self.incarnation)

    def info(self) -> dict[str, Any]:
        return {"name": "keystore", "path": self.path, "pid": os.getpid(), "incarnation": self.incarnation,
                "keys": len(self._ks)}

    def ping(self) -> bool:
        return True

    # -- routing --------------------------------------------------------------------------------------

    def search(self, xq: np.ndarray, k: int | None = None, tau: float | None = None,
               incarnation: str | None = None, since: int = 0,
               namespaces: Sequence[Sequence[str]] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, str, list[tuple[int, int, int]], int]:
        """D, I = top-k per query (ids under tau are -1), this incarnation, the invalidations after
        `since`, and the slot epoch (pass the incarnation and epoch back to `record`). namespaces:
        per query row the namespaces it may reach (None: every key)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if xq.ndim == 1:
            xq = xq[None, :]
        with self._lock:
            t0 = time.perf_counter()
            D, I = self._ks.search(xq, k, tau=tau, namespaces=namespaces)
            self._metrics.search(time.perf_counter() - t0)
            self._searches += 1
            self._queries += xq.shape[0]
            epoch = self._epoch
        return D, I, self.incarnation, self._entries_since(incarnation, since), epoch

    def _entries_since(self, incarnation: str | None, since: int) -> list[tuple[int, int, int]]:
        """Invalidation entries (seq, expert id, version) after `since`, oldest first, with consecutive
        seqs. The log keeps the last `runtime.invalidation_log` entries: when `since` is older than the
        oldest one kept, the first entry returned has a seq above since + 1, which tells the caller
        that entries were lost (a gap) and that it must drop its whole cache."""
        if incarnation != self.incarnation:
            since = 0
        with self._lock:
            fresh = self._seq - since
            if fresh <= 0:
                return []
            out = list(itertools.islice(reversed(self._inval), fresh))[::-1]   # O(fresh), not O(log)
        if out and out[0][0] > since + 1 and since > 0:
            log.info("invalidation log gap: a caller at seq %d is behind the oldest entry kept (%d); "
                     "it will drop its whole expert cache", since, out[0][0])
        return out

    def record(self, queries: np.ndarray, ids: np.ndarray, gates: np.ndarray,
               incarnation: str | None = None, epoch: int | None = None) -> None:
        """Queue served activations (q (n, d_key), ids (n, k) with -1 = none, gates (n, k)), routed by
        the search that returned (incarnation, epoch); without them no slot-reuse check is made."""
        queries = np.asarray(queries, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        gates = np.asarray(gates, dtype=np.float32)
        if queries.ndim != 2 or ids.shape != gates.shape or ids.shape[0] != queries.shape[0]:
            log.warning("record: bad activation shapes q %s ids %s gates %s; dropped",
                        queries.shape, ids.shape, gates.shape)
            return
        with self._lock:
            if incarnation is not None and incarnation != self.incarnation:
                self._dropped_stale += int((ids >= 0).sum())    # slot epochs restarted with this actor
                return
            self._pending.append((queries, ids, gates, epoch))
            self._pending_rows += queries.shape[0]
            while self._pending_rows > MAX_PENDING_ROWS and len(self._pending) > 1:
                q, _, _, _ = self._pending.pop(0)
                self._pending_rows -= q.shape[0]
                self._dropped += q.shape[0]

    def flush(self) -> dict[str, Any]:
        """Consolidate what is pending now (tests, shutdown); returns the consolidation's stats."""
        return self._consolidate()

    def _consolidate(self) -> dict[str, Any]:
        from srmoa_dist.routing.gravity import Activations

        with self._lock:
            batch, self._pending, self._pending_rows = self._pending, [], 0
            if not batch:
                return {}
            kmax = max(b[1].shape[1] for b in batch)
            q = np.concatenate([b[0] for b in batch])
            ids = np.concatenate([_pad(self._drop_reused(b[1], b[3]), kmax, -1) for b in batch])
            g = np.concatenate([_pad(b[2], kmax, 0.0) for b in batch])
            t0 = time.perf_counter()
            st = self._ks.consolidate(Activations(queries=q, ids=ids, gates=g))
            self._consolidations += 1
            self._consolidated_rows += q.shape[0]
            self._dirty = True
            out = _as_dict(st)
            out["rows"] = int(q.shape[0])
            out["seconds"] = time.perf_counter() - t0
            self._last_consolidation = out
            self._metrics.consolidation(out)
            return out

    def _drop_reused(self, ids: np.ndarray, epoch: int | None) -> np.ndarray:
        """ids (n, k) with the entries of slots added or freed after `epoch` set to -1."""
        if epoch is None:
            return ids
        born = np.zeros(ids.shape, dtype=np.int64)                               # (n, k)
        known = (ids >= 0) & (ids < self._born.size)
        born[known] = self._born[ids[known]]
        reused = born > epoch
        if reused.any():
            self._dropped_stale += int(reused.sum())
            ids = np.where(reused, -1, ids)
        return ids

    def _mark_lifecycle(self, ids: np.ndarray) -> None:
        """A slot got a new owner (add) or lost one (free): later activations from before are stale."""
        self._epoch += 1
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and ids.max() >= self._born.size:
            grown = np.zeros(max(int(ids.max()) + 1, 2 * self._born.size), dtype=np.int64)
            grown[: self._born.size] = self._born
            self._born = grown
        self._born[ids] = self._epoch

    def _loop(self) -> None:
        interval = self.runtime.consolidate_interval_s
        while not self._stop.wait(interval):
            try:
                self._consolidate()
                if self._metrics.due():
                    with self._lock:
                        self._metrics.gauges(self._ks)
                if self._dirty and time.monotonic() - self._last_snapshot >= self.runtime.snapshot_interval_s:
                    self.snapshot()
            except Exception:
                log.exception("background consolidation failed (will retry)")

    # -- committed writes (logged before returning) ---------------------------------------------------

    @ray.method(max_task_retries=0)
    def add(self, keys: np.ndarray, pinned: bool = False, request_id: str | None = None,
            namespace: str = "default") -> np.ndarray:
        """Add keys (n, d_key) to `namespace`; returns their slot ids. Not retried by Ray; a repeat of
        `request_id` (a caller's own resubmission) returns the first call's ids without adding again."""
        keys = np.asarray(keys, dtype=np.float32)
        with self._lock:
            if request_id is not None:
                seen = self._add_requests.get(request_id)
                if seen is not None:
                    n = keys.shape[0] if keys.ndim == 2 else 1
                    if seen.size != n:
                        raise ValueError(f"add request_id {request_id!r} was used for {seen.size} key(s), "
                                         f"now for {n}: use a new request id for a new request")
                    self._add_requests.move_to_end(request_id)
                    log.info("add: request %s repeated; answering its slot ids %s", request_id,
                             seen[:8].tolist())
                    return seen.copy()
            self._dirty = True
            ids = self._ks.add(keys, pinned=pinned, namespace=namespace)
            self._mark_lifecycle(ids)
            if request_id is not None:
                self._add_requests[request_id] = np.asarray(ids, dtype=np.int64).copy()
                while len(self._add_requests) > MAX_ADD_REQUESTS:
                    self._add_requests.popitem(last=False)
            return ids

    def update(self, ids: Sequence[int], keys: np.ndarray) -> None:
        with self._lock:
            self._dirty = True
            self._ks.update(np.asarray(ids, dtype=np.int64), np.asarray(keys, dtype=np.float32))

    def free(self, ids: Sequence[int]) -> None:
        """Free slots; idempotent: ids already free (or never allocated) are skipped and logged, so a
        retried free is a no-op. A negative id is a ValueError."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size and ids[0] < 0:
            raise ValueError(f"free: slot ids must be >= 0, got {ids[ids < 0][:8].tolist()}")
        with self._lock:
            active = np.isin(ids, self._ks.active_ids())
            if not active.all():
                log.info("free: slot(s) %s already free; skipped (a retried or repeated free)",
                         ids[~active][:8].tolist())
            ids = ids[active]
            if ids.size == 0:
                return
            self._dirty = True
            self._ks.free(ids)
            self._mark_lifecycle(ids)

    def pin(self, ids: Sequence[int], pinned: bool = True) -> None:
        with self._lock:
            self._dirty = True
            self._ks.pin(np.asarray(ids, dtype=np.int64), pinned)

    def get(self, ids: Sequence[int]) -> np.ndarray:
        with self._lock:
            return self._ks.get(np.asarray(ids, dtype=np.int64))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Any other public KeyStore method, under the lock (for the trainer's KeyStore proxy)."""
        if method.startswith("_"):
            raise AttributeError(f"KeyStore.{method} is private")
        if method in ("add", "free"):           # the actor's own: they mark slot lifecycles
            return getattr(self, method)(*args, **kwargs)
        with self._lock:
            if method in ("add", "update", "free", "pin", "consolidate", "snapshot", "set_namespace"):
                self._dirty = True
            return getattr(self._ks, method)(*args, **kwargs)

    def snapshot(self) -> None:
        with self._lock:
            self._ks.snapshot()
            self._dirty = False
            self._snapshots += 1
            self._last_snapshot = time.monotonic()

    def size(self) -> int:
        return len(self._ks)

    # -- cache invalidation log -----------------------------------------------------------------------

    def publish_versions(self, versions: Mapping[int, int]) -> int:
        """Record that experts changed (id -> new version, -1 deleted); returns the last sequence number."""
        with self._lock:
            for i, v in versions.items():
                self._seq += 1
                self._inval.append((self._seq, int(i), int(v)))
            return self._seq

    def invalidations_since(self, incarnation: str | None, since: int
                            ) -> tuple[str, list[tuple[int, int, int]]]:
        """This incarnation and the invalidation entries after `since` (see `_entries_since`: a first
        seq above since + 1 reports a gap)."""
        return self.incarnation, self._entries_since(incarnation, since)

    def key_info(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """Per id: key norm, usage, pinned, key version (None for a free or unknown slot)."""
        out: list[dict[str, Any] | None] = []
        with self._lock:
            active = set(self._ks.active_ids().tolist())
            for i in ids:
                i = int(i)
                if i not in active:
                    out.append(None)
                    continue
                key = self._ks.get([i])[0]
                out.append({"norm": float(np.linalg.norm(key)), "usage": float(self._ks.usage([i])[0]),
                            "pinned": bool(self._ks.is_pinned([i])[0]),
                            "namespace": self._ks.namespace_of([i])[0],
                            "key_version": int(self._ks.versions([i])[0])})
        return out

    def keyspace(self) -> dict[str, Any]:
        """Every active key at once, under the lock (the /ui map; see `projection.key_dump`)."""
        from srmoa_dist.routing.projection import key_dump

        with self._lock:
            return key_dump(self._ks)

    # -- small shared files of the store (query encoder) ----------------------------------------------

    def _file(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad store file name {name!r}")
        return os.path.join(os.path.dirname(self.path.rstrip("/")), name)

    def get_file(self, name: str) -> bytes | None:
        """A small file of the store's data directory (next to the key store), None when absent."""
        p = self._file(name)
        try:
            with open(p, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put_file_if_absent(self, name: str, data: bytes) -> bytes:
        """Write the file unless it exists (temp + fsync + rename); returns the file's content."""
        with self._lock:
            old = self.get_file(name)
            if old is not None:
                return old
            p = self._file(name)
            tmp = p + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            return data

    # -- monitoring -----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._ks.stats())
        out.update({
            "incarnation": self.incarnation, "pid": os.getpid(), "searches": self._searches,
            "queries": self._queries, "pending_activations": self._pending_rows,
            "dropped_activations": self._dropped, "stale_activations": self._dropped_stale,
            "consolidations": self._consolidations,
            "consolidated_activations": self._consolidated_rows,
            "last_consolidation": self._last_consolidation,
            "snapshots": self._snapshots, "invalidation_seq": self._seq,
        })
        return out

    def close(self) -> None:
        self._stop.set()
        self._consolidate()
        with self._lock:
            self._ks.snapshot()
            self._ks.close()


def _pad(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    if a.shape[1] == k:
        return a
    out = np.full((a.shape[0], k), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _as_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = dataclasses.asdict(obj)
    elif isinstance(obj, Mapping):
        d = dict(obj)
    else:
        d = {"result": repr(obj)}
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()
            if not isinstance(v, np.ndarray)}


__all__ = ["KeyStoreActor"]
