"""GET /v1/keyspace: the routing keys as a 2-D map (routing/projection.py), for the /ui page.

Each point is one active key: its PCA coordinates, namespace, pinned, usage, key version, and the
live edit that made or last refined its expert (rule, question, answer, steps, train seconds), if
any. Beside them, the latest edits of the ledger with their status (newest first). A store with
more keys than `limit` shows the pinned ones and the most used ones; the projection is fitted on
every key either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from srmoa_dist.routing.projection import pca_2d
from srmoa_dist.runtime.metrics import namespace_label

LIVE = ("committed", "verified")          # ttt/ledger.py LIVE: edits in force
DEFAULT_LIMIT = 2000
MAX_LIMIT = 20000
RECENT_EDITS = 20


class KeyEdit(BaseModel):
    """One edit as the map shows it (a summary of its ledger record)."""

    edit_id: str
    status: str
    expert_id: int
    rule: str = ""
    question: str = ""
    correct_answer: str | None = None
    created: bool = False
    steps: int = 0
    train_seconds: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    note: str | None = None


class KeyPoint(BaseModel):
    id: int
    x: float
    y: float
    namespace: str
    pinned: bool
    edited: bool                     # a live edit made or refined this key's expert
    usage: float
    version: int
    edit: KeyEdit | None = None


class KeySpace(BaseModel):
    object: Literal["keyspace"] = "keyspace"
    n_active: int
    n_shown: int
    step: int
    explained: list[float] = Field(description="share of the keys' variance on each axis")
    namespaces: list[str]
    points: list[KeyPoint]
    edits: list[KeyEdit] = Field(description=f"the latest {RECENT_EDITS} edits, newest first")


def edit_summary(e: Mapping[str, Any]) -> KeyEdit:
    """A ledger record (trainer `list_edits` JSON) as a KeyEdit."""
    notes = e.get("notes") or []
    return KeyEdit(edit_id=str(e["edit_id"]), status=str(e["status"]), expert_id=int(e.get("expert_id", -1)),
                   rule=str(e.get("rule") or ""), question=str(e.get("question") or ""),
                   correct_answer=e.get("correct_answer"), created=bool(e.get("created", False)),
                   steps=int(e.get("steps") or 0), train_seconds=float(e.get("train_seconds") or 0.0),
                   created_at=float(e.get("created_at") or 0.0), updated_at=float(e.get("updated_at") or 0.0),
                   note=str(notes[-1]) if notes else None)


def live_edit_by_expert(edits: Sequence[Mapping[str, Any]]) -> dict[int, KeyEdit]:
    """expert id -> its latest live edit."""
    out: dict[int, KeyEdit] = {}
    for e in sorted(edits, key=lambda e: float(e.get("updated_at") or 0.0)):
        if e.get("status") in LIVE and int(e.get("expert_id", -1)) >= 0:
            out[int(e["expert_id"])] = edit_summary(e)
    return out


def build_keyspace(raw: Mapping[str, Any], edits: Sequence[Mapping[str, Any]], *,
                   limit: int = DEFAULT_LIMIT) -> KeySpace:
    """The map of the key store's `keyspace()` answer and the trainer's edits."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be in 1..{MAX_LIMIT}, got {limit}")
    ids = np.asarray(raw["ids"], dtype=np.int64).reshape(-1)
    n = int(ids.size)
    keys = np.asarray(raw["keys"], dtype=np.float32)
    proj = pca_2d(keys if keys.ndim == 2 else keys.reshape(n, -1 if n else 0))
    usage = np.asarray(raw["usage"], dtype=np.float64).reshape(n)
    pinned = np.asarray(raw["pinned"], dtype=bool).reshape(n)
    namespaces = [namespace_label(ns) for ns in (raw.get("namespaces") or [None] * n)]
    shown = np.arange(n)
    if n > limit:                                    # pinned first, then the most used
        shown = np.lexsort((-usage, ~pinned))[:limit]
        shown.sort()
    by_expert = live_edit_by_expert(edits)
    points = []
    for j in shown.tolist():
        eid = int(ids[j])
        edit = by_expert.get(eid)
        points.append(KeyPoint(id=eid, x=float(proj.xy[j, 0]), y=float(proj.xy[j, 1]),
                               namespace=namespaces[j], pinned=bool(pinned[j]), edited=edit is not None,
                               usage=float(usage[j]), version=int(raw["versions"][j]), edit=edit))
    recent = sorted(edits, key=lambda e: float(e.get("updated_at") or e.get("created_at") or 0.0),
                    reverse=True)[:RECENT_EDITS]
    return KeySpace(n_active=n, n_shown=len(points), step=int(raw.get("step", 0)),
                    explained=list(proj.explained), namespaces=sorted(set(namespaces)), points=points,
                    edits=[edit_summary(e) for e in recent])


__all__ = ["KeySpace", "KeyPoint", "KeyEdit", "build_keyspace", "edit_summary", "live_edit_by_expert",
           "DEFAULT_LIMIT", "MAX_LIMIT"]
