"""The byte format of one expert record.

    offset 0   uint32 little-endian  H = length of the msgpack header
    offset 4   uint32 little-endian  crc32 of the header bytes (a flipped alpha or shape is caught too)
    offset 8   msgpack header (H bytes), a map:
                 fmt    format version (FORMAT_VERSION)
                 ver    expert version (stamped by the shard)
                 rank   r
                 alpha  float
                 dtype  "float16" | "bfloat16" | "float32"
                 names  [target name, ...]            (payload order)
                 shapes [[d_in, d_out], ...]          (A is (r, d_in), B is (d_out, r))
                 nbytes payload length
                 crc    crc32 (zlib) of the payload
                 rel    optional: {"s": subject, "m": m, "d": D, "k": the (m, D) relation keys, float16 bytes}
    zero padding to a multiple of 8 bytes
    payload    per target in `names` order: A bytes then B bytes, C order, little-endian
               (bfloat16 as raw uint16 bits)

One header per record and no per-array framing keep encode and decode to a few microseconds.
:func:`decode_expert` builds the arrays with ``np.frombuffer`` over the given buffer: no copy, and the
arrays are read-only views that keep the buffer alive. A record that fails any check (prefix, header,
format version, shapes vs payload length, crc) raises :class:`CorruptExpertError` naming the expert
id and where it came from (the shard path).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import numpy as np

from srmoa_dist.experts.expert import STORAGE_DTYPE, ExpertRelation, LoRAExpert

FORMAT_VERSION = 1
_PREFIX = struct.Struct("<II")
_ALIGN = 8
_PAD = b"\0" * _ALIGN

Buffer = bytes | bytearray | memoryview


class CorruptExpertError(ValueError):
    """A stored expert record is damaged or not in this format. Names the expert id and shard path."""

    def __init__(self, reason: str, *, expert_id: int | None = None, where: str = "") -> None:
        self.expert_id = expert_id
        self.where = where
        self.reason = reason
        who = f"expert {expert_id}" if expert_id is not None else "expert record"
        loc = f" in {where}" if where else ""
        super().__init__(f"corrupt {who}{loc}: {reason}")


def _payload_offset(header_len: int) -> int:
    return -(-(_PREFIX.size + header_len) // _ALIGN) * _ALIGN


def _frame(header: dict[str, Any], payload: Buffer) -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    off = _payload_offset(len(h))
    return b"".join((_PREFIX.pack(len(h), zlib.crc32(h)), h, _PAD[: off - _PREFIX.size - len(h)], payload))


def encode_expert(e: LoRAExpert, *, version: int | None = None) -> bytes:
    """One expert -> record bytes. `version` overrides ``e.version`` (the shard stamps versions)."""
    parts = []
    for a, b in e.targets.values():
        parts.append(a.data if a.flags.c_contiguous else np.ascontiguousarray(a).data)
        parts.append(b.data if b.flags.c_contiguous else np.ascontiguousarray(b).data)
    payload = b"".join(parts)
    header = {
        "fmt": FORMAT_VERSION,
        "ver": e.version if version is None else int(version),
        "rank": e.rank,
        "alpha": e.alpha,
        "dtype": e.dtype,
        "names": list(e.targets),
        "shapes": [[a.shape[1], b.shape[0]] for a, b in e.targets.values()],
        "nbytes": len(payload),
        "crc": zlib.crc32(payload),
    }
    if e.relation is not None:
        m, d = e.relation.keys.shape
        header["rel"] = {"s": e.relation.subject, "m": m, "d": d, "k": e.relation.keys.tobytes()}
    return _frame(header, payload)


def _relation(header: dict[str, Any], expert_id: int | None, where: str) -> ExpertRelation | None:
    rel = header.get("rel")
    if rel is None:
        return None
    try:
        keys = np.frombuffer(rel["k"], dtype="<f2").reshape(int(rel["m"]), int(rel["d"]))
        return ExpertRelation(rel["s"], keys)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptExpertError(f"bad relation block ({exc})", expert_id=expert_id, where=where) from None


def read_header(buf: Buffer, *, expert_id: int | None = None, where: str = "") -> tuple[dict[str, Any], int]:
    """Parse and check the header (not the payload crc): (header, payload offset)."""
    mv = memoryview(buf)
    n = mv.nbytes
    if n < _PREFIX.size:
        raise CorruptExpertError(
            f"record of {n} bytes is shorter than its prefix", expert_id=expert_id, where=where
        )
    hlen, hcrc = _PREFIX.unpack_from(mv, 0)
    off = _payload_offset(hlen)
    if off > n:
        raise CorruptExpertError(
            f"header length {hlen} runs past the record end ({n} bytes)", expert_id=expert_id, where=where
        )
    hbytes = mv[_PREFIX.size : _PREFIX.size + hlen]
    if zlib.crc32(hbytes) != hcrc:
        raise CorruptExpertError("header crc32 mismatch", expert_id=expert_id, where=where)
    try:
        header = msgpack.unpackb(hbytes, raw=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise CorruptExpertError(f"unreadable header ({exc})", expert_id=expert_id, where=where) from None
    if not isinstance(header, dict) or header.get("fmt") != FORMAT_VERSION:
        fmt = header.get("fmt") if isinstance(header, dict) else header
        raise CorruptExpertError(
            f"format version {fmt!r} is not {FORMAT_VERSION}", expert_id=expert_id, where=where
        )
    try:
        nbytes = header["nbytes"]
        for k in ("ver", "rank", "alpha", "dtype", "names", "shapes", "crc"):
            header[k]  # noqa: B018 -- presence check
    except KeyError as exc:
        raise CorruptExpertError(f"header lacks field {exc}", expert_id=expert_id, where=where) from None
    if off + nbytes != n:
        raise CorruptExpertError(
            f"payload is {n - off} bytes but the header says {nbytes}", expert_id=expert_id, where=where
        )
    return header, off


def record_version(buf: Buffer) -> int:
    """The expert version stamped in a record's header."""
    return read_header(buf)[0]["ver"]


