"""Write-ahead log of key-store updates since the last snapshot.

Files ``wal-<first seq, 20 digits>.log`` in the store directory, each a 12-byte header
(``b"SRMOAWAL"`` + u32 format version) followed by records::

    b"WREC" | u32 length | u32 crc32(payload) | payload (msgpack map, little-endian)

A payload is ``{"s": seq, "e": seq of the last record of its batch, "op": str, ...fields}``; numpy
arrays travel as msgpack ext type 1 (u32 header length, msgpack [dtype str, shape], raw bytes).
Sequence numbers are consecutive across files. `WriteAheadLog.append_batch` writes a batch of records
with one ``write`` and one ``fsync``: the batch is the unit of commit, and `replay` yields whole
batches only. A torn or corrupt tail of the newest file (a crash during an append) is dropped with a
warning and truncated away; a bad record followed by valid ones, a bad older file, or a gap in the
sequence raises `WalCorruptError`.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

log = logging.getLogger(__name__)

FILE_MAGIC = b"SRMOAWAL"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sI")
REC = struct.Struct("<4sII")
REC_MAGIC = b"WREC"
MAX_RECORD = (1 << 31) - 1
_NAME = re.compile(r"^wal-(\d{20})\.log$")
_EXT_NDARRAY = 1


class WalCorruptError(RuntimeError):
    """The log is damaged somewhere a crash cannot explain (not at the end of the newest file)."""


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename / create / unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- encoding
def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        head = msgpack.packb([a.dtype.str, list(a.shape)])
        return msgpack.ExtType(_EXT_NDARRAY, struct.pack("<I", len(head)) + head + a.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot log a {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _EXT_NDARRAY:
        return msgpack.ExtType(code, data)
    (hlen,) = struct.unpack_from("<I", data)
    dtype, shape = msgpack.unpackb(data[4:4 + hlen])
    return np.frombuffer(data, dtype=np.dtype(dtype), offset=4 + hlen).reshape(shape)


def encode_record(rec: dict[str, Any]) -> bytes:
    payload = msgpack.packb(rec, default=_default, use_bin_type=True)
    if len(payload) > MAX_RECORD:
        raise ValueError(f"WAL record of {len(payload)} bytes is too large (max {MAX_RECORD})")
    return REC.pack(REC_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _parse_at(buf: Any, pos: int, size: int) -> tuple[dict[str, Any], int] | None:
    """The record at pos and the offset after it, or None when it is torn or corrupt."""
    if pos + REC.size > size:
        return None
    magic, length, crc = REC.unpack_from(buf, pos)
    end = pos + REC.size + length
    if magic != REC_MAGIC or length == 0 or end > size:
        return None
    payload = buf[pos + REC.size:end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        obj = msgpack.unpackb(payload, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - crc matched but msgpack did not: corrupt all the same
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("s"), int) or not isinstance(obj.get("e"), int):
        return None
    return obj, end


def _valid_record_after(buf: Any, start: int, size: int) -> int | None:
    """Offset of the first well-formed record starting after `start`, if any."""
    pos = start
    while True:
        pos = buf.find(REC_MAGIC, pos, size)
        if pos < 0:
            return None
        if _parse_at(buf, pos, size) is not None:
            return pos
        pos += 1


# --------------------------------------------------------------------------- files
def wal_files(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(first seq, path) of the log files in directory, oldest first."""
    out = []
    for p in Path(directory).iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def wal_path(directory: str | os.PathLike, first_seq: int) -> Path:
    return Path(directory) / f"wal-{first_seq:020d}.log"


