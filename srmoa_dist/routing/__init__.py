"""routing: the key store (keys are the truth, the FAISS index is derived), gravity rules, query encoder.

Names are imported lazily, so `srmoa_dist.routing.query_encoder` does not pull in FAISS.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KeyStore": "keystore",
    "ConsolidationStats": "keystore",
    "Activations": "gravity",
    "GravityState": "gravity",
    "GravityResult": "gravity",
    "KeyIndex": "index",
    "WalCorruptError": "wal",
    "CorruptSnapshotError": "snapshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
