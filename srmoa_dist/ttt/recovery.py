"""Edits as transactions: what of an edit's writes is in place, undoing them, and start-up recovery.

An edit writes in this order (`ttt.edit`): the ledger intent (durable first), a reserved key slot (a
pinned zero key, new experts only; the intent is rewritten with its id), then at commit the full intent
(previous version, key and pin state, the new key), `store.put_many`, `keystore.update`,
`keystore.pin`, and the ledger's "committed" record; verification then marks it "verified" or rolls it
back ("rolling_back" is written before a rollback's writes, "rolled_back" after). A crash between any
two of these writes leaves the ledger saying "intent", "committed" or "rolling_back".

`Recovery(store, keystore, ledger).run()` (the trainer runs it at start-up, before any job, and after a
batch with a failed edit) settles every such edit, so that after it:

- an "intent" whose writes are all in place is rolled forward to "committed" when `keep_unverified`
  (verification off), and otherwise (the trainer: an edit counts only once verified) undone like every
  partial intent: its expert version and key restored, or its reserved slot freed and new record
  deleted; the ledger says "failed" with the note "recovered after a crash: ...";
- a "committed" edit (verification never finished) is rolled back ("rolled_back", same note), or kept
  when `keep_unverified` and complete; a "rolling_back" edit's rollback is finished;
- a pinned all-zero key that no live ledger entry owns (a slot reserved just before a crash, before its
  intent named it) is freed. Seed and imported experts are never pinned zero keys, so none is freed;
  a pinned non-zero key no entry owns is reported (`unowned_pinned`), never touched.

Every step checks the stores before it writes (`undo` is idempotent), so recovering twice equals
recovering once, and a recovery that itself crashes is finished by the next. `audit` checks the
invariants against the stores (the tests and the chaos benchmark use it). Run recovery only while no
edit is running against the same store. Ray-free: the stores are any objects with the method names.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srmoa_dist.ttt.ledger import LIVE, EditLedger, EditRecord

log = logging.getLogger(__name__)

RECOVERED = "recovered after a crash"
KEY_ATOL = 1e-5          # the key store clamps norms to <= 1: a stored key may differ by a rounding


def version_of(store: Any, expert_id: int) -> int | None:
    """The stored version of one expert, None when it is not stored."""
    try:
        v = store.versions([int(expert_id)])[0]
    except LookupError:                     # MissingExpertError (a KeyError), also through Ray
        return None
    return None if v is None else int(v)


@dataclass(frozen=True)
class Slot:
    """One key-store slot as it is now: inactive (free or never allocated), or its key and pin flag."""

    active: bool
    key: np.ndarray | None = None
    pinned: bool = False

    @classmethod
    def read(cls, keystore: Any, expert_id: int) -> Slot:
        if expert_id < 0:
            return cls(False)
        ids = np.array([expert_id], np.int64)
        try:
            key = np.asarray(keystore.get(ids), np.float32).reshape(-1)
            pinned = bool(np.asarray(keystore.is_pinned(ids)).reshape(-1)[0])
        except LookupError:                 # a free slot (KeyError), also through Ray
            return cls(False)
        return cls(True, key, pinned)

    def holds(self, key: np.ndarray | None) -> bool:
        return self.active and key is not None and np.allclose(self.key, key, atol=KEY_ATOL)

    @property
    def zero(self) -> bool:
        return self.active and not np.any(self.key)


@dataclass(frozen=True)
class Writes:
    """What of one edit's writes is in place now."""

    version: int | None                 # the expert's stored version (None: not stored)
    slot: Slot

    @classmethod
    def of(cls, rec: EditRecord, store: Any, keystore: Any) -> Writes:
        v = version_of(store, rec.expert_id) if rec.expert_id >= 0 else None
        return cls(v, Slot.read(keystore, rec.expert_id))

    def expert(self, rec: EditRecord) -> bool:
        return rec.new_version is not None and self.version == int(rec.new_version)

    def complete(self, rec: EditRecord) -> bool:
        """The edit's new expert version, its key and the pin are all in place."""
        return rec.expert_id >= 0 and self.expert(rec) and self.slot.holds(rec.new_key) and self.slot.pinned


def expected_version(prev_version: int | None) -> int:
    """The version `put_many` gives an expert stored at `prev_version` (1 when none)."""
    return 1 if prev_version is None else int(prev_version) + 1


