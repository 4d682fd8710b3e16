"""Prometheus metrics through Ray's metrics API (`ray.util.metrics`), recorded where things happen.

Every metric the code exports is declared once in `CATALOG` (name, kind, tags, description); the
Grafana dashboard's check (tests/k8s) reads the exported names from it. Ray's metrics agent serves
them on each node's metrics export port (`ray start --metrics-export-port`, or
`ray.init(_metrics_export_port=...)`) with the prefix `ray_`; a counter gets the suffix `_total`,
a histogram `_bucket`, `_sum` and `_count`.

Recording sites: the Ingress (requests by route and status), the ModelServer's engine (routed vs
deferred, search and expert-fetch latency, expert-cache hits), the key-store actor (size, energy,
consolidations) and the trainer actor (feedback jobs, edits by status, per-phase edit duration).
Never inside a model's forward or the gravity math. Outside a Ray worker (unit tests, the local
engine) recording is a no-op.

Namespaces (tenants): metrics that make sense per tenant carry a `namespace` tag;
`namespace_label` is the one place that turns a request's namespace (None before tenants are
configured) into the label.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
EXPORT_PREFIX = "ray_"                    # what Ray's exporter puts in front of application metrics

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LONG_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0)
KINDS = ("counter", "gauge", "histogram")


def namespace_label(namespace: str | None) -> str:
    """The `namespace` tag of a request, an edit or a key: its namespace, else the default one."""
    return str(namespace) if namespace else DEFAULT_NAMESPACE


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its Ray name (without the `ray_` prefix), kind, tags and description."""

    name: str
    kind: str
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name.startswith("srmoa_"):
            raise ValueError(f"metric names start with 'srmoa_', got {self.name!r}")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name!r}: buckets are for histograms, and histograms need them")

    def exported(self) -> tuple[str, ...]:
        """The Prometheus series names Ray's exporter serves for it."""
        base = EXPORT_PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


CATALOG: dict[str, MetricSpec] = _specs(
    # Ingress
    MetricSpec("srmoa_requests", "counter", "HTTP requests by route template and status code",
               ("route", "status", "namespace")),
    MetricSpec("srmoa_request_seconds", "histogram", "HTTP request duration (to the response's start)",
               ("route",), LATENCY_BUCKETS_S),
    # ModelServer (engine)
    MetricSpec("srmoa_routing", "counter",
               "Generations by routing outcome: routed (an expert passed tau), deferred (none did: the "
               "base model answered), base (use_experts false)", ("outcome", "namespace")),
    MetricSpec("srmoa_degraded_batches", "counter",
               "Batches answered by the base model because the key store did not answer"),
    MetricSpec("srmoa_search_seconds", "histogram", "Key-store search round trip of one batch",
               (), LATENCY_BUCKETS_S),
    MetricSpec("srmoa_expert_fetch_seconds", "histogram",
               "Fetching a batch's routed experts (LRU cache, then the shards)", (), LATENCY_BUCKETS_S),
    MetricSpec("srmoa_expert_cache_lookups", "counter", "Expert-cache lookups by result (hit, miss)",
               ("result",)),
    MetricSpec("srmoa_expert_cache_hit_rate", "gauge", "Expert-cache hits / lookups of a replica so far"),
    # KeyStoreActor
    # (tag `store`: the deployment's runtime.namespace, so that two stores on one cluster stay apart)
    MetricSpec("srmoa_keystore_keys", "gauge",
               "Routing keys by state: active, pinned, capacity (slots the store has room for)",
               ("state", "store")),
    MetricSpec("srmoa_keystore_namespace_keys", "gauge", "Active routing keys per namespace",
               ("namespace", "store")),
    MetricSpec("srmoa_keystore_energy", "gauge", "Gravity energy of the active keys (sampled pairs)",
               ("store",)),
    MetricSpec("srmoa_keystore_search_seconds", "histogram", "One search inside the key-store actor",
               ("store",), LATENCY_BUCKETS_S),
    MetricSpec("srmoa_consolidations", "counter", "Consolidation batches (gravity + index update)",
               ("store",)),
    MetricSpec("srmoa_consolidated_activations", "counter", "Served activations consolidated", ("store",)),
    MetricSpec("srmoa_consolidation_keys", "counter",
               "Keys changed by consolidation, by change (moved, decayed, freed)", ("change", "store")),
    MetricSpec("srmoa_consolidation_seconds", "histogram", "One consolidation batch", ("store",),
               LATENCY_BUCKETS_S),
    # TrainerActor
    MetricSpec("srmoa_feedback_jobs", "counter", "Feedback jobs by final status (done, failed, skipped)",
               ("status",)),
    MetricSpec("srmoa_edits", "counter",
               "Edits by outcome (verified, rolled_back, failed) and by request (rollback)",
               ("status", "namespace")),
    MetricSpec("srmoa_edit_phase_seconds", "histogram",
               "Duration of one phase of an edit (reflect, prepare, train, commit, verify, total)",
               ("phase",), LONG_BUCKETS_S),
    MetricSpec("srmoa_trainer_queue", "gauge", "Feedback jobs waiting for the trainer"),
)


