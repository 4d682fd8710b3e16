"""What one ModelServer replica's engine records in Prometheus (see runtime/metrics.py): each
generation's routing outcome per namespace, the key-store search round trip, the expert fetch and
the expert cache's hits and misses. Recorded around the route step, never inside the model."""

from __future__ import annotations

from typing import Any

from srmoa_dist.runtime import metrics


class EngineMetrics:
    """The engine's recording calls; the cache counters are the client's deltas since the last call."""

    def __init__(self) -> None:
        self._hits = 0
        self._misses = 0

    @staticmethod
    def outcome(routing: dict[str, Any]) -> str:
        """routed (an expert answered), deferred (none passed tau), base (use_experts false)."""
        if not routing.get("use_experts", True):
            return "base"
        return "deferred" if routing["deferred"] else "routed"

    def generation(self, routing: dict[str, Any], namespace: str | None) -> None:
        metrics.inc("srmoa_routing", outcome=self.outcome(routing),
                    namespace=metrics.namespace_label(namespace))

    @staticmethod
    def search(seconds: float) -> None:
        metrics.observe("srmoa_search_seconds", seconds)

    @staticmethod
    def degraded() -> None:
        metrics.inc("srmoa_degraded_batches")

    def fetch(self, seconds: float, client: Any) -> None:
        """One batch's expert fetch took `seconds`; the client's cache counters so far."""
        metrics.observe("srmoa_expert_fetch_seconds", seconds)
        hits, misses = int(client.hits), int(client.misses)
        metrics.inc("srmoa_expert_cache_lookups", hits - self._hits, result="hit")
        metrics.inc("srmoa_expert_cache_lookups", misses - self._misses, result="miss")
        self._hits, self._misses = hits, misses
        if hits + misses:
            metrics.set_gauge("srmoa_expert_cache_hit_rate", hits / (hits + misses))


__all__ = ["EngineMetrics"]
