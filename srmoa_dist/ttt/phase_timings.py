"""`PhaseTimings`: the phase durations (reflect, prepare, train, commit, verify, total) of recent edits.

Every `EditResult` carries its `timings` (seconds per phase); the trainer keeps the last `window` of them
and `/v1/stats` shows their p50 / p90 per phase, so a user sees where an edit's time goes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np


class PhaseTimings:
    """A rolling window of per-edit phase timings; not thread-safe (the caller holds its lock)."""

    def __init__(self, window: int = 200) -> None:
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        self._edits: deque[dict[str, float]] = deque(maxlen=window)

    def add(self, timings: Mapping[str, float] | None) -> None:
        """One edit's {phase: seconds}; non-numeric or negative entries are ignored."""
        clean = {str(k): float(v) for k, v in (timings or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0}
        if clean:
            self._edits.append(clean)

    def __len__(self) -> int:
        return len(self._edits)

    def summary(self) -> dict[str, dict[str, float]]:
        """{phase: {"p50", "p90", "n"}} over the window (phases in the order first seen)."""
        phases: dict[str, list[float]] = {}
        for t in self._edits:
            for k, v in t.items():
                phases.setdefault(k, []).append(v)
        return {k: {"p50": round(float(np.percentile(v, 50)), 3),
                    "p90": round(float(np.percentile(v, 90)), 3), "n": len(v)} for k, v in phases.items()}


__all__ = ["PhaseTimings"]
