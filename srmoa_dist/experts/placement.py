"""Expert id -> shard, by jump consistent hash (Lamping & Veach, 2014, arXiv:1406.2294).

Going from n to n + 1 shards moves about 1/(n + 1) of the ids (all of them to the new shard), and
the mapping needs no table. The id itself is the 64-bit key (no pre-hash): the algorithm's LCG
spreads sequential ids evenly, and the function equals the reference C++ code bit for bit
(``jump_hash`` scalar, ``shard_of`` vectorised over numpy arrays; both give the same answers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MASK = (1 << 64) - 1
_LCG = 2862933555777941757
_TWO31 = float(1 << 31)
_SMALL = 32


def jump_hash(key: int, n_buckets: int) -> int:
    """Bucket in [0, n_buckets) of a 64-bit key (negative keys are taken modulo 2**64)."""
    if n_buckets <= 0:
        raise ValueError(f"n_buckets must be positive, got {n_buckets!r}")
    key = int(key) & _MASK
    b, j = -1, 0
    while j < n_buckets:
        b = j
        key = (key * _LCG + 1) & _MASK
        j = int((b + 1) * (_TWO31 / float((key >> 33) + 1)))
    return b


def shard_of(ids: Any, n_shards: int) -> np.ndarray:
    """Vectorised jump_hash: shard of each id, int64 array of the same shape as `ids`."""
    if not isinstance(n_shards, (int, np.integer)) or n_shards <= 0:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    shape = arr.shape
    keys = arr.reshape(-1).astype(np.uint64)  # int64 -> two's complement, as in jump_hash
    out = np.zeros(keys.shape[0], dtype=np.int64)
    if n_shards == 1 or keys.size == 0:
        return out.reshape(shape)
    if keys.size <= _SMALL:  # numpy's per-call overhead dominates small batches
        out[:] = [jump_hash(k, n_shards) for k in keys.tolist()]
        return out.reshape(shape)
    # Iterate all keys together; keys whose next jump lands past n_shards drop out.
    idx = np.arange(keys.shape[0])
    b = np.full(keys.shape[0], -1, dtype=np.int64)
    j = np.zeros(keys.shape[0], dtype=np.int64)
    lcg, one, s33 = np.uint64(_LCG), np.uint64(1), np.uint64(33)
    while idx.size:
        b = j
        keys = keys * lcg + one  # wraps modulo 2**64
        step = _TWO31 / ((keys >> s33) + one).astype(np.float64)
        j = ((b + 1).astype(np.float64) * step).astype(np.int64)
        done = j >= n_shards
        if done.any():
            out[idx[done]] = b[done]
            keep = ~done
            idx, keys, b, j = idx[keep], keys[keep], b[keep], j[keep]
    return out.reshape(shape)