def undo(rec: EditRecord, store: Any, keystore: Any) -> None:
    """Undo whatever of `rec`'s writes is in place (idempotent: each write is checked first). A created
    expert: its slot freed (unreachable first; only a slot the edit reserved: pinned, its zero or new
    key), then its record deleted if the edit wrote one. A refined expert: the previous version restored
    (if the store holds the edit's), then the previous key and pin state."""
    eid = rec.expert_id
    if eid < 0:                             # no slot was named: the sweep frees a leaked reservation
        return
    ids = np.array([eid], np.int64)
    w = Writes.of(rec, store, keystore)
    if rec.created:
        mine = rec.extra.get("slot_reserved", True)
        if mine and w.slot.active and w.slot.pinned and (w.slot.zero or w.slot.holds(rec.new_key)):
            keystore.free(ids)
        if w.version is not None and w.version != rec.prev_version:
            store.delete([eid])
        return
    if w.expert(rec) and w.version != rec.prev_version:
        store.rollback(eid)
    elif w.version != rec.prev_version:
        log.warning("edit %s: expert %d is at version %s, neither the edit's %s nor the previous %s; "
                    "its record is left as it is", rec.edit_id, eid, w.version, rec.new_version,
                    rec.prev_version)
    if not w.slot.active:
        log.warning("edit %s: the key slot of expert %d is free; its key cannot be restored",
                    rec.edit_id, eid)
        return
    if rec.prev_key is not None and not w.slot.holds(rec.prev_key):
        keystore.update(ids, np.asarray(rec.prev_key, np.float32)[None, :])
    if w.slot.pinned != bool(rec.prev_pinned):
        keystore.pin(ids, bool(rec.prev_pinned))


@dataclass(frozen=True)
class RecoveryReport:
    """What one `Recovery.run` did (edit ids, slot ids)."""

    rolled_forward: tuple[str, ...] = ()
    undone: tuple[str, ...] = ()            # intents undone -> "failed"
    rolled_back: tuple[str, ...] = ()       # committed (unverified) or rolling_back -> "rolled_back"
    freed_slots: tuple[int, ...] = ()
    unowned_pinned: tuple[int, ...] = ()
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.rolled_forward or self.undone or self.rolled_back or self.freed_slots)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class Recovery:
    """Settle every edit a crash left in flight (see the module docstring); `run` reads top to bottom."""

    def __init__(self, store: Any, keystore: Any, ledger: EditLedger, *,
                 invalidate: Callable[[list[int]], None] | None = None,
                 keep_unverified: bool = False) -> None:
        self.store, self.keystore, self.ledger = store, keystore, ledger
        self.invalidate = invalidate
        self.keep_unverified = keep_unverified
        self._touched: set[int] = set()

    def run(self) -> RecoveryReport:
        t0 = time.perf_counter()
        forward, undone, back = [], [], []
        for rec in self.ledger.list("intent"):
            (forward if self._settle_intent(rec) else undone).append(rec.edit_id)
        for rec in self.ledger.list("rolling_back"):
            self._roll_back(rec, "its rollback was finished")
            back.append(rec.edit_id)
        for rec in sorted(self.ledger.list("committed"), key=lambda r: r.created_at, reverse=True):
            if self.keep_unverified and Writes.of(rec, self.store, self.keystore).complete(rec):
                continue
            self._roll_back(rec, "committed but never verified; rolled back")
            back.append(rec.edit_id)
        freed, unowned = self._sweep()
        if self.invalidate is not None and self._touched:
            self.invalidate(sorted(self._touched))
        report = RecoveryReport(tuple(forward), tuple(undone), tuple(back), tuple(freed), tuple(unowned),
                                time.perf_counter() - t0)
        if report.changed or unowned:
            log.warning("edit recovery in %.2f s: %d rolled forward, %d intents undone %s, %d rolled back "
                        "%s, %d leaked slots freed %s, %d pinned keys without an edit left %s",
                        report.seconds, len(forward), len(undone), undone[:8], len(back), back[:8],
                        len(freed), freed[:8], len(unowned), unowned[:8])
        return report

    # an intent: forward when complete and unverified edits are kept, else undone -> "failed"
    def _settle_intent(self, rec: EditRecord) -> bool:
        w = Writes.of(rec, self.store, self.keystore)
        if rec.expert_id >= 0:
            self._touched.add(rec.expert_id)
        if self.keep_unverified and w.complete(rec):
            self.ledger.commit(dataclasses.replace(
                rec, status="committed", notes=rec.notes + (f"{RECOVERED}: rolled forward (not verified)",),
                extra={**rec.extra, "recovered": True}))
            return True
        undo(rec, self.store, self.keystore)
        stage = rec.extra.get("stage", "?")
        what = "its writes were complete but it was never verified" if w.complete(rec) else f"stage {stage}"
        self.ledger.commit(dataclasses.replace(
            rec, status="failed", new_version=None,
            notes=rec.notes + (f"{RECOVERED}: {what}; undone, the edit was not applied",),
            extra={**rec.extra, "recovered": True}))
        return False

    # a committed or rolling_back edit: "rolling_back" first, the undo, then "rolled_back"
    def _roll_back(self, rec: EditRecord, why: str) -> None:
        self._touched.add(rec.expert_id)
        if rec.status != "rolling_back":
            rec = self.ledger.set_status(rec.edit_id, "rolling_back")
        undo(rec, self.store, self.keystore)
        self.ledger.set_status(rec.edit_id, "rolled_back", note=f"{RECOVERED}: {why}", recovered=True)

    # pinned zero keys no live edit owns: slots reserved just before a crash
    def _sweep(self) -> tuple[list[int], list[int]]:
        orphans = unowned_pinned(self.keystore, self.ledger)
        if not orphans:
            return [], []
        keys = np.asarray(self.keystore.get(np.array(orphans, np.int64)), np.float32)
        zero = ~np.any(keys, axis=1)
        freed = [i for i, z in zip(orphans, zero) if z]
        if freed:
            self.keystore.free(np.array(freed, np.int64))
            self._touched.update(freed)
        return freed, [i for i, z in zip(orphans, zero) if not z]


