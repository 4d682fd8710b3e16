"""PhaseTimings: p50 / p90 per phase over a rolling window."""

from __future__ import annotations

import pytest

from srmoa_dist.ttt.phase_timings import PhaseTimings


def test_summary_per_phase_over_the_window():
    t = PhaseTimings(window=3)
    for s in (1.0, 2.0, 3.0, 10.0):
        t.add({"train_s": s, "verify_s": s / 2, "note": "x", "bad": -1.0})
    s = t.summary()
    assert len(t) == 3 and set(s) == {"train_s", "verify_s"}
    assert s["train_s"]["p50"] == 3.0 and s["train_s"]["n"] == 3      # 1.0 fell out of the window
    assert s["verify_s"]["p90"] == pytest.approx(4.3)
    t.add(None)
    t.add({})
    assert len(t) == 3


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        PhaseTimings(0)
