"""The machine's shared model cache, so a benchmark's fresh store does not convert SmolLM2 again."""

from __future__ import annotations

import os
from pathlib import Path


def shared_model_cache() -> Path:
    """$SRMOA_MODEL_CACHE, else ~/.cache/srmoa-dist/model_cache (where the tests keep theirs too)."""
    return Path(os.environ.get("SRMOA_MODEL_CACHE", Path.home() / ".cache" / "srmoa-dist" / "model_cache"))


def link_shared_model_cache(data_dir: str | os.PathLike, model: str) -> None:
    """Point data_dir/model_cache at the shared cache for the default model, when it exists and the
    store has no cache of its own yet."""
    mine, shared = Path(data_dir) / "model_cache", shared_model_cache()
    if model == "smollm2" and shared.exists() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.symlink_to(shared, target_is_directory=True)


__all__ = ["link_shared_model_cache", "shared_model_cache"]
