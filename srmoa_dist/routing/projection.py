"""A 2-D map of routing keys: their two principal components (PCA), for the /ui page.

The keys are centred and projected on the top two eigenvectors of their covariance (d_key x d_key,
so the cost is O(n d^2 + d^3) whatever n). Each axis's sign is fixed (its largest loading positive)
so that the map does not flip between two refreshes of the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Projection:
    """xy (n, 2) float32 coordinates; explained: the share of the variance of each axis."""

    xy: np.ndarray
    explained: tuple[float, float]


def key_dump(ks: Any) -> dict[str, Any]:
    """Every active key of a KeyStore at once (the map's input; the caller holds the store's lock):
    ids (n,), keys (n, d_key) float32, usage, pinned, key versions, namespaces, the batch step."""
    ids = ks.active_ids()
    if ids.size == 0:
        return {"ids": ids, "keys": np.zeros((0, ks.d), np.float32), "usage": [], "pinned": [],
                "versions": [], "namespaces": [], "step": int(ks.step)}
    return {"ids": ids, "keys": ks.get(ids), "usage": ks.usage(ids).tolist(),
            "pinned": ks.is_pinned(ids).tolist(), "versions": ks.versions(ids).tolist(),
            "namespaces": ks.namespace_of(ids), "step": int(ks.step)}


def pca_2d(keys: np.ndarray) -> Projection:
    """The keys (n, d) on their first two principal axes; fewer than two keys or dimensions give
    zeros on the missing axes. A ValueError when keys is not 2-D or holds NaN/inf."""
    x = np.asarray(keys, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"keys must have shape (n, d_key), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("keys hold NaN or inf values")
    n, d = x.shape
    xy = np.zeros((n, 2), dtype=np.float32)
    if n < 2 or d == 0:
        return Projection(xy, (0.0, 0.0))
    xc = x - x.mean(axis=0, keepdims=True)
    cov = xc.T @ xc / n                                              # (d, d)
    vals, vecs = np.linalg.eigh(cov)                                 # ascending
    order = np.argsort(vals)[::-1][:2]
    total = float(vals.clip(min=0).sum())
    explained = [0.0, 0.0]
    for j, c in enumerate(order):
        v = vecs[:, c]
        v = v if v[np.argmax(np.abs(v))] >= 0 else -v               # a fixed sign per axis
        xy[:, j] = (xc @ v).astype(np.float32)
        explained[j] = max(0.0, float(vals[c])) / total if total > 0 else 0.0
    return Projection(xy, (explained[0], explained[1]))


__all__ = ["Projection", "key_dump", "pca_2d"]