def verify_record(buf: Buffer, *, expert_id: int | None = None, where: str = "") -> dict[str, Any]:
    """Check header, layout and crc of a record without building arrays; returns the header."""
    header, off = read_header(buf, expert_id=expert_id, where=where)
    _check_layout(header, expert_id, where)
    if zlib.crc32(memoryview(buf)[off:]) != header["crc"]:
        raise CorruptExpertError("payload crc32 mismatch", expert_id=expert_id, where=where)
    return header


def _check_layout(header: dict[str, Any], expert_id: int | None, where: str) -> np.dtype:
    dt = STORAGE_DTYPE.get(header["dtype"]) if isinstance(header["dtype"], str) else None
    if dt is None:
        raise CorruptExpertError(f"unknown dtype {header['dtype']!r}", expert_id=expert_id, where=where)
    r = header["rank"]
    names, shapes = header["names"], header["shapes"]
    try:
        if len(names) != len(shapes) or not names or r <= 0:
            raise ValueError("names, shapes and rank disagree")
        total = sum(r * (int(d_in) + int(d_out)) for d_in, d_out in shapes) * dt.itemsize
    except (TypeError, ValueError) as exc:
        raise CorruptExpertError(f"bad header layout ({exc})", expert_id=expert_id, where=where) from None
    if total != header["nbytes"]:
        raise CorruptExpertError(
            f"shapes need {total} payload bytes but the header says {header['nbytes']}",
            expert_id=expert_id,
            where=where,
        )
    return dt


def decode_expert(buf: Buffer, *, expert_id: int | None = None, where: str = "") -> LoRAExpert:
    """Record bytes -> expert whose arrays are read-only views over `buf` (no copy).

    The caller must keep `buf` valid and unchanged while the arrays live (a ``bytes`` object is;
    an LMDB buffer is valid only inside its transaction: copy it to ``bytes`` first)."""
    header, off = read_header(buf, expert_id=expert_id, where=where)
    dt = _check_layout(header, expert_id, where)
    mv = memoryview(buf)
    if zlib.crc32(mv[off:]) != header["crc"]:
        raise CorruptExpertError("payload crc32 mismatch", expert_id=expert_id, where=where)
    r = header["rank"]
    flat = np.frombuffer(mv, dtype=dt, offset=off, count=header["nbytes"] // dt.itemsize)
    if flat.flags.writeable:  # a writable source buffer (bytearray): keep the views read-only
        flat.flags.writeable = False
    targets = {}
    pos = 0
    for name, (d_in, d_out) in zip(header["names"], header["shapes"], strict=True):
        na, nb = r * d_in, d_out * r
        a = flat[pos : pos + na].reshape(r, d_in)
        b = flat[pos + na : pos + na + nb].reshape(d_out, r)
        pos += na + nb
        targets[name] = (a, b)
    return LoRAExpert._unchecked(targets, float(header["alpha"]), int(header["ver"]),
                                 _relation(header, expert_id, where))


def decode_relation(buf: Buffer, *, expert_id: int | None = None, where: str = "") -> ExpertRelation | None:
    """The relation of a record (its header only: no payload read, no crc of the payload); None when the
    expert has none (seed, imported)."""
    header, _ = read_header(buf, expert_id=expert_id, where=where)
    return _relation(header, expert_id, where)


def restamp(buf: Buffer, version: int, *, expert_id: int | None = None, where: str = "") -> bytes:
    """A copy of a record with its expert version set to `version` (header re-encoded, payload kept)."""
    header, off = read_header(buf, expert_id=expert_id, where=where)
    if header["ver"] == version and isinstance(buf, bytes):
        return buf
    header["ver"] = int(version)
    return _frame(header, memoryview(buf)[off:])
