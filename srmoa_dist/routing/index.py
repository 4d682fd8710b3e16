"""The FAISS index derived from the key array: exact or IVF, inner product, CPU or GPU.

Ids in the index are KeyStore slot numbers. Kinds:
- ``exact``: ``IndexIDMap2(IndexFlatIP)``; remove is O(ntotal) (an ``IDSelectorBatch`` pass), fine
  below ``KeyStoreConfig.ivf_threshold`` keys.
- ``ivf``: ``IndexIVFFlat`` (inner product, spherical k-means centroids) with a *hashtable* direct map,
  so a moved key is removed in O(1) (``IDSelectorArray``) and re-added. We assign lists ourselves
  (``quantizer.search``) and add with ``add_core``: the list of every slot is kept in ``assign``, so a
  key that is only rescaled (decay; a positive scale keeps its argmax-inner-product centroid) or an
  index rebuilt from a snapshot skips the quantizer. Measured at 1M keys, d 128, nlist 4000, 2 cores:
  ``update_vectors`` (which, with a hashtable direct map, is remove_ids + add_with_ids inside FAISS)
  and our remove + assign + add_core both move ~140k keys/s, the quantizer taking ~90% of it; the
  rescale path (no quantizer) ~1M keys/s. So a moved key skips the quantizer when it provably keeps
  its list: with unit centroids, |<u, c> - <u', c>| <= |u - u'| for directions u, u'; a key assigned
  with a top-1 / top-2 margin m (on its direction) keeps its argmax while the sum of its direction
  moves e stays below m / 2. `margin` holds m - 2 * sum(e) per slot (measured: ~2/3 of gravity moves
  at 1M keys skip the quantizer; the assignment stays exact).

GPU: with a FAISS GPU build and a visible GPU (`faiss_gpu_available`), searches run on a clone made by
``index_cpu_to_gpu``; the CPU index stays the mutable truth. After changes the clone is re-made at most
every ``gpu_sync_s`` seconds; in between `search` says its results are stale and the caller re-scores
them against the key array (`rescore`), so scores are exact and freed slots are never returned.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("exact", "ivf")


def faiss_gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001 - a broken CUDA runtime means no GPU
        return False


def select_device(requested: str, gpu_available: bool | None = None) -> str:
    """'cpu' or 'gpu' for a requested device 'auto' | 'cpu' | 'gpu' (gpu without a GPU is an error)."""
    avail = faiss_gpu_available() if gpu_available is None else gpu_available
    if requested == "cpu":
        return "cpu"
    if requested == "gpu":
        if not avail:
            raise ValueError("keystore.device is 'gpu' but FAISS has no GPU support or sees no GPU "
                             "(install faiss-gpu-cu12: pip install 'srmoa-dist[gpu]')")
        return "gpu"
    if requested == "auto":
        return "gpu" if avail else "cpu"
    raise ValueError(f"keystore.device must be one of ('auto', 'cpu', 'gpu'), got {requested!r}")


def auto_nlist(n: int, requested: int = 0) -> int:
    """IVF list count: `requested`, or about 4 * sqrt(n); clamped to [1, n // 8] so lists are not tiny."""
    nlist = requested if requested > 0 else int(round(4 * math.sqrt(max(n, 1))))
    return int(max(1, min(nlist, 65536, max(1, n // 8))))


def train_centroids(x: np.ndarray, nlist: int, *, niter: int = 10, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (nlist, d) float32 of the sample x (n, d)."""
    n, d = x.shape
    if n < nlist:
        raise ValueError(f"cannot train {nlist} IVF lists on {n} keys")
    if n < 39 * nlist:
        log.info("training %d IVF lists on %d keys (< 39 per list); recall may suffer", nlist, n)
    km = faiss.Kmeans(d, nlist, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=max(1, -(-n // nlist)), min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def rescore(xq: np.ndarray, I: np.ndarray, keys: np.ndarray,
            valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of candidate ids against the key array, invalid ids dropped, re-sorted descending.

    xq (nq, d), I (nq, k) with -1 = none, keys (N, d), valid (N,) bool. Returns D (nq, k) float32
    (-inf where none) and I (nq, k) int64.
    """
    I = np.asarray(I, dtype=np.int64).copy()
    ok = (I >= 0) & (I < keys.shape[0])
    ok[ok] = valid[I[ok]]
    I[~ok] = -1
    D = np.einsum("qd,qkd->qk", xq, keys[np.where(ok, I, 0)]).astype(np.float32)   # (nq, k)
    D[~ok] = -np.inf
    order = np.argsort(-D, axis=1, kind="stable")
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


class KeyIndex:
    """Inner-product index over slot ids; see the module docstring."""

    def __init__(self, d: int, kind: str = "exact", *, centroids: np.ndarray | None = None,
                 nprobe: int = 16, device: str = "cpu", gpu_sync_s: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
        self.d, self.kind, self.nprobe, self.device, self.gpu_sync_s = d, kind, nprobe, device, gpu_sync_s
        self.assign = np.full(0, -1, dtype=np.int64)      # (capacity,) list per slot; -1 = not indexed
        self.margin = np.zeros(0, dtype=np.float32)         # (capacity,) provable list margin left
        if kind == "exact":
            self.nlist = 0
            self.quantizer = None
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        else:
            if centroids is None or centroids.ndim != 2 or centroids.shape[1] != d:
                raise ValueError(f"an ivf index needs centroids of shape (nlist, {d})")
            self.nlist = int(centroids.shape[0])
            self.quantizer = faiss.IndexFlatIP(d)
            self.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
            self._cnorm = float(np.linalg.norm(centroids, axis=1).max())  # the margin bound scales by it
            ivf = faiss.IndexIVFFlat(self.quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.is_trained = True
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            ivf.nprobe = nprobe
            self.index = ivf
        self._gpu = None
        self._gpu_res = None
        self._gpu_dirty = True
        self._gpu_synced_at = -math.inf

    # ----------------------------------------------------------------- bookkeeping
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def centroids(self) -> np.ndarray | None:
        if self.quantizer is None:
            return None
        return self.quantizer.reconstruct_n(0, self.nlist)

    def _grow(self, n: int) -> None:
        if n > self.assign.shape[0]:
            cap = max(n, 2 * self.assign.shape[0], 1024)
            new = np.full(cap, -1, dtype=np.int64)
            new[: self.assign.shape[0]] = self.assign
            self.assign = new
            margin = np.zeros(cap, dtype=np.float32)
            margin[: self.margin.shape[0]] = self.margin
            self.margin = margin

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(ids.shape, dtype=bool)
        inside = ids < self.assign.shape[0]
        out[inside] = self.assign[ids[inside]] >= 0
        return out

    def lists_of(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IVF list (n,) int64 of each vector (argmax inner product with the centroids) and its margin
        (n,) float32 = (top-1 - top-2 score) / |x|, the slack of its direction (0 when unknown)."""
        n = x.shape[0]
        if self.quantizer is None:
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        k = min(2, self.nlist)
        D, a = self.quantizer.search(x, k)
        if k < 2:
            return a[:, 0].astype(np.int64), np.full(n, np.inf, dtype=np.float32)
        norms = np.linalg.norm(x, axis=1)
        margin = np.where(norms > 0, (D[:, 0] - D[:, 1]) / np.maximum(norms, 1e-30), 0.0)
        return a[:, 0].astype(np.int64), margin.astype(np.float32)

    # ----------------------------------------------------------------- mutation
    def add(self, ids: np.ndarray, x: np.ndarray, lists: np.ndarray | None = None,
            margins: np.ndarray | None = None) -> None:
        """Add vectors x (n, d) under ids (n,) that are not in the index; `lists` = known IVF lists
        (with their `margins`; 0 = unknown, the next move re-assigns exactly)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._grow(int(ids.max()) + 1)
        if self.kind == "exact":
            self.index.add_with_ids(x, ids)
            self.assign[ids] = 0
        else:
            if lists is None:
                lists, margins = self.lists_of(x)
            lists = np.ascontiguousarray(lists, dtype=np.int64)
            self.index.add_core(ids.size, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
            self.assign[ids] = lists
            self.margin[ids] = 0.0 if margins is None else margins
        self._gpu_dirty = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (those not in the index are ignored)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = np.ascontiguousarray(ids[self.contains(ids)])
        if ids.size == 0:
            return
        if self.kind == "exact":
            n = self.index.remove_ids(ids)                       # IDSelectorBatch: one O(ntotal) pass
        else:
            n = self.index.remove_ids(faiss.IDSelectorArray(ids.size, faiss.swig_ptr(ids)))
        if n != ids.size:
            raise RuntimeError(f"index removed {n} of {ids.size} ids: index and key array disagree")
        self.assign[ids] = -1
        self._gpu_dirty = True

    def update(self, ids: np.ndarray, x: np.ndarray, *, old: np.ndarray | None = None,
               same_lists: bool = False) -> None:
        """Replace the vectors of ids (all in the index) by x (n, d).

        same_lists=True: x only rescales them (positive factors), so IVF lists are kept. `old` (n, d):
        their previous vectors; keys whose accumulated direction move stays within their margin keep
        their list without a quantizer search (see the module docstring).
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        x = np.ascontiguousarray(x, dtype=np.float32)
        lists = margins = None
        if self.kind == "ivf":
            if (self.assign[ids] < 0).any():
                raise RuntimeError("update() of ids that are not in the index")
            lists = self.assign[ids].copy()
            margins = self.margin[ids].copy()
            if not same_lists:
                if old is None:
                    margins[:] = -1.0
                else:
                    margins -= 2.0 * self._cnorm * _direction_change(old, x) + 1e-6
                redo = np.flatnonzero(margins <= 0)
                if redo.size:
                    lists[redo], margins[redo] = self.lists_of(x[redo])
        self.remove(ids)
        self.add(ids, x, lists, margins)

    # ----------------------------------------------------------------- search
    def search(self, xq: np.ndarray, k: int,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
        """D (nq, k) float32, I (nq, k) int64 (-1 = fewer than k), stale (True: re-score with `rescore`)."""
        nprobe = self.nprobe if nprobe is None else nprobe
        if self.device == "gpu":
            stale = self._sync_gpu()
            if self._gpu is not None:
                if self.kind == "ivf":
                    self._set_gpu_nprobe(nprobe)
                D, I = self._gpu.search(xq, k)
                return D, I, stale
        if self.kind == "ivf":
            D, I = self.index.search(xq, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        else:
            D, I = self.index.search(xq, k)
        return D, I, False

    def _set_gpu_nprobe(self, nprobe: int) -> None:
        try:
            self._gpu.nprobe = nprobe
        except Exception:  # noqa: BLE001 - older GPU wrappers
            faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", nprobe)

    def _sync_gpu(self) -> bool:
        """Re-clone the GPU copy when dirty and older than gpu_sync_s. Returns whether it is stale."""
        now = time.monotonic()
        if self._gpu is None or (self._gpu_dirty and now - self._gpu_synced_at >= self.gpu_sync_s):
            try:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
            except Exception as e:  # noqa: BLE001 - an index type the GPU cannot take: stay on CPU
                log.warning("cannot move the %s index to the GPU (%s); searching on CPU", self.kind, e)
                self.device, self._gpu = "cpu", None
                return False
            self._gpu_dirty, self._gpu_synced_at = False, now
        return self._gpu_dirty

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(cls, d: int, kind: str, keys: np.ndarray, ids: np.ndarray, *, nlist: int = 0, nprobe: int = 16,
              device: str = "cpu", train_per_list: int = 64, niter: int = 10, seed: int = 0,
              centroids: np.ndarray | None = None, lists: np.ndarray | None = None,
              gpu_sync_s: float = 1.0) -> KeyIndex:
        """A fresh index over keys (n, d) with ids (n,). IVF trains centroids (spherical k-means on
        train_per_list * nlist sampled keys) unless given; `lists` (n,) = known lists (-1 = compute)."""
        ids = np.asarray(ids, dtype=np.int64)
        if kind == "ivf" and centroids is None:
            nlist = auto_nlist(ids.size, nlist)
            rng = np.random.default_rng(seed)
            n_train = min(ids.size, train_per_list * nlist)
            sample = keys
            if n_train < ids.size:
                sample = keys[np.sort(rng.choice(ids.size, n_train, replace=False))]
            t0 = time.perf_counter()
            centroids = train_centroids(sample, nlist, niter=niter, seed=seed)
            log.info("trained %d IVF lists on %d keys in %.1f s", nlist, n_train, time.perf_counter() - t0)
        index = cls(d, kind, centroids=centroids, nprobe=nprobe, device=device, gpu_sync_s=gpu_sync_s)
        if ids.size:
            index._grow(int(ids.max()) + 1)
            if kind == "ivf":
                lists = np.full(ids.size, -1, np.int64) if lists is None else np.asarray(lists, np.int64)
                margins = np.zeros(ids.size, dtype=np.float32)
                todo = np.flatnonzero((lists < 0) | (lists >= index.nlist))
                if todo.size:
                    lists = lists.copy()
                    for lo in range(0, todo.size, 1 << 16):                 # bounded (chunk, nlist) scores
                        sel = todo[lo:lo + (1 << 16)]
                        lists[sel], margins[sel] = index.lists_of(keys[sel])
                index.add(ids, keys, lists, margins)
            else:
                index.add(ids, keys)
        return index


def _direction_change(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """|old_i/|old_i| - new_i/|new_i|| per row (n,) float32; 2 (the maximum) where a norm is 0."""
    no = np.linalg.norm(old, axis=1)
    nn = np.linalg.norm(new, axis=1)
    ok = (no > 0) & (nn > 0)
    out = np.full(old.shape[0], 2.0, dtype=np.float32)
    out[ok] = np.linalg.norm(old[ok] / no[ok, None] - new[ok] / nn[ok, None], axis=1)
    return out
