"""KeyStore: routing keys (the truth) plus the FAISS index derived from them, with snapshot + WAL.

State per slot (N used slots, capacity doubling): key (d_key,) float32 with norm <= 1, usage (EMA,
lazy: see gravity.py), utick / dtick, pinned, free, version (bumped by add, update, gravity move and
free; not by the lazy decay rescale). Slot numbers are the expert ids the index returns.

Every mutation is a list of records: validated, appended to the WAL as one fsynced batch (when the
store has a path), then applied to the arrays and the index by the same `_apply` that replays the WAL
on open. Records (numpy arrays inside):

    add     ids, keys, pinned, step    new keys (usage 0), version + 1
    update  ids, keys, step            absolute new keys (dtick = step), version + 1
    usage   ids, usage, step           absolute usage (utick = step)
    decay   ids, factors, step         key *= factor (dtick = step): lazy decay materialised
    free    ids                        slot freed (key zeroed, removed from the index), version + 1
    ns      ids, ns                    the slots' namespace (add records carry "ns" too; absent: "default")
    pin     ids, pinned, step          flag (dtick = step)
    step    step, cursor               consolidation batch counter and sweep cursor

Decay is lazy (gravity.py): each `consolidate` visits the activated keys plus a rotating window of
max(ceil(N / sweep_batches), sweep_min) slots and applies their accumulated decay, so a batch costs
O(batch + window), not O(N). The key array (what `get` returns) and the index always agree; an unused
key's decay reaches them at its next visit, at most `sweep_batches` batches late.

Index rebuilds (exact -> IVF past ivf_threshold, IVF retraining when the mean direction drift since
training passes drift_retrain or the store grew 4x) run inline, or with cfg.rebuild_in_background in a
thread (FAISS drops the GIL) while the old index keeps serving; slots touched meanwhile are re-applied
to the new index before it is swapped in, at the next call after the thread finishes.

Not thread-safe: one owner (the Ray actor) calls it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srmoa_dist.config import GravityConfig, KeyStoreConfig
from srmoa_dist.routing import gravity as gv
from srmoa_dist.routing.gravity import Activations, GravityState
from srmoa_dist.routing.index import KeyIndex, _direction_change, rescore, select_device
from srmoa_dist.routing.namespaces import DEFAULT, NamespaceSets, NamespaceTable, check_name, filtered_search
from srmoa_dist.routing.snapshot import Snapshot, read_snapshot, write_snapshot
from srmoa_dist.routing.wal import WriteAheadLog, replay

log = logging.getLogger(__name__)

IVF_MIN_KEYS = 256        # index="ivf" stays exact below this many keys (nothing to train on)


@dataclass(frozen=True)
class ConsolidationStats:
    """What one `KeyStore.consolidate` did."""

    step: int              # batch step after it
    n_queries: int
    n_activations: int     # valid (row, slot) entries used
    n_stale: int           # entries naming a free slot, ignored
    n_moved: int           # activated keys rewritten
    n_decayed: int         # swept keys shrunk by their pending decay
    n_freed: int           # slots freed under min_norm
    retrained: bool        # the index was rebuilt (kind switch, drift or growth)
    drift: float           # mean direction drift since the IVF centroids were trained
    seconds: float

    @property
    def updated(self) -> int:
        """Key vectors rewritten (in the key array, the index and the WAL): moved + decayed."""
        return self.n_moved + self.n_decayed


@dataclass
class _Rebuild:
    """An index build running in a background thread."""

    kind: str
    reason: str
    n_trained: int
    drift_at_start: float
    trained: bool
    result: list = field(default_factory=list)          # [KeyIndex] or [BaseException]
    touched: list = field(default_factory=list)         # id arrays changed since the key copy
    started: float = field(default_factory=time.perf_counter)
    thread: threading.Thread | None = None


def _as_ids(ids: Any, name: str = "ids") -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a[None]
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


class KeyStore:
    """Routing keys, their FAISS index, gravity consolidation and (with a path) durable persistence."""

    def __init__(self, cfg: KeyStoreConfig, gravity: GravityConfig | None = None,
                 path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.gcfg = gravity or GravityConfig()
        self.d = cfg.d_key
        self.path = Path(path) if path is not None else None
        self.device = select_device(cfg.device)
        self._n = 0                                        # used slots (high-water mark)
        self._alloc(0)
        self._step = 0                                     # consolidation batches so far
        self._cursor = 0                                   # decay sweep window start
        self._drift_sum = 0.0                              # sum of direction moves since training
        self._n_trained = 0                                # active keys when the centroids were trained
        self._logged = 0                                   # key updates (rows of add/update/decay/free
                                                           # records) in the WAL since the snapshot
        self._wal: WriteAheadLog | None = None
        self._index: KeyIndex | None = None
        self._pending_lists: np.ndarray | None = None      # IVF lists from a snapshot, during load only
        self._rebuild: _Rebuild | None = None              # background index build in flight
        self._holds: dict[int, float] = {}                 # slot -> monotonic deadline (edits in flight)
        self.namespaces = NamespaceTable()                 # namespace names <-> the codes in _ns
        self._ns_epoch = 0                                 # bumped by add / free / ns records
        self._ns_present: tuple[int, frozenset[str]] = (-1, frozenset())   # (epoch, namespaces with keys)
        if self.path is not None:
            self._load()
        else:
            self._index = KeyIndex(self.d, "exact", nprobe=cfg.nprobe, device=self.device)

    @classmethod
    def open(cls, path: str | Path, cfg: KeyStoreConfig, gravity: GravityConfig | None = None) -> KeyStore:
        """Open (or create) the store in directory `path`: snapshot + WAL replay, then the index."""
        return cls(cfg, gravity, path)

    # ------------------------------------------------------------------ arrays
    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "_keys", None)
        n = self._n
        arrays = {
            "_keys": np.zeros((capacity, self.d), dtype=np.float32),
            "_usage": np.zeros(capacity, dtype=np.float32),
            "_utick": np.zeros(capacity, dtype=np.int64),
            "_dtick": np.zeros(capacity, dtype=np.int64),
            "_pinned": np.zeros(capacity, dtype=bool),
            "_free": np.ones(capacity, dtype=bool),        # slots >= N count as free
            "_versions": np.zeros(capacity, dtype=np.int64),
            "_ns": np.zeros(capacity, dtype=np.int32),    # namespace code (0 = "default")
        }
        for name, new in arrays.items():
            if old is not None:
                new[:n] = getattr(self, name)[:n]
            setattr(self, name, new)

    def _ensure(self, n_slots: int) -> None:
        cap = self._keys.shape[0]
        if n_slots > cap:
            self._alloc(max(n_slots, 2 * cap, 1024))
        if self._pending_lists is not None and n_slots > self._pending_lists.shape[0]:
            grown = np.full(max(n_slots, 2 * self._pending_lists.shape[0]), -1, dtype=np.int64)
            grown[: self._pending_lists.shape[0]] = self._pending_lists
            self._pending_lists = grown
        self._n = max(self._n, n_slots)

    def _state(self) -> GravityState:
        n = self._n
        return GravityState(self._usage[:n], self._utick[:n], self._dtick[:n], self._pinned[:n],
                            self._free[:n], self._step)

    # ------------------------------------------------------------------ validation
    def _check_keys(self, keys: Any, name: str = "keys") -> np.ndarray:
        x = np.asarray(keys)
        if x.ndim == 1 and x.shape[0] == self.d:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"{name} must have shape (n, d_key={self.d}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
        x = np.array(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{name} must be finite")
        x /= np.maximum(np.linalg.norm(x, axis=1), 1.0)[:, None]            # norms clamped to <= 1
        return x

    def _check_active(self, ids: Any, name: str = "ids", unique: bool = True) -> np.ndarray:
        ids = _as_ids(ids, name)
        if ids.size == 0:
            return ids
        if ids.min() < 0 or ids.max() >= self._n:
            bad = ids[(ids < 0) | (ids >= self._n)]
            raise KeyError(f"{name}: no such key slot(s) {bad[:8].tolist()} (store has {self._n} slots)")
        if self._free[ids].any():
            raise KeyError(f"{name}: slot(s) {ids[self._free[ids]][:8].tolist()} are free")
        if unique and np.unique(ids).size != ids.size:
            raise ValueError(f"{name} must not repeat an id")
        return ids

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return self._n - int(np.count_nonzero(self._free[: self._n]))

    @property
    def step(self) -> int:
        return self._step

    @property
    def capacity(self) -> int:
        return int(self._keys.shape[0])

    @property
    def index_kind(self) -> str:
        return self._index.kind if self._index is not None else "none"

    def active_ids(self) -> np.ndarray:
        """Slot ids of the active keys (ascending)."""
        return np.flatnonzero(~self._free[: self._n]).astype(np.int64)

    def active_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) int64, keys (n, d_key) float32 copy) of the active slots."""
        ids = self.active_ids()
        return ids, self._keys[ids]

    def pinned_versions(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(ids (n,) int64, key versions (n,) int64, namespaces) of the active pinned (edited) slots: what
        `routing.relation_bank.EditedRelations.sync` diffs against (an edit's commit and its rollback
        both write the key, so a new version means a new expert record)."""
        ids = self.active_ids()
        ids = ids[self._pinned[ids]]
        return ids, self._versions[ids].astype(np.int64), [self.namespaces.name(c) for c in self._ns[ids]]

    def add(self, keys: np.ndarray, *, pinned: bool | np.ndarray = False,
            namespace: str = DEFAULT) -> np.ndarray:
        """Add keys (n, d_key) (norms clamped to <= 1) to `namespace`; returns their slot ids, freed
        slots first."""
        x = self._check_keys(keys)
        check_name(namespace)
        n = x.shape[0]
        pin = np.broadcast_to(np.asarray(pinned, dtype=bool), (n,)).copy()
        reuse = np.flatnonzero(self._free[: self._n])[:n]
        ids = np.concatenate([reuse, np.arange(self._n, self._n + n - reuse.size)]).astype(np.int64)
        if n:
            if not self.cfg.rebuild_in_background and self._reindex_reason(len(self) + n) is not None:
                self._index = None                  # rebuilt right after: skip adding to the old one
            try:
                self._commit([{"op": "add", "ids": ids, "keys": x, "pinned": pin, "step": self._step,
                               "ns": namespace}])
            finally:
                self._maybe_reindex()
        return ids

    def update(self, ids: Any, keys: np.ndarray) -> None:
        """Overwrite active keys (norms clamped to <= 1); their pending decay is dropped."""
        ids = self._check_active(ids)
        x = self._check_keys(keys)
        if x.shape[0] != ids.size:
            raise ValueError(f"keys has {x.shape[0]} rows for {ids.size} ids")
        if ids.size:
            self._commit([{"op": "update", "ids": ids, "keys": x, "step": self._step}])
            self._maybe_reindex()

    def free(self, ids: Any) -> None:
        """Free active slots: removed from the index, reused by later `add`s."""
        ids = self._check_active(ids)
        if ids.size:
            self._commit([{"op": "free", "ids": ids}])
            self._maybe_reindex()

    def set_namespace(self, ids: Any, namespace: str) -> None:
        """Move active keys to `namespace`."""
        ids = self._check_active(ids)
        check_name(namespace)
        if ids.size:
            self._commit([{"op": "ns", "ids": ids, "ns": namespace}])

    def namespace_of(self, ids: Any) -> list[str]:
        """The namespace of each active slot."""
        return [self.namespaces.name(c) for c in self._ns[self._check_active(ids, unique=False)]]

    def namespace_counts(self) -> dict[str, int]:
        """Active keys per namespace (namespaces without keys left out)."""
        codes = self._ns[self.active_ids()]
        return {self.namespaces.name(c): int(n) for c, n in zip(*np.unique(codes, return_counts=True))}

    def pin(self, ids: Any, pinned: bool = True) -> None:
        """Pin (exempt from decay and freeing) or unpin active keys; pending decay is applied first."""
        ids = self._check_active(ids)
        if ids.size == 0:
            return
        recs: list[dict[str, Any]] = []
        counts = gv.decay_counts(self._state(), ids, self._step, self.gcfg)
        if (counts > 0).any():
            sel = counts > 0
            recs.append({"op": "decay", "ids": ids[sel], "factors": gv.decay_factors(counts[sel], self.gcfg),
                         "step": self._step})
        recs.append({"op": "pin", "ids": ids, "pinned": bool(pinned), "step": self._step})
        self._commit(recs)

    def unpin(self, ids: Any) -> None:
        self.pin(ids, False)

    def hold(self, ids: Any, ttl_s: float = 600.0) -> None:
        """Keep these keys still under consolidation for at most `ttl_s` s (a running edit compares
        them before and after it trains); every other key keeps moving. Not persisted: a restart lets go."""
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        deadline = time.monotonic() + float(ttl_s)
        for i in _as_ids(ids).tolist():
            self._holds[int(i)] = max(deadline, self._holds.get(int(i), 0.0))

    def release(self, ids: Any) -> None:
        """End a `hold` (ids not held are ignored, so a repeated release is a no-op)."""
        for i in _as_ids(ids).tolist():
            self._holds.pop(int(i), None)

    def held_ids(self) -> np.ndarray:
        """Slots held still now (expired holds dropped)."""
        now = time.monotonic()
        self._holds = {i: t for i, t in self._holds.items() if t > now}
        return np.array(sorted(self._holds), dtype=np.int64)

    def get(self, ids: Any) -> np.ndarray:
        """Keys (n, d_key) float32 of active slots, as the index holds them (a copy)."""
        ids = self._check_active(ids, unique=False)
        return self._keys[ids]

    def versions(self, ids: Any) -> np.ndarray:
        ids = _as_ids(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self._n):
            raise KeyError(f"no such key slot(s) in {ids[:8].tolist()}")
        return self._versions[ids].copy()

    def is_pinned(self, ids: Any) -> np.ndarray:
        return self._pinned[self._check_active(ids, unique=False)].copy()

    def usage(self, ids: Any) -> np.ndarray:
        """Current usage EMA of active slots, float32."""
        ids = self._check_active(ids, unique=False)
        return gv.effective_usage(self._state(), ids, self._step, self.gcfg).astype(np.float32)

    def search(self, xq: np.ndarray, k: int | None = None, *, tau: float | None = None,
               nprobe: int | None = None, namespaces: NamespaceSets = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k keys per query by inner product: D (nq, k) float32, I (nq, k) int64.

        Queries are used as given (they come normalised). I is -1 where D < tau (deferral; tau
        defaults to cfg.tau, pass -inf for raw results) and where fewer than k keys exist (D = -inf).
        namespaces: None searches every key; else one collection of namespace names per query row,
        and row r sees only the keys of namespaces[r] (`namespaces.filtered_search`; None: all).
        """
        xq = np.asarray(xq)
        if xq.ndim != 2 or xq.shape[1] != self.d:
            raise ValueError(f"xq must have shape (nq, d_key={self.d}), got {xq.shape}"
                             + (" (use xq[None] for one query)" if xq.ndim == 1 else ""))
        if not np.issubdtype(xq.dtype, np.floating):
            raise ValueError(f"xq must be floating point (float32), got dtype {xq.dtype}")
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        k = self.cfg.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        tau = self.cfg.tau if tau is None else float(tau)
        self._poll_rebuild()
        nq = xq.shape[0]
        if nq == 0 or self._index is None or self._index.ntotal == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
        if namespaces is not None:
            D, I = self._search_namespaces(xq, int(k), nprobe, namespaces)
        else:
            D, I = self._index_search(xq, int(k), nprobe)
        D = np.array(D, dtype=np.float32)
        I = np.array(I, dtype=np.int64)
        missing = I < 0
        D[missing] = -np.inf
        hit = ~missing
        if hit.any() and self._free[I[hit]].any():                        # never happens; never leak
            log.error("index returned free slots %s; masking them", np.unique(I[hit][self._free[I[hit]]])[:8])
            bad = hit.copy()
            bad[hit] = self._free[I[hit]]
            I[bad], D[bad] = -1, -np.inf
        I[D < tau] = -1
        return D, I

    def _index_search(self, xq: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        D, I, stale = self._index.search(xq, k, nprobe)
        if stale:
            D, I = rescore(xq, I, self._keys[: self._n], ~self._free[: self._n])
        return D, I

    def _search_namespaces(self, xq: np.ndarray, k: int, nprobe: int | None,
                           namespaces: NamespaceSets) -> tuple[np.ndarray, np.ndarray]:
        """One filtered search per distinct namespace set of the batch's rows."""
        rows = list(namespaces)
        if len(rows) != xq.shape[0]:
            raise ValueError(f"namespaces: got {len(rows)} namespace sets for {xq.shape[0]} queries")
        n = self._n
        D = np.full((xq.shape[0], k), -np.inf, dtype=np.float32)
        I = np.full((xq.shape[0], k), -1, dtype=np.int64)
        groups: dict[frozenset[str] | None, list[int]] = {}
        for r, names in enumerate(rows):                 # a row's None: every namespace
            groups.setdefault(None if names is None else frozenset(names), []).append(r)
        present = self._present_namespaces()
        for names, rs in groups.items():
            if names is None or present <= names:        # every key is in reach: no filter needed
                D[rs], I[rs] = self._index_search(xq[rs], k, nprobe)
                continue
            allowed = np.isin(self._ns[:n], self.namespaces.codes(names)) & ~self._free[:n]
            D[rs], I[rs] = filtered_search(xq[rs], k, allowed, self._keys[:n],
                                           lambda q, kk: self._index_search(q, kk, nprobe),
                                           self._index.ntotal)
        return D, I

    def _present_namespaces(self) -> frozenset[str]:
        """The namespaces that hold active keys (cached until the next add, free or move)."""
        epoch, names = self._ns_present
        if epoch != self._ns_epoch:
            codes = np.unique(self._ns[self.active_ids()])
            names = frozenset(self.namespaces.name(c) for c in codes)
            self._ns_present = (self._ns_epoch, names)
        return names

    def consolidate(self, act: Activations) -> ConsolidationStats:
        """One gravity batch: pulls, usage, lazy decay of a sweep window, frees; one WAL batch."""
        if not isinstance(act, Activations):
            raise TypeError(f"consolidate takes Activations, got {type(act).__name__}")
        if act.n and act.d != self.d:
            raise ValueError(f"Activations.queries have d={act.d}, the store has d_key={self.d}")
        t0 = time.perf_counter()
        self._poll_rebuild()
        n = self._n
        window = min(n, max(math.ceil(n / self.gcfg.sweep_batches), self.gcfg.sweep_min))
        sweep = (self._cursor + np.arange(window, dtype=np.int64)) % max(n, 1)
        cursor = int((self._cursor + window) % n) if n else 0
        res = gv.consolidate(self._keys[:n], self._state(), act, self.gcfg, sweep=sweep, hold=self.held_ids())
        t = res.step
        keep_m = ~np.isin(res.moved_ids, res.freed_ids)
        keep_d = ~np.isin(res.decay_ids, res.freed_ids)
        recs: list[dict[str, Any]] = []
        if keep_m.any():
            recs.append({"op": "update", "ids": res.moved_ids[keep_m], "keys": res.moved_keys[keep_m],
                         "step": t})
            recs.append({"op": "usage", "ids": res.moved_ids[keep_m], "usage": res.moved_usage[keep_m],
                         "step": t})
        if keep_d.any():
            recs.append({"op": "decay", "ids": res.decay_ids[keep_d], "factors": res.decay_factors[keep_d],
                         "step": t})
        if res.freed_ids.size:
            recs.append({"op": "free", "ids": res.freed_ids})
        recs.append({"op": "step", "step": t, "cursor": cursor})
        self._commit(recs)
        retrained = self._maybe_reindex()
        return ConsolidationStats(
            step=t, n_queries=act.n, n_activations=res.n_activations, n_stale=res.n_stale,
            n_moved=int(keep_m.sum()), n_decayed=int(keep_d.sum()), n_freed=int(res.freed_ids.size),
            retrained=retrained, drift=self.drift, seconds=time.perf_counter() - t0)

    @property
    def drift(self) -> float:
        """Mean direction drift sum |k/|k| - k'/|k'|| per active key since the centroids were trained."""
        return self._drift_sum / max(len(self), 1)

    def energy(self, seed: int = 0) -> float:
        """gravity.energy of the active keys (sampled pairs, deterministic for a seed)."""
        return gv.energy(self._keys[: self._n], self._state(), self.gcfg, np.random.default_rng(seed))

    def stats(self) -> dict[str, Any]:
        self._poll_rebuild()
        n = self._n
        active = ~self._free[:n]
        act_ids = np.flatnonzero(active)
        usage = gv.effective_usage(self._state(), act_ids, self._step, self.gcfg)
        th = self.gcfg.theta
        edges = [0.0, th / 10, th, 10 * th, 100 * th, math.inf]
        counts, _ = np.histogram(usage, bins=edges)
        return {
            "n_active": int(act_ids.size),
            "n_free": int(n - act_ids.size),
            "n_pinned": int(np.count_nonzero(self._pinned[:n] & active)),
            "n_held": int(self.held_ids().size),
            "n_slots": n,
            "capacity": self.capacity,
            "index": self.index_kind,
            "index_kind": self.index_kind,
            "device": self._index.device if self._index is not None else self.device,
            "nlist": self._index.nlist if self._index is not None else 0,
            "nprobe": self.cfg.nprobe,
            "n_indexed": self._index.ntotal if self._index is not None else 0,
            "drift": self.drift,
            "step": self._step,
            "energy": self.energy(),
            "usage_hist": {"edges": edges, "counts": counts.tolist()},
            "wal_seq": self._wal.last_seq if self._wal is not None else None,
            "logged_since_snapshot": self._logged,
            "rebuilding": self._rebuild is not None,
            "namespaces": self.namespace_counts(),
        }

    # ------------------------------------------------------------------ records
    def _commit(self, recs: list[dict[str, Any]]) -> None:
        """Log (one fsynced batch) then apply; auto-snapshot after cfg.snapshot_every logged rows."""
        self._poll_rebuild()
        if self._wal is not None:
            self._wal.append_batch(recs)
        for rec in recs:
            self._apply(rec)
        if self._wal is not None and self._index is not None and self._logged >= self.cfg.snapshot_every:
            self.snapshot()

    def _apply(self, rec: dict[str, Any]) -> None:
        op = rec["op"]
        ids = np.asarray(rec["ids"], dtype=np.int64) if "ids" in rec else None
        idx = self._index
        if op == "add":
            self._ensure(int(ids.max()) + 1)
            x = np.asarray(rec["keys"], dtype=np.float32)
            self._keys[ids] = x
            self._usage[ids] = 0.0
            self._utick[ids] = self._dtick[ids] = rec["step"]
            self._pinned[ids] = np.asarray(rec["pinned"], dtype=bool)
            self._free[ids] = False
            self._versions[ids] += 1
            self._ns[ids] = self.namespaces.code(rec.get("ns", DEFAULT))
            if idx is not None:
                idx.add(ids, x)
            elif self._pending_lists is not None:
                self._pending_lists[ids] = -1
        elif op == "update":
            x = np.asarray(rec["keys"], dtype=np.float32)
            old = self._keys[ids]
            self._drift_sum += float(_direction_change(old, x).sum())
            self._keys[ids] = x
            self._dtick[ids] = rec["step"]
            self._versions[ids] += 1
            if idx is not None:
                idx.update(ids, x, old=old)
            elif self._pending_lists is not None:
                self._pending_lists[ids] = -1
        elif op == "usage":
            self._usage[ids] = np.asarray(rec["usage"], dtype=np.float32)
            self._utick[ids] = rec["step"]
        elif op == "decay":
            f = np.asarray(rec["factors"], dtype=np.float32)
            self._keys[ids] = self._keys[ids] * f[:, None]
            self._dtick[ids] = rec["step"]
            if idx is not None:
                idx.update(ids, self._keys[ids], same_lists=True)
        elif op == "free":
            self._free[ids] = True
            self._pinned[ids] = False
            self._ns[ids] = 0
            self._keys[ids] = 0.0
            self._versions[ids] += 1
            if idx is not None:
                idx.remove(ids)
            elif self._pending_lists is not None:
                self._pending_lists[ids] = -1
        elif op == "pin":
            self._pinned[ids] = bool(rec["pinned"])
            self._dtick[ids] = rec["step"]
        elif op == "ns":
            self._ns[ids] = self.namespaces.code(rec["ns"])
        elif op == "step":
            self._step = int(rec["step"])
            self._cursor = int(rec["cursor"])
        else:
            raise ValueError(f"unknown key-store record op {op!r}")
        if op in ("add", "free", "ns"):
            self._ns_epoch += 1
        if ids is not None and op not in ("usage", "pin", "ns"):                   # key updates
            self._logged += int(ids.size)
            if self._rebuild is not None:
                self._rebuild.touched.append(ids.copy())

    # ------------------------------------------------------------------ index
    def _target_kind(self, n: int | None = None) -> str:
        n = len(self) if n is None else n
        if self.cfg.index == "exact":
            return "exact"
        if self.cfg.index == "ivf":
            return "ivf" if n >= IVF_MIN_KEYS else "exact"
        threshold = self.cfg.ivf_threshold
        if self._index is not None and self._index.kind == "ivf":
            threshold //= 2                                                 # hysteresis
        return "ivf" if n >= threshold else "exact"

    def _reindex_reason(self, n: int | None = None) -> str | None:
        """Why the index must be rebuilt with n active keys (default: now), or None."""
        n = len(self) if n is None else n
        kind = self._target_kind(n)
        if self._index is None or kind != self._index.kind:
            return f"kind {self.index_kind} -> {kind}"
        if kind == "ivf" and self._drift_sum / max(n, 1) > self.cfg.drift_retrain:
            return f"drift {self._drift_sum / max(n, 1):.3f} > {self.cfg.drift_retrain}"
        if kind == "ivf" and self.cfg.nlist == 0 and n > 4 * max(self._n_trained, 1):
            return f"growth {self._n_trained} -> {n} keys"
        return None

    def _maybe_reindex(self) -> bool:
        """Rebuild the index on a kind switch, drift past cfg.drift_retrain, or 4x growth (auto nlist).
        True when a rebuild was done (inline) or started (background)."""
        if self._rebuild is not None:
            return False
        why = self._reindex_reason()
        if why is None:
            return False
        self.rebuild_index(self._target_kind(), reason=why)
        if self._wal is not None and self._logged >= self.cfg.snapshot_every:
            self.snapshot()
        return True

    def _build(self, kind: str, keys: np.ndarray, ids: np.ndarray, centroids: np.ndarray | None,
               lists: np.ndarray | None) -> KeyIndex:
        return KeyIndex.build(
            self.d, kind, keys, ids, nlist=self.cfg.nlist, nprobe=self.cfg.nprobe, device=self.device,
            train_per_list=self.cfg.train_per_list, niter=self.cfg.kmeans_iters, seed=self._step,
            centroids=centroids, lists=lists)

    def rebuild_index(self, kind: str | None = None, *, reason: str = "requested",
                      centroids: np.ndarray | None = None, lists: np.ndarray | None = None,
                      background: bool | None = None) -> None:
        """Build the index afresh from the key array (IVF: retrain unless centroids are given).

        background (default cfg.rebuild_in_background): build from a copy of the keys in a thread;
        the current index serves until the new one is swapped in (see `wait_rebuild`)."""
        kind = kind or self._target_kind()
        background = self.cfg.rebuild_in_background if background is None else background
        ids = self.active_ids()
        if background and self._index is not None:
            if self._rebuild is not None:
                return
            keys = self._keys[ids]                                          # a copy
            rb = _Rebuild(kind=kind, reason=reason, n_trained=int(ids.size), drift_at_start=self._drift_sum,
                          trained=centroids is None)

            def run() -> None:
                try:
                    rb.result.append(self._build(kind, keys, ids, centroids, lists))
                except BaseException as e:  # noqa: BLE001 - reported when swapped
                    rb.result.append(e)

            rb.thread = threading.Thread(target=run, name="keystore-rebuild", daemon=True)
            self._rebuild = rb
            rb.thread.start()
            log.info("key index rebuild started in the background (%s): %s, %d keys", reason, kind, ids.size)
            return
        t0 = time.perf_counter()
        self._wait_and_drop_rebuild()
        self._index = None                                                  # free the old one first
        self._index = self._build(kind, self._keys[ids], ids, centroids, lists)
        if centroids is None:
            self._drift_sum, self._n_trained = 0.0, int(ids.size)
        log.info("key index rebuilt (%s): %s, %d keys, nlist %d, %.2f s", reason, kind, ids.size,
                 self._index.nlist, time.perf_counter() - t0)

    def _wait_and_drop_rebuild(self) -> None:
        if self._rebuild is not None and self._rebuild.thread is not None:
            self._rebuild.thread.join()
        self._rebuild = None

    def wait_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a background rebuild and swap it in; True when none is left running."""
        if self._rebuild is not None and self._rebuild.thread is not None:
            self._rebuild.thread.join(timeout)
        self._poll_rebuild()
        return self._rebuild is None

    def _poll_rebuild(self) -> None:
        """Swap in a finished background build, after re-applying the slots touched meanwhile."""
        rb = self._rebuild
        if rb is None or rb.thread is None or rb.thread.is_alive():
            return
        self._rebuild = None
        out = rb.result[0] if rb.result else RuntimeError("no result")
        if not isinstance(out, KeyIndex):
            log.error("background key index rebuild (%s) failed: %r; keeping the old index", rb.reason, out)
            return
        if rb.touched:
            touched = np.unique(np.concatenate(rb.touched))
            out.remove(touched)
            live = touched[~self._free[touched]]
            out.add(live, self._keys[live])
        self._index = out
        if rb.trained:
            self._drift_sum -= rb.drift_at_start                            # moves since the key copy
            self._n_trained = rb.n_trained
        log.info("key index rebuilt in the background (%s): %s, %d keys, nlist %d, %.2f s", rb.reason,
                 out.kind, out.ntotal, out.nlist, time.perf_counter() - rb.started)

    # ------------------------------------------------------------------ persistence
    def snapshot(self) -> None:
        """Write a snapshot (temp, fsync, rename) including every logged record, then rotate the WAL."""
        if self.path is None or self._wal is None:
            raise RuntimeError("snapshot() needs a store opened with a path")
        self._poll_rebuild()
        t0 = time.perf_counter()
        n = self._n
        idx = self._index
        lists = np.full(n, -1, dtype=np.int64)
        if idx is not None and idx.kind == "ivf":
            m = min(n, idx.assign.shape[0])
            lists[:m] = idx.assign[:m]
        meta = {"wal_seq": self._wal.last_seq, "step": self._step, "cursor": self._cursor,
                "drift_sum": self._drift_sum, "n_trained": self._n_trained,
                "index_kind": idx.kind if idx is not None else "exact",
                "namespaces": list(self.namespaces.names)}
        write_snapshot(self.path, Snapshot(
            keys=self._keys[:n], usage=self._usage[:n], utick=self._utick[:n], dtick=self._dtick[:n],
            pinned=self._pinned[:n], free=self._free[:n], versions=self._versions[:n], lists=lists,
            namespaces=self._ns[:n], meta=meta,
            centroids=idx.centroids if idx is not None and idx.kind == "ivf" else None))
        self._wal.rotate()
        self._logged = 0
        log.info("key-store snapshot at seq %d: %d slots in %.2f s", meta["wal_seq"], n,
                 time.perf_counter() - t0)

    def _load(self) -> None:
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        snap = read_snapshot(self.path)
        snap_seq = 0
        centroids = None
        if snap is not None:
            if snap.keys.shape[1] != self.d:
                raise ValueError(f"the key store at {self.path} has d_key={snap.keys.shape[1]}, "
                                 f"config says keystore.d_key={self.d}")
            self._ensure(snap.n)
            n = snap.n
            self._keys[:n], self._usage[:n] = snap.keys, snap.usage
            self._utick[:n], self._dtick[:n] = snap.utick, snap.dtick
            self._pinned[:n], self._free[:n], self._versions[:n] = snap.pinned, snap.free, snap.versions
            meta = snap.meta
            self.namespaces = NamespaceTable(meta.get("namespaces") or [DEFAULT])
            if snap.namespaces is not None:                 # older snapshots: every key in "default"
                self._ns[:n] = snap.namespaces
            snap_seq = int(meta["wal_seq"])
            self._step, self._cursor = int(meta["step"]), int(meta["cursor"])
            self._drift_sum, self._n_trained = float(meta["drift_sum"]), int(meta["n_trained"])
            if (meta.get("index_kind") == "ivf" and snap.centroids is not None
                    and self.cfg.nlist in (0, snap.centroids.shape[0])):
                centroids = snap.centroids
                self._pending_lists = snap.lists.copy()
        last = snap_seq
        n_batches = 0
        for batch in replay(self.path, snap_seq):
            for rec in batch:
                self._apply(rec)
            last = batch[-1]["s"]
            n_batches += 1
        self._wal = WriteAheadLog(self.path, last + 1)
        self._wal.prune(snap_seq)
        kind = self._target_kind()
        lists = None
        if centroids is not None and kind == "ivf":
            lists = self._pending_lists[self.active_ids()]
        else:
            centroids = None
        self._pending_lists = None
        self.rebuild_index(kind, reason="open", centroids=centroids, lists=lists)
        log.info("opened key store %s: snapshot seq %d + %d WAL batch(es) -> %d active keys",
                 self.path, snap_seq, n_batches, len(self))
        if self._logged >= self.cfg.snapshot_every:
            self.snapshot()

    def close(self) -> None:
        """Close the WAL (everything committed is already durable)."""
        if self._wal is not None:
            self._wal.close()
            self._wal = None

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