def unowned_pinned(keystore: Any, ledger: EditLedger) -> list[int]:
    """Active pinned slots that no live (committed or verified) ledger entry owns."""
    ids = np.asarray(keystore.active_ids(), np.int64).reshape(-1)
    if ids.size == 0:
        return []
    pinned = np.asarray(keystore.is_pinned(ids), bool).reshape(-1)
    owned = np.isin(ids, np.array(sorted(ledger.live_experts()), np.int64))
    return [int(i) for i in ids[pinned & ~owned]]


@dataclass(frozen=True)
class Audit:
    """The edit invariants checked against the stores (edit ids, slot ids)."""

    lost_experts: tuple[str, ...] = ()      # a live edit whose expert is not stored at its version
    lost_keys: tuple[str, ...] = ()         # a live edit whose slot does not hold its key, pinned
    orphaned_slots: tuple[int, ...] = ()    # pinned slots no live edit owns
    in_flight: tuple[str, ...] = ()         # edits still "intent" or "rolling_back"
    details: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost_experts or self.lost_keys or self.orphaned_slots or self.in_flight)

    def to_json(self) -> dict[str, Any]:
        return {"lost_experts": list(self.lost_experts), "lost_keys": list(self.lost_keys),
                "orphaned_slots": list(self.orphaned_slots), "in_flight": list(self.in_flight),
                "details": dict(self.details), "ok": self.ok}


def audit(store: Any, keystore: Any, ledger: EditLedger) -> Audit:
    """Every live edit (the latest per expert) has its expert at its version and its key, pinned; no
    pinned slot without a live edit; nothing in flight."""
    latest: dict[int, EditRecord] = {}
    for rec in ledger.list(LIVE):
        if rec.expert_id not in latest or rec.created_at >= latest[rec.expert_id].created_at:
            latest[rec.expert_id] = rec
    lost_e, lost_k, details = [], [], {}
    for eid, rec in latest.items():
        w = Writes.of(rec, store, keystore)
        if not w.expert(rec):
            lost_e.append(rec.edit_id)
            details[rec.edit_id] = f"expert {eid} at version {w.version}, the ledger says {rec.new_version}"
        if not (w.slot.holds(rec.new_key) and w.slot.pinned):
            lost_k.append(rec.edit_id)
            details.setdefault(rec.edit_id, f"slot {eid}: active={w.slot.active} pinned={w.slot.pinned}")
    return Audit(tuple(lost_e), tuple(lost_k), tuple(unowned_pinned(keystore, ledger)),
                 tuple(r.edit_id for r in ledger.in_flight()), details)


__all__ = ["Audit", "RECOVERED", "Recovery", "RecoveryReport", "Slot", "Writes", "audit", "expected_version",
           "undo", "unowned_pinned", "version_of"]