def replay(directory: str | os.PathLike, after_seq: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Committed batches (lists of record dicts) with seq > after_seq, in order. Repairs a torn tail."""
    files = wal_files(directory)
    prev_seq: int | None = None
    for i, (_, path) in enumerate(files):
        newest = i == len(files) - 1
        for batch in _read_file(path, newest):
            s0 = batch[0]["s"]
            if prev_seq is not None and s0 != prev_seq + 1:
                raise WalCorruptError(f"{path}: sequence jumps from {prev_seq} to {s0}")
            if prev_seq is None and s0 > after_seq + 1:
                raise WalCorruptError(f"{path}: log starts at seq {s0} but the snapshot ends at {after_seq}: "
                                      f"records {after_seq + 1}..{s0 - 1} are missing")
            prev_seq = batch[-1]["s"]
            if batch[-1]["s"] > after_seq:
                yield [r for r in batch if r["s"] > after_seq]


def _read_file(path: Path, newest: bool) -> Iterator[list[dict[str, Any]]]:
    size = path.stat().st_size
    if size < HEADER.size:
        if newest:
            log.warning("WAL %s: torn header (%d bytes), removing it", path, size)
            path.unlink()
            fsync_dir(path.parent)
            return
        raise WalCorruptError(f"{path}: truncated header ({size} bytes)")
    truncate_at: int | None = None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version = HEADER.unpack_from(buf, 0)
        if magic != FILE_MAGIC or version != FORMAT_VERSION:
            raise WalCorruptError(f"{path}: not a WAL file of format {FORMAT_VERSION} (magic {magic!r})")
        pos = batch_start = HEADER.size
        batch: list[dict[str, Any]] = []
        while pos < size:
            parsed = _parse_at(buf, pos, size)
            if parsed is None:
                later = _valid_record_after(buf, pos + 1, size)
                if later is not None or not newest:
                    where = (f"followed by a valid record at byte {later}" if later is not None
                             else "in an old file")
                    raise WalCorruptError(f"{path}: corrupt record at byte {pos}, {where}")
                truncate_at = batch_start
                log.warning("WAL %s: torn or corrupt last record at byte %d; dropping %d record(s) of the "
                            "uncommitted batch and %d byte(s)", path, pos, len(batch), size - batch_start)
                break
            rec, nxt = parsed
            if batch and rec["s"] != batch[-1]["s"] + 1:
                raise WalCorruptError(f"{path}: sequence jumps from {batch[-1]['s']} to {rec['s']} "
                                      f"at byte {pos}")
            if rec["e"] < rec["s"] or (batch and rec["e"] != batch[-1]["e"]):
                raise WalCorruptError(f"{path}: record {rec['s']} at byte {pos} has a bad batch end "
                                      f"{rec['e']}")
            batch.append(rec)
            pos = nxt
            if rec["s"] == rec["e"]:
                yield batch
                batch, batch_start = [], pos
        else:
            if batch:
                if not newest:
                    raise WalCorruptError(f"{path}: batch {batch[0]['s']}..{batch[0]['e']} is incomplete")
                truncate_at = batch_start
                log.warning("WAL %s: last batch %d..%d is incomplete (torn append); dropping %d record(s)",
                            path, batch[0]["s"], batch[0]["e"], len(batch))
    if truncate_at is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_at)
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------- writer
class WriteAheadLog:
    """Appends batches to the newest log file; one fsync per batch."""

    def __init__(self, directory: str | os.PathLike, next_seq: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.next_seq = int(next_seq)
        self._f = None
        files = wal_files(self.directory)
        # Continue the newest file (replay has already cut any torn tail off it), else start one.
        self._open(files[-1][0] if files and files[-1][0] <= self.next_seq else self.next_seq)

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def path(self) -> Path:
        return self._path

    def _open(self, first_seq: int) -> None:
        path = wal_path(self.directory, first_seq)
        if path.exists() and path.stat().st_size >= HEADER.size:
            with open(path, "rb") as f:
                magic, version = HEADER.unpack(f.read(HEADER.size))
            if magic != FILE_MAGIC or version != FORMAT_VERSION:
                raise WalCorruptError(f"{path}: not a WAL file")
            self._f = open(path, "ab")  # noqa: SIM115 - kept open for appends
        else:
            self._f = open(path, "wb")  # noqa: SIM115
            self._f.write(HEADER.pack(FILE_MAGIC, FORMAT_VERSION))
            self._f.flush()
            os.fsync(self._f.fileno())
            fsync_dir(self.directory)
        self._path = path

    def append_batch(self, records: list[dict[str, Any]]) -> int:
        """Number, write and fsync records as one committed batch; returns the last seq."""
        if self._f is None:
            raise RuntimeError("the WAL is closed")
        if not records:
            return self.last_seq
        end = self.next_seq + len(records) - 1
        chunks = []
        for i, rec in enumerate(records):
            chunks.append(encode_record({"s": self.next_seq + i, "e": end, **rec}))
        self._f.write(b"".join(chunks))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.next_seq = end + 1
        return end

    def rotate(self, prune: bool = True) -> Path:
        """Start a new file at next_seq; prune=True deletes the older ones (after a durable snapshot)."""
        self.close()
        self._open(self.next_seq)
        if prune:
            self.prune(self.last_seq)
        return self._path

    def prune(self, upto_seq: int) -> None:
        """Delete files whose records all have seq <= upto_seq (never the open one)."""
        files = wal_files(self.directory)
        removed = False
        for (_, path), (next_first, _) in zip(files, files[1:]):
            if next_first <= upto_seq + 1 and path != self._path:
                path.unlink()
                removed = True
        if removed:
            fsync_dir(self.directory)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
