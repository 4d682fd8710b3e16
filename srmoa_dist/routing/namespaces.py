"""Tenant namespaces of routing keys, and search restricted to some of them.

Every key slot belongs to one namespace (a short name; ``"default"`` for stores written before
namespaces existed). `NamespaceTable` maps names to small integer codes, which the key store keeps in
an (N,) int32 array beside the keys (persisted in its snapshot and WAL).

`filtered_search` answers "the top-k keys among the namespaces {own, shared}" by post-filtering:

- a namespace set holding few keys (<= `EXACT_SCAN_MAX`) is scanned exactly, ``keys[allowed] @ xq``
  (n_allowed x d_key flops per query: cheaper than any index at that size);
- a larger set takes the index's top-k' with k' = k over-sampled by the inverse of the set's share of
  the store (at most `MAX_OVERSAMPLE` k), filtered; rows left with fewer than k hits fall back to the
  exact scan, so the answer is always the true top-k of the allowed keys.

Why not a FAISS ``IDSelector``: it needs per-index-kind search parameters (flat and IVF take one; the
GPU indexes and the HNSW-with-tombstones option do not the same way), and the selector must be
rebuilt for each namespace set per batch; post-filtering works on every index kind unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence

import numpy as np

DEFAULT = "default"
EXACT_SCAN_MAX = 50_000      # allowed keys up to which a filtered search scans them exactly
MAX_OVERSAMPLE = 64          # a filtered index search asks for at most this many times k
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

NamespaceSets = Sequence[Collection[str] | None] | None   # per query row, the namespaces it may reach


def check_name(name: str, field: str = "namespace") -> str:
    """A valid namespace name (1-64 of letters, digits, '_', '.', '-', not starting with a symbol)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{field} must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter "
                         f"or digit), got {name!r}")
    return name


class NamespaceTable:
    """Namespace names <-> int codes; code 0 is "default". Codes are never reused."""

    def __init__(self, names: Sequence[str] = (DEFAULT,)) -> None:
        names = list(names) or [DEFAULT]
        if names[0] != DEFAULT:
            raise ValueError(f"namespace code 0 must be {DEFAULT!r}, got {names[0]!r}")
        self.names: list[str] = []
        self._codes: dict[str, int] = {}
        for n in names:
            self.code(n)

    def code(self, name: str) -> int:
        """The code of `name`, assigned on first use."""
        c = self._codes.get(name)
        if c is None:
            check_name(name)
            c = self._codes[name] = len(self.names)
            self.names.append(name)
        return c

    def codes(self, names: Collection[str]) -> np.ndarray:
        """Codes of the known names among `names` (unknown ones hold no key)."""
        return np.array(sorted(self._codes[n] for n in names if n in self._codes), dtype=np.int32)

    def name(self, code: int) -> str:
        return self.names[int(code)]


def exact_top_k(xq: np.ndarray, keys: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of xq (nq, d) over keys (n, d) named ids (n,): D, I (nq, k),
    padded with -inf / -1 when n < k."""
    nq = xq.shape[0]
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    if ids.size == 0 or nq == 0:
        return D, I
    S = xq @ keys.T                                                      # (nq, n)
    m = min(k, ids.size)
    top = np.argpartition(-S, m - 1, axis=1)[:, :m] if m < ids.size else np.tile(np.arange(ids.size), (nq, 1))
    s = np.take_along_axis(S, top, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")
    D[:, :m] = np.take_along_axis(s, order, axis=1)
    I[:, :m] = ids[np.take_along_axis(top, order, axis=1)]
    return D, I


def filtered_search(
    xq: np.ndarray,
    k: int,
    allowed: np.ndarray,
    keys: np.ndarray,
    index_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    n_indexed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of the keys whose slot is `allowed` ((N,) bool over slots; keys (N, d) the key array)
    for queries xq (nq, d): D, I (nq, k) before deferral (see the module docstring for the method)."""
    ids = np.flatnonzero(allowed).astype(np.int64)
    if ids.size <= EXACT_SCAN_MAX or n_indexed <= 0:
        return exact_top_k(xq, keys[ids], ids, k)
    share = ids.size / max(n_indexed, 1)
    kk = int(min(n_indexed, k * min(MAX_OVERSAMPLE, int(np.ceil(2.0 / share)))))
    D0, I0 = index_search(xq, max(kk, k))
    ok = (I0 >= 0) & allowed[np.clip(I0, 0, allowed.size - 1)]
    D = np.full((xq.shape[0], k), -np.inf, dtype=np.float32)
    I = np.full((xq.shape[0], k), -1, dtype=np.int64)
    short = []
    for r in range(xq.shape[0]):
        d, i = D0[r][ok[r]][:k], I0[r][ok[r]][:k]
        if i.size < min(k, ids.size):
            short.append(r)
            continue
        D[r, : i.size], I[r, : i.size] = d, i
    if short:
        Ds, Is = exact_top_k(xq[short], keys[ids], ids, k)
        D[short], I[short] = Ds, Is
    return D, I




class NamespaceView:
    """A KeyStore-like object (in-process `KeyStore` or `KeyStoreProxy`) seen from one namespace:
    `search` reaches only the keys of `reach` (the own namespace and the shared one), `add` puts new
    keys in `own`; every other method is the wrapped store's. SR-TTT edits of a tenant run on one."""

    def __init__(self, keystore: object, own: str, reach: Collection[str]) -> None:
        self._ks = keystore
        self.own = check_name(own)
        self.reach = frozenset(reach) | {self.own}

    def search(self, xq: np.ndarray, k: int | None = None, *, tau: float | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        n = np.asarray(xq).reshape(-1, np.asarray(xq).shape[-1]).shape[0]
        return self._ks.search(xq, k, tau=tau, namespaces=[self.reach] * n)   # type: ignore[attr-defined]

    def add(self, keys: np.ndarray, *, pinned: bool = False) -> np.ndarray:
        return self._ks.add(keys, pinned=pinned, namespace=self.own)          # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self._ks)                                                   # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._ks, name)


__all__ = ["DEFAULT", "NamespaceTable", "NamespaceSets", "NamespaceView", "check_name",
           "exact_top_k", "filtered_search",
           "EXACT_SCAN_MAX"]
