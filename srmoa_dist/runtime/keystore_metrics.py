"""What the key-store actor records in Prometheus (see runtime/metrics.py): each search's time
inside the actor, each consolidation (batches, activations, keys moved / decayed / freed, seconds),
and, at most every `GAUGE_INTERVAL_S`, the store's size by state and by namespace and its energy."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from srmoa_dist.runtime import metrics

GAUGE_INTERVAL_S = 2.0           # the gauges' refresh period (energy samples pairs of keys: not free)


class KeyStoreMetrics:
    """The key-store actor's recording calls (the caller holds the store's lock for `gauges`)."""

    def __init__(self, store: str, interval_s: float = GAUGE_INTERVAL_S) -> None:
        self.store = str(store)               # the `store` tag: the deployment's runtime.namespace
        self.interval_s = float(interval_s)
        self._last_gauges = -float("inf")
        self._namespaces: set[str] = set()

    def search(self, seconds: float) -> None:
        metrics.observe("srmoa_keystore_search_seconds", seconds, store=self.store)

    def consolidation(self, st: Mapping[str, Any]) -> None:
        """One consolidation's stats (`ConsolidationStats` as a dict, plus rows and seconds)."""
        metrics.inc("srmoa_consolidations", store=self.store)
        metrics.inc("srmoa_consolidated_activations", float(st.get("rows", 0)), store=self.store)
        for change, key in (("moved", "n_moved"), ("decayed", "n_decayed"), ("freed", "n_freed")):
            metrics.inc("srmoa_consolidation_keys", float(st.get(key, 0)), change=change, store=self.store)
        metrics.observe("srmoa_consolidation_seconds", float(st.get("seconds", 0.0)), store=self.store)

    def due(self) -> bool:
        return time.monotonic() - self._last_gauges >= self.interval_s

    def gauges(self, ks: Any) -> None:
        """Size by state (active, pinned, capacity), active keys per namespace, energy of `ks`."""
        self._last_gauges = time.monotonic()
        active = ks.active_ids()
        metrics.set_gauge("srmoa_keystore_keys", float(active.size), state="active", store=self.store)
        metrics.set_gauge("srmoa_keystore_keys", float(ks.is_pinned(active).sum()) if active.size else 0.0,
                          state="pinned", store=self.store)
        metrics.set_gauge("srmoa_keystore_keys", float(ks.capacity), state="capacity", store=self.store)
        counts = ks.namespace_counts()
        counts = {metrics.namespace_label(k): v for k, v in counts.items()} or {metrics.DEFAULT_NAMESPACE: 0}
        for ns in self._namespaces - set(counts):          # a namespace emptied since: 0, not its last count
            metrics.set_gauge("srmoa_keystore_namespace_keys", 0.0, namespace=ns, store=self.store)
        for ns, n in counts.items():
            metrics.set_gauge("srmoa_keystore_namespace_keys", float(n), namespace=ns, store=self.store)
        self._namespaces = set(counts)
        energy = float(ks.energy()) if active.size else 0.0
        metrics.set_gauge("srmoa_keystore_energy", energy, store=self.store)


__all__ = ["KeyStoreMetrics", "GAUGE_INTERVAL_S"]
