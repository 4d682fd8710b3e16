"""The relations edits asked: every edited expert's relation keys, mirrored where routing arbitrates.

The relation gate (`routing.relation_gate`) keeps an expert for a question only when the question is
nearer the expert's relation than any *other* relation it knows. The corpus bank holds relations no
edit asks; this mirror adds the relations the store's edits asked, so an unedited "What is the
population of X?" meets the key of another subject's edited population and goes to the base model.
The store's own edits are the best supply of other relations: they are the ones users ask about.

    rows  K_e (n, D) float32, unit rows: the relation keys of every pinned expert that has a relation
    other(r, e) = max over rows not of expert e, not in another namespace than e's, and not of e's own
                  relation (no row within `same_relation` of a key of e)

Sync (`sync(keystore, store)`): the key store lists the pinned slots and their key versions
(`KeyStore.pinned_versions`); an edit's commit and its rollback both write the key, so a slot whose
version moved has a new expert record. Only those records' relations are read (`store.relations`,
headers only); slots no longer pinned leave. Callers sync before they route: a model replica once as
it starts (the bulk of the reads) and then at most every `interval_s` (an edit reaches other replicas'
banks that much later; the bank only sharpens deferral, so a late row costs nothing but a deferral
missed meanwhile), the editor before each routed check.

Offline (SmolLM2-135M, `bench.entity_facts` seed 0, 3 facts an entity; the README has the sweep): at
margin 0, with 180 edits (60 entities) the share of unedited questions about an edited entity that the
gate keeps falls from 0.23 (corpus bank) to 0.07, and with 1,002 edits from 0.18 to 0.02; AUC paraphrase
vs unedited 0.83 -> 0.94 and 0.86 -> 0.97. At the default margin -0.1 it keeps 0.94 / 0.93 of the
paraphrases (0.83 / 0.82 with the corpus bank at margin 0) and 0.07 / 0.06 of the unedited questions.

Shapes: n bank rows, D model width, m relation keys of one expert.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class PinnedSource(Protocol):
    """The key-store part a sync reads (`KeyStore`, or the Ray proxy of its actor)."""

    def pinned_versions(self) -> tuple[np.ndarray, np.ndarray, list[str]]: ...


class RelationSource(Protocol):
    """The expert-store part a sync reads (`ShardedExpertStore`, or the Ray client of its shards)."""

    def relations(self, ids: Sequence[int]) -> list[Any]: ...


@dataclass(frozen=True)
class _Entry:
    version: int                 # the slot's key version when its relation was read
    namespace: str
    keys: np.ndarray | None      # (m, D) float32 unit rows; None: the expert has no relation (or no record)


class EditedRelations:
    """The mirror of the store's edited relations (see the module docstring). Thread-safe."""

    def __init__(self, interval_s: float = 2.0) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._K = np.zeros((0, 0), np.float32)          # (n, D)
        self._owner = np.zeros(0, np.int64)             # (n,) expert id of each row
        self._ns = np.zeros(0, object)                  # (n,) namespace of each row
        self._last = float("-inf")
        self.syncs = 0

    def __len__(self) -> int:
        return int(self._owner.shape[0])

    def __reduce__(self) -> tuple[Any, tuple[float]]:
        """Pickled empty (a lock does not pickle; the receiving process syncs its own mirror)."""
        return (EditedRelations, (self.interval_s,))

    @classmethod
    def of(cls, relations: dict[int, np.ndarray], namespace: str = "default") -> EditedRelations:
        """A mirror holding `relations` (expert id -> its relation keys (m, D)) as they are, for offline
        analysis (`scripts/relation_margin_sweep.py`); serving syncs from the stores instead."""
        bank = cls()
        bank._install({int(i): _Entry(0, namespace, unit_rows(np.atleast_2d(np.asarray(k, np.float32))))
                       for i, k in relations.items()})
        return bank

    def due(self) -> bool:
        """Whether `interval_s` has passed since the last sync (or its last failed try)."""
        return time.monotonic() - self._last >= self.interval_s

    def sync(self, keystore: PinnedSource, store: RelationSource) -> int:
        """Bring the mirror up to date; returns how many slots changed (new, moved, or gone). Errors of
        the stores propagate (the mirror is left as it was, and not due again for `interval_s`)."""
        self._last = time.monotonic()
        ids, versions, namespaces = keystore.pinned_versions()
        ids = np.asarray(ids, np.int64).reshape(-1)
        versions = np.asarray(versions, np.int64).reshape(-1)
        if not ids.shape == versions.shape == (len(namespaces),):
            raise ValueError(f"pinned_versions gave {ids.shape} ids, {versions.shape} versions and "
                             f"{len(namespaces)} namespaces")
        old = self._entries
        live = {int(i): (int(v), str(ns)) for i, v, ns in zip(ids, versions, namespaces)}
        stale = [i for i, (v, ns) in live.items() if i not in old or old[i].version != v]
        rels = store.relations(stale) if stale else []
        entries = {i: e for i, e in old.items() if i in live and i not in stale}
        for i, rel in zip(stale, rels):
            keys = None if rel is None else unit_rows(np.asarray(rel.keys, np.float32))
            entries[i] = _Entry(live[i][0], live[i][1], keys)
        changed = len(stale) + sum(i not in live for i in old)
        if changed:
            self._install(entries)
        self.syncs += 1
        return changed

    def _install(self, entries: dict[int, _Entry]) -> None:
        held = [(i, e) for i, e in sorted(entries.items()) if e.keys is not None]
        if held:
            K = np.concatenate([e.keys for _, e in held])                               # (n, D)
            owner = np.concatenate([np.full(e.keys.shape[0], i, np.int64) for i, e in held])
            ns = np.concatenate([np.full(e.keys.shape[0], e.namespace, object) for _, e in held])
        else:
            K, owner, ns = np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, object)
        with self._lock:
            self._entries, self._K, self._owner, self._ns = entries, K, owner, ns

    def best_other(self, r: np.ndarray, expert_id: int, K: np.ndarray, same_relation: float | None) -> float:
        """max(r K_e^T) over the rows of other edits (r: (D,), K: (m, D) the expert's own relation keys):
        not `expert_id`'s, not of another namespace than its (when the mirror knows it), and none within
        `same_relation` of a key of K (those ask the expert's own relation); -inf when none is left."""
        with self._lock:
            rows, owner, ns = self._K, self._owner, self._ns
            entry = self._entries.get(int(expert_id))
        if rows.shape[0] == 0:
            return float("-inf")
        keep = owner != int(expert_id)                                                   # (n,)
        if entry is not None:
            keep &= ns == entry.namespace
        if same_relation is not None:
            keep &= (np.asarray(K, np.float32) @ rows.T).max(axis=0) < same_relation   # (m, n) -> (n,)
        return float((rows[keep] @ np.asarray(r, np.float32)).max()) if keep.any() else float("-inf")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"experts": sum(e.keys is not None for e in self._entries.values()),
                    "rows": int(self._owner.shape[0]), "syncs": self.syncs}


def unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` (n, D) with each row scaled to unit length, float32."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


__all__ = ["EditedRelations", "PinnedSource", "RelationSource", "unit_rows"]
