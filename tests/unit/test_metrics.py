"""The metric catalog (runtime/metrics.py) and the recorders' pure parts (no Ray needed)."""

from __future__ import annotations

import pytest

from srmoa_dist.runtime import metrics
from srmoa_dist.runtime.keystore_metrics import KeyStoreMetrics
from srmoa_dist.runtime.metrics import CATALOG, MetricSpec, exported_names
from srmoa_dist.serve.engine_metrics import EngineMetrics


def test_exported_names_follow_rays_exporter():
    assert "ray_srmoa_requests_total" in exported_names()                      # counter: _total
    assert {"ray_srmoa_search_seconds_bucket", "ray_srmoa_search_seconds_sum",
            "ray_srmoa_search_seconds_count"} <= exported_names()              # histogram
    assert "ray_srmoa_keystore_energy" in exported_names()                     # gauge: as named
    assert all(s.name.startswith("srmoa_") for s in CATALOG.values())


def test_the_issue_asks_for_these_metrics():
    for name in ("srmoa_requests", "srmoa_routing", "srmoa_search_seconds", "srmoa_expert_fetch_seconds",
                 "srmoa_expert_cache_hit_rate", "srmoa_edits", "srmoa_edit_phase_seconds",
                 "srmoa_keystore_keys", "srmoa_keystore_energy", "srmoa_consolidations"):
        assert name in CATALOG, name
    assert "namespace" in CATALOG["srmoa_requests"].tags and "namespace" in CATALOG["srmoa_edits"].tags


def test_bad_specs_and_bad_tags_are_errors():
    with pytest.raises(ValueError, match="kind"):
        MetricSpec("srmoa_x", "summary", "d")
    with pytest.raises(ValueError, match="srmoa_"):
        MetricSpec("x", "counter", "d")
    with pytest.raises(ValueError, match="buckets"):
        MetricSpec("srmoa_x", "histogram", "d")
    with pytest.raises(ValueError, match="srmoa_requests.*tags"):
        metrics.inc("srmoa_requests", route="/v1/models")                       # status, namespace missing
    with pytest.raises(KeyError):
        metrics.inc("srmoa_not_declared")


def test_outside_a_ray_worker_recording_is_a_no_op(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    reg = metrics._Registry()
    assert reg.get("srmoa_requests") is None
    metrics.inc("srmoa_degraded_batches")            # no error, nothing made


def test_namespace_label_and_routing_outcome():
    assert metrics.namespace_label(None) == metrics.namespace_label("") == "default"
    assert metrics.namespace_label("team-a") == "team-a"
    assert EngineMetrics.outcome({"use_experts": False, "deferred": True}) == "base"
    assert EngineMetrics.outcome({"use_experts": True, "deferred": True}) == "deferred"
    assert EngineMetrics.outcome({"use_experts": True, "deferred": False}) == "routed"


def test_key_store_gauges_are_rate_limited(tmp_path):
    import numpy as np

    from srmoa_dist.config import KeyStoreConfig
    from srmoa_dist.routing.keystore import KeyStore

    ks = KeyStore.open(tmp_path / "ks", KeyStoreConfig(d_key=8))
    ks.add(np.eye(8, dtype=np.float32)[:3])
    m = KeyStoreMetrics("t", interval_s=60.0)
    assert m.due()
    m.gauges(ks)                                     # reads a real store (no error on any path)
    assert not m.due()
    m.consolidation({"rows": 3, "n_moved": 2, "n_decayed": 0, "n_freed": 0, "seconds": 0.01})
