"""The expert catalog: what a person knows an expert by (its name, origin, namespace, examples).

One SQLite file, ``<data_dir>/catalog.sqlite`` (synchronous=FULL: a returned write is on disk), that
any process of the store may open (the ingress for the HTTP routes, the trainer for edits); SQLite's
file locks serialise writers. One row per expert id:

    id        the expert id (its key slot and its record in the shards)
    name      unique within its namespace; None for an edit nobody named
    namespace the tenant that owns it (routing/namespaces.py)
    origin    "edit" (made by SR-TTT feedback) | "import" (a PEFT adapter brought in)
    created   unix time
    examples  the example prompts (an import's, or an edit's failing question)
    edit_id   the ledger entry of an edit (None for an import)

The weights live in the shards and the key in the key store; the catalog only describes them.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from srmoa_dist.routing.namespaces import check_name

log = logging.getLogger(__name__)

CATALOG_NAME = "catalog.sqlite"
ORIGINS = ("edit", "import")
MAX_LIMIT = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    id INTEGER PRIMARY KEY,
    name TEXT,
    namespace TEXT NOT NULL,
    origin TEXT NOT NULL,
    created REAL NOT NULL,
    examples TEXT NOT NULL,
    edit_id TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS experts_name ON experts (namespace, name);
"""


class NameTakenError(ValueError):
    """The name is already an expert's in that namespace."""


@dataclass(frozen=True)
class CatalogEntry:
    id: int
    namespace: str
    origin: str
    name: str | None = None
    created: float = field(default_factory=time.time)
    examples: tuple[str, ...] = ()
    edit_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"id must be a non-negative integer, got {self.id!r}")
        check_name(self.namespace)
        if self.origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {self.origin!r}")
        if self.name is not None:
            check_name(self.name, "name")
        object.__setattr__(self, "examples", tuple(str(x) for x in self.examples))

    def to_json(self) -> dict:
        return {**asdict(self), "examples": list(self.examples)}


class ExpertCatalog:
    """The catalog file of one store (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @classmethod
    def of(cls, data_dir: str | os.PathLike) -> ExpertCatalog:
        return cls(Path(data_dir) / CATALOG_NAME)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            db.execute("PRAGMA synchronous=FULL")
            with db:                                    # one transaction: commit or roll back
                yield db
        finally:
            db.close()

    # -- writes ---------------------------------------------------------------------------------------

    def put(self, entry: CatalogEntry) -> CatalogEntry:
        """Insert or replace the entry of `entry.id`; NameTakenError when another expert of the
        namespace has the name."""
        try:
            with self._db() as db:
                db.execute("INSERT INTO experts VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                           "name=excluded.name, namespace=excluded.namespace, origin=excluded.origin, "
                           "created=excluded.created, examples=excluded.examples, edit_id=excluded.edit_id",
                           (entry.id, entry.name, entry.namespace, entry.origin, entry.created,
                            json.dumps(list(entry.examples)), entry.edit_id))
        except sqlite3.IntegrityError:
            raise NameTakenError(f"name {entry.name!r} is already an expert's in namespace "
                                 f"{entry.namespace!r}") from None
        return entry

    def remove(self, expert_id: int) -> bool:
        """Drop the entry of `expert_id`; False when there was none."""
        with self._db() as db:
            return db.execute("DELETE FROM experts WHERE id = ?", (int(expert_id),)).rowcount > 0

    # -- reads ----------------------------------------------------------------------------------------

    def get(self, expert_id: int) -> CatalogEntry | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM experts WHERE id = ?", (int(expert_id),)).fetchone()
        return _entry(row) if row else None

    def by_name(self, namespace: str, name: str) -> CatalogEntry | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM experts WHERE namespace = ? AND name = ?",
                             (namespace, name)).fetchone()
        return _entry(row) if row else None

    def list(self, *, namespaces: Collection[str] | None = None, origin: str | None = None,
             named: bool = False, after: int | None = None, limit: int = 100,
             ) -> tuple[list[CatalogEntry], bool]:
        """Entries by ascending id after `after`, at most `limit`, filtered; and whether more follow."""
        if not 1 <= int(limit) <= MAX_LIMIT:
            raise ValueError(f"limit must be in 1..{MAX_LIMIT}, got {limit!r}")
        if origin is not None and origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        if after is not None and not -1 <= int(after) < 2**63:       # SQLite INTEGER is 64-bit
            raise ValueError(f"after must be an expert id in -1..{2**63 - 1}, got {after!r}")
        where, args = ["id > ?"], [-1 if after is None else int(after)]
        if namespaces is not None:
            ns = sorted(namespaces)
            if not ns:
                return [], False
            where.append(f"namespace IN ({', '.join('?' * len(ns))})")
            args += ns
        if origin is not None:
            where.append("origin = ?")
            args.append(origin)
        if named:
            where.append("name IS NOT NULL")
        sql = f"SELECT * FROM experts WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        with self._db() as db:
            rows = db.execute(sql, (*args, int(limit) + 1)).fetchall()
        return [_entry(r) for r in rows[: int(limit)]], len(rows) > int(limit)

    def counts(self) -> dict[str, dict[str, int]]:
        """namespace -> origin -> number of experts."""
        out: dict[str, dict[str, int]] = {}
        with self._db() as db:
            for ns, origin, n in db.execute(
                    "SELECT namespace, origin, COUNT(*) FROM experts GROUP BY namespace, origin"):
                out.setdefault(ns, {})[origin] = int(n)
        return out


def _entry(row: tuple) -> CatalogEntry:
    i, name, ns, origin, created, examples, edit_id = row
    return CatalogEntry(id=int(i), name=name, namespace=ns, origin=origin, created=float(created),
                        examples=tuple(json.loads(examples)), edit_id=edit_id)


__all__ = ["CATALOG_NAME", "ORIGINS", "CatalogEntry", "ExpertCatalog", "NameTakenError"]