def exported_names() -> set[str]:
    """Every Prometheus series name the code exports (for the dashboard's check)."""
    return {n for s in CATALOG.values() for n in s.exported()}


class _Registry:
    """This process's `ray.util.metrics` objects, made on first use (a metric is per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[str, Any] = {}

    def get(self, name: str) -> Any | None:
        """The Ray metric of `name`, or None outside a Ray worker (recording is then a no-op)."""
        m = self._made.get(name)
        if m is not None:
            return m
        spec = CATALOG[name]                    # a KeyError names a metric nobody declared
        try:
            import ray
            from ray.util import metrics as rm
        except ImportError:                     # pragma: no cover - ray is a dependency
            return None
        if not ray.is_initialized():
            return None
        with self._lock:
            if name not in self._made:
                kw: dict[str, Any] = {"description": spec.description, "tag_keys": spec.tags}
                if spec.kind == "counter":
                    self._made[name] = rm.Counter(name, **kw)
                elif spec.kind == "gauge":
                    self._made[name] = rm.Gauge(name, **kw)
                else:
                    self._made[name] = rm.Histogram(name, boundaries=list(spec.buckets), **kw)
            return self._made[name]


_REGISTRY = _Registry()


def _tags(name: str, tags: Mapping[str, Any]) -> dict[str, str] | None:
    spec = CATALOG[name]
    if set(tags) != set(spec.tags):
        raise ValueError(f"metric {name!r} takes tags {spec.tags}, got {sorted(tags)}")
    return {k: str(v) for k, v in tags.items()} or None


def inc(name: str, value: float = 1.0, **tags: Any) -> None:
    """Add `value` to a counter (a value <= 0 records nothing)."""
    t = _tags(name, tags)
    m = _REGISTRY.get(name)
    if m is not None and value > 0:
        _safely(m.inc, float(value), tags=t)


def set_gauge(name: str, value: float, **tags: Any) -> None:
    t = _tags(name, tags)
    m = _REGISTRY.get(name)
    if m is not None:
        _safely(m.set, float(value), tags=t)


def observe(name: str, seconds: float, **tags: Any) -> None:
    """Record one duration in a histogram."""
    t = _tags(name, tags)
    m = _REGISTRY.get(name)
    if m is not None:
        _safely(m.observe, float(seconds), tags=t)


def _safely(fn: Any, *args: Any, **kw: Any) -> None:
    """A metric that cannot be recorded never fails the request, the search or the edit."""
    try:
        fn(*args, **kw)
    except Exception:
        log.warning("could not record a metric", exc_info=True)


__all__ = ["CATALOG", "DEFAULT_NAMESPACE", "EXPORT_PREFIX", "MetricSpec", "exported_names", "inc",
           "namespace_label", "observe", "set_gauge"]
