"""Helpers of the e2e tests (a uniquely named module: `conftest` names are ambiguous across dirs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from itest_support import TINY_MODEL, TINY_TTT, small_config  # noqa: E402

API_KEY = "test-secret-key"


def tiny_app_config(data_dir: Path, model_dir: Path, **sections):
    base = {
        "model": {"name_or_path": str(model_dir), **TINY_MODEL},
        "ttt": TINY_TTT,
        "serve": {"max_prompt_tokens": 256, "max_tokens_limit": 64, "max_ongoing_requests": 32,
                  "max_queued_requests": 64, "max_batch_size": 8},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return small_config(data_dir, **base)


def own_cluster_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that starts a local Ray cluster of its own (not the session's)."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


def own_cluster_config(tmp_path: Path, model_dir: Path) -> Path:
    """A tiny app config (data under tmp_path/data, a small local cluster) saved as YAML; its path."""
    small = {"num_cpus": 2, "object_store_memory_mb": 128}
    cfg = tiny_app_config(tmp_path / "data", model_dir, runtime=small)
    path = tmp_path / "srmoa.yaml"
    cfg.save_yaml(path)
    return path
