"""`KeyStoreProxy`: the KeyStore method surface over the key-store actor, numpy in and out.

What the TTT code calls (search, get, add, update, free, pin, hold, release, ...) works the same on an
in-process `routing.keystore.KeyStore` and on this proxy; methods it does not name go through the
actor's generic `call`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray


class KeyStoreProxy:
    """The KeyStore API over the key-store actor (what the TTT code calls), numpy in and out."""

    def __init__(self, handle: Any, cfg: Any, timeout_s: float = 60.0) -> None:
        self.h = handle
        self.cfg = cfg
        self.timeout_s = timeout_s

    def _get(self, ref: Any) -> Any:
        return ray.get(ref, timeout=self.timeout_s)

    def search(self, xq: np.ndarray, k: int | None = None, *, tau: float | None = None,
               namespaces: Any = None) -> tuple[np.ndarray, np.ndarray]:
        ns = None if namespaces is None else [sorted(n) for n in namespaces]
        D, I, *_ = self._get(self.h.search.remote(np.asarray(xq, np.float32), k, tau, None, 0, ns))
        return D, I

    def get(self, ids: Any) -> np.ndarray:
        return self._get(self.h.get.remote(np.asarray(ids, np.int64).reshape(-1).tolist()))

    def add(self, keys: np.ndarray, *, pinned: bool = False, namespace: str = "default") -> np.ndarray:
        return self._get(self.h.add.remote(np.asarray(keys, np.float32), pinned, None, namespace))

    def update(self, ids: Any, keys: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64).reshape(-1).tolist()
        self._get(self.h.update.remote(ids, np.asarray(keys, np.float32)))

    def free(self, ids: Any) -> None:
        self._get(self.h.free.remote(np.asarray(ids, np.int64).reshape(-1).tolist()))

    def pin(self, ids: Any, pinned: bool = True) -> None:
        self._get(self.h.pin.remote(np.asarray(ids, np.int64).reshape(-1).tolist(), pinned))

    def snapshot(self) -> None:
        self._get(self.h.snapshot.remote())

    def stats(self) -> dict[str, Any]:
        return self._get(self.h.stats.remote())

    def __len__(self) -> int:
        return int(self._get(self.h.size.remote()))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._get(self.h.call.remote(name, *args, **kwargs))

        return call


__all__ = ["KeyStoreProxy"]
