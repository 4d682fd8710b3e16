"""Helpers shared by the integration and e2e tests (one Ray cluster per session, small configs)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from srmoa_dist.config import SrmoaConfig

TINY_MODEL = {"query_layer": 1, "relation_layer": None, "max_new_tokens": 8, "device": "cpu"}
# contrast rows off: the tiny random model cannot learn them beside the fact in a few steps
TINY_TTT = {"steps": 30, "lr": 0.05, "locality_probes": 0, "verify_max_new_tokens": 40, "contrast_prompts": 0}


def start_session_ray():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    if ray.is_initialized():
        return ray, False
    from srmoa_dist.serve.local import free_port

    # a metrics export port: tests/e2e/test_metrics.py scrapes the app's Prometheus metrics from it
    ray.init(num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False, namespace="srmoa-tests",
             log_to_driver=bool(os.environ.get("SRMOA_TEST_RAY_LOGS")), _metrics_export_port=free_port())
    return ray, True


def stop_session_ray(started: bool) -> None:
    import ray

    if started and ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


def small_config(data_dir: Path, **sections) -> SrmoaConfig:
    """A small store config in its own namespace (so tests never share actors)."""
    base = {
        "data_dir": str(data_dir),
        "store": {"n_shards": 2, "map_size_mb": 16, "max_map_size_mb": 256},
        "keystore": {"d_key": 16, "k": 4, "tau": 0.5, "snapshot_every": 1000},
        "runtime": {"namespace": f"t-{uuid.uuid4().hex[:8]}", "num_cpus": 4, "object_store_memory_mb": 256,
                    "consolidate_interval_s": 0.2, "snapshot_interval_s": 1.0, "actor_cpus": 0.05,
                    "trainer_cpus": 0.1, "replica_cpus": 0.1, "max_restarts": 5, "call_timeout_s": 30.0},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return SrmoaConfig.from_dict(base)
