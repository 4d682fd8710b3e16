"""Helpers of the e2e tests (a uniquely named module: `conftest` names are ambiguous across dirs)."""

from __future__ import annotations

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
