"""The edit ledger: an append-only JSONL file on disk, one line per event, fsynced.

An edit is first written as an *intent* (status "intent": what it is about to write, and what was there
before: expert id or -1 while its slot is not reserved yet, created, previous version, previous key and
pin state, new key), durable before any of its writes; an intent line may be rewritten while it is an
intent. The commit line then replaces the intent with the full record (status "committed", or "failed"
when the edit was undone). Status lines follow (verified, rolling_back before a rollback's writes,
rolled_back, failed). `ttt.recovery` settles whatever a crash left "intent", "committed" or
"rolling_back". Reading folds the lines by edit_id: the first line is the record, later lines update
status, timestamps and notes. A line is complete when its newline is written (one
``write`` per line, fsynced). A torn last line (a crash mid-write, no newline yet) is dropped with a
warning and truncated away on open, so the next append starts on a clean line; any other corrupt line
raises a ValueError naming the file and line. Appends and the repair on open hold an exclusive
``flock`` on the file, so opening a ledger never cuts off another process's append in flight.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STATUSES = ("intent", "committed", "verified", "rolling_back", "rolled_back", "failed")
LIVE = ("committed", "verified")             # edits in force: their expert version and key are served
IN_FLIGHT = ("intent", "rolling_back")       # writes of these may be partly done (ttt.recovery settles them)
LEDGER_FILE = "edits.jsonl"
_FORMAT = 1


def encode_key(key: np.ndarray | None) -> str | None:
    """float32 vector -> base64 of its little-endian bytes (exact round trip)."""
    if key is None:
        return None
    return base64.b64encode(np.ascontiguousarray(key, dtype="<f4").tobytes()).decode("ascii")


def decode_key(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


@dataclass(frozen=True)
class EditRecord:
    """One edit as the ledger knows it (the fold of its lines)."""

    edit_id: str
    status: str
    rule: str
    prompts: tuple[dict, ...]                 # TrainingPrompt.to_dict() of each of the 4 prompts
    expert_id: int
    created: bool                             # a new expert (rollback frees its slot) or a refined one
    prev_version: int | None                  # the expert's version before the edit (None when created)
    new_version: int | None
    prev_key: np.ndarray | None = field(default=None, compare=False)   # (d_key,) float32, None when created
    new_key: np.ndarray | None = field(default=None, compare=False)
    prev_pinned: bool = False
    lm_losses: tuple[float, ...] = ()
    router_losses: tuple[float, ...] = ()
    steps: int = 0
    question: str = ""
    correct_answer: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    train_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"edit status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["prev_key"] = encode_key(self.prev_key)
        d["new_key"] = encode_key(self.new_key)
        d["prompts"] = list(self.prompts)
        d["lm_losses"] = list(self.lm_losses)
        d["router_losses"] = list(self.router_losses)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EditRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["prev_key"] = decode_key(d.get("prev_key"))
        kw["new_key"] = decode_key(d.get("new_key"))
        kw["prompts"] = tuple(d.get("prompts", ()))
        kw["lm_losses"] = tuple(float(x) for x in d.get("lm_losses", ()))
        kw["router_losses"] = tuple(float(x) for x in d.get("router_losses", ()))
        kw["notes"] = tuple(d.get("notes", ()))
        return cls(**kw)


class EditLedger:
    """Append-only JSONL ledger under `root` (a directory, created if needed). Thread-safe appends."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / LEDGER_FILE
        self._lock = threading.Lock()
        self._records: dict[str, EditRecord] = {}
        self._load()

    # -- writing --------------------------------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"edit-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"

    def _append(self, line: dict[str, Any]) -> None:
        data = (json.dumps(line, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)                      # closing releases the flock

    def intent(self, record: EditRecord) -> EditRecord:
        """Write (or rewrite) an edit's intent: status "intent", durable before any of its writes. Its
        edit_id must be new or still an intent."""
        if record.status != "intent":
            raise ValueError(f"an intent record has status 'intent', got {record.status!r}")
        return self._write("intent", record)

    def commit(self, record: EditRecord) -> EditRecord:
        """Write an edit's record (usually 'committed'; 'failed' for an edit undone). Its edit_id must be
        new or an intent, which the record replaces (keeping its created_at)."""
        if record.status == "intent":
            raise ValueError("commit takes a settled record; write intents with intent()")
        return self._write("commit", record)

    def _write(self, op: str, record: EditRecord) -> EditRecord:
        with self._lock:
            old = self._records.get(record.edit_id)
            if old is not None and old.status != "intent":
                raise ValueError(f"edit {record.edit_id!r} is already in the ledger {self.path} "
                                 f"({old.status})")
            now = time.time()
            created = (old.created_at if old is not None else 0.0) or record.created_at or now
            rec = dataclasses.replace(record, created_at=created, updated_at=now)
            self._append({"format": _FORMAT, "op": op, "record": rec.to_json()})
            self._records[rec.edit_id] = rec
            return rec

    def set_status(self, edit_id: str, status: str, note: str = "", **extra: Any) -> EditRecord:
        """Append a status change (verified, rolled_back, failed) with an optional note."""
        if status not in STATUSES:
            raise ValueError(f"edit status must be one of {STATUSES}, got {status!r}")
        with self._lock:
            rec = self.get(edit_id)
            now = time.time()
            line = {"format": _FORMAT, "op": "status", "edit_id": edit_id, "status": status, "at": now,
                    "note": note, "extra": extra}
            self._append(line)
            rec = self._fold_status(rec, line)
            self._records[edit_id] = rec
            return rec

    # -- reading --------------------------------------------------------------------------------------

    def get(self, edit_id: str) -> EditRecord:
        try:
            return self._records[edit_id]
        except KeyError:
            raise KeyError(f"no edit {edit_id!r} in the ledger {self.path}") from None

    def list(self, status: str | Sequence[str] | None = None) -> list[EditRecord]:
        """All edits in commit order, optionally only those with the given status(es)."""
        recs = list(self._records.values())
        if status is not None:
            want = {status} if isinstance(status, str) else set(status)
            bad = want - set(STATUSES)
            if bad:
                raise ValueError(f"unknown status(es) {sorted(bad)}; known: {STATUSES}")
            recs = [r for r in recs if r.status in want]
        return recs

    def live_experts(self) -> set[int]:
        """Experts held by an edit in force (committed or verified, not rolled back)."""
        return {r.expert_id for r in self._records.values() if r.status in LIVE}

    def in_flight(self) -> list[EditRecord]:
        """Edits whose writes may be partly done (an intent, a rollback under way)."""
        return [r for r in self._records.values() if r.status in IN_FLIGHT]

    def by_job(self, job_id: str) -> list[EditRecord]:
        """The edits a trainer job ran (its id in the record's extra), in commit order."""
        return [r for r in self._records.values() if r.extra.get("job_id") == job_id]

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._records

    def reload(self) -> None:
        with self._lock:
            self._records = {}
            self._load()

    @staticmethod
    def _fold_status(rec: EditRecord, line: dict[str, Any]) -> EditRecord:
        notes = rec.notes + ((line["note"],) if line.get("note") else ())
        extra = {**rec.extra, **(line.get("extra") or {})}
        return dataclasses.replace(rec, status=line["status"], updated_at=float(line["at"]), notes=notes,
                                   extra=extra)

    def _load(self) -> None:
        """Fold the file's complete lines into `_records`; cut a torn last line off the file (fsynced)."""
        if not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)    # no append of another process is half-written meanwhile
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
            complete = raw.rfind(b"\n") + 1  # end of the last complete line (0: none)
            if complete < len(raw):
                log.warning("ledger %s: torn last line (%d byte(s) without a newline after byte %d) "
                            "dropped and truncated away", self.path, len(raw) - complete, complete)
                os.ftruncate(fd, complete)
                os.fsync(fd)
        finally:
            os.close(fd)
        self._fold_lines(raw[:complete])

    def _fold_lines(self, raw: bytes) -> None:
        for n, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"ledger {self.path} line {n} is not valid JSON: {e}") from None
            try:
                if obj.get("format") != _FORMAT:
                    raise ValueError(f"unknown format {obj.get('format')!r}")
                if obj["op"] in ("intent", "commit"):
                    rec = EditRecord.from_json(obj["record"])
                    old = self._records.get(rec.edit_id)
                    if old is not None and old.status != "intent":
                        raise ValueError(f"{obj['op']} line for edit {rec.edit_id!r}, which is {old.status}")
                    self._records[rec.edit_id] = rec
                elif obj["op"] == "status":
                    eid = obj["edit_id"]
                    if eid not in self._records:
                        raise ValueError(f"status line for unknown edit {eid!r}")
                    self._records[eid] = self._fold_status(self._records[eid], obj)
                else:
                    raise ValueError(f"unknown op {obj['op']!r}")
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"ledger {self.path} line {n} is corrupt: {e}") from None
