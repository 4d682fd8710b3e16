"""Key-store snapshots: one Arrow IPC file, written to a temp file, fsynced, renamed, directory fsynced.

``snapshot.arrow`` holds one row per used slot (slot = row number):

    key      FixedSizeList<float32>[d_key]
    usage    float32   usage EMA, valid at batch `utick`
    utick    int64
    dtick    int64     batch up to which the key's decay is materialised (see gravity.py)
    pinned   bool
    free     bool
    version  int64
    ivf_list int32     IVF list of the slot in the index at snapshot time (-1 = none / exact index)
    namespace int32    namespace code of the slot (names in the metadata's ``namespaces`` list;
                       absent in older snapshots: every slot in "default")

and JSON metadata under the schema key ``srmoa``: format, d_key, wal_seq (the last WAL record the
snapshot includes), step, cursor, drift_sum, index_kind, n_trained, centroids_crc. IVF centroids go to
``centroids-<crc32>.arrow`` (written first, same procedure) so an index can be rebuilt without
retraining; files of other crcs are removed once the snapshot that names them is gone.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from srmoa_dist.routing.wal import fsync_dir

SNAPSHOT_NAME = "snapshot.arrow"
FORMAT = "srmoa-keystore-snapshot/1"
_META_KEY = b"srmoa"


class CorruptSnapshotError(RuntimeError):
    """The snapshot file cannot be read or does not match the store's configuration."""


@dataclass
class Snapshot:
    keys: np.ndarray           # (n, d) float32
    usage: np.ndarray          # (n,) float32
    utick: np.ndarray          # (n,) int64
    dtick: np.ndarray          # (n,) int64
    pinned: np.ndarray         # (n,) bool
    free: np.ndarray           # (n,) bool
    versions: np.ndarray       # (n,) int64
    lists: np.ndarray          # (n,) int64, -1 = none
    meta: dict[str, Any] = field(default_factory=dict)
    centroids: np.ndarray | None = None   # (nlist, d) float32
    namespaces: np.ndarray | None = None  # (n,) int32 namespace codes (None: all "default")

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])


def _write_table_atomic(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 16)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _key_column(keys: np.ndarray) -> pa.FixedSizeListArray:
    n, d = keys.shape
    flat = pa.array(np.ascontiguousarray(keys, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, d)


def _keys_of(col: pa.ChunkedArray, d: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)


def centroids_path(directory: Path, crc: int) -> Path:
    return directory / f"centroids-{crc:08x}.arrow"


def write_snapshot(directory: str | os.PathLike, snap: Snapshot) -> Path:
    """Write snap durably as directory/snapshot.arrow (and its centroids file); returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d = int(snap.keys.shape[1])
    meta = {**snap.meta, "format": FORMAT, "d_key": d, "centroids_crc": None}
    if snap.centroids is not None:
        c = np.ascontiguousarray(snap.centroids, dtype=np.float32)
        crc = zlib.crc32(c.tobytes())
        meta["centroids_crc"] = crc
        cpath = centroids_path(directory, crc)
        if not cpath.exists():
            _write_table_atomic(cpath, pa.table({"centroid": _key_column(c)}))
    table = pa.table({
        "key": _key_column(snap.keys),
        "usage": pa.array(np.asarray(snap.usage, dtype=np.float32)),
        "utick": pa.array(np.asarray(snap.utick, dtype=np.int64)),
        "dtick": pa.array(np.asarray(snap.dtick, dtype=np.int64)),
        "pinned": pa.array(np.asarray(snap.pinned, dtype=bool)),
        "free": pa.array(np.asarray(snap.free, dtype=bool)),
        "version": pa.array(np.asarray(snap.versions, dtype=np.int64)),
        "ivf_list": pa.array(np.asarray(snap.lists, dtype=np.int32)),
        **({"namespace": pa.array(np.asarray(snap.namespaces, dtype=np.int32))}
           if snap.namespaces is not None else {}),
    }).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path = directory / SNAPSHOT_NAME
    _write_table_atomic(path, table)
    crc = meta["centroids_crc"]
    keep = centroids_path(directory, crc).name if crc is not None else None
    stale = [p for p in directory.glob("centroids-*.arrow") if p.name != keep]
    for p in stale:
        p.unlink()
    if stale:
        fsync_dir(directory)
    return path


def read_snapshot(directory: str | os.PathLike) -> Snapshot | None:
    """The snapshot in directory, or None when there is none. Leftover temp files are removed."""
    directory = Path(directory)
    for tmp in directory.glob("*.arrow.tmp"):
        tmp.unlink()
    path = directory / SNAPSHOT_NAME
    if not path.exists():
        return None
    try:
        with pa.memory_map(str(path), "r") as src:
            table = pa.ipc.open_file(src).read_all()
        meta = json.loads(table.schema.metadata[_META_KEY])
    except (pa.ArrowInvalid, OSError, KeyError, TypeError, ValueError) as e:
        raise CorruptSnapshotError(f"cannot read key-store snapshot {path}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CorruptSnapshotError(f"{path}: unknown snapshot format {meta.get('format')!r}")
    d = int(meta["d_key"])

    def col(name: str, dtype: Any) -> np.ndarray:
        return np.array(table.column(name).to_numpy(), dtype=dtype)

    centroids = None
    crc = meta.get("centroids_crc")
    if crc is not None:
        cpath = centroids_path(directory, int(crc))
        if cpath.exists():
            with pa.memory_map(str(cpath), "r") as src:
                c = _keys_of(pa.ipc.open_file(src).read_all().column("centroid"), d)
            if zlib.crc32(c.tobytes()) == int(crc):
                centroids = c
    return Snapshot(
        keys=_keys_of(table.column("key"), d).copy(),
        usage=col("usage", np.float32), utick=col("utick", np.int64), dtick=col("dtick", np.int64),
        pinned=col("pinned", bool), free=col("free", bool), versions=col("version", np.int64),
        lists=col("ivf_list", np.int64), meta=meta, centroids=centroids,
        namespaces=col("namespace", np.int32) if "namespace" in table.column_names else None,
    )
