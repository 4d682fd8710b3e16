"""bench/feedback_bench.py: its arguments are checked before any cluster starts (the run itself needs the
real model and a Ray cluster for minutes: `srmoa bench feedback`, figures in the README)."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.bench.feedback_bench import run_feedback_bench


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_stranger_count_is_refused_before_anything_starts(tmp_path, bad):
    with pytest.raises(ValueError, match="n_strangers"):
        run_feedback_bench(tmp_path / "fb.json", n_strangers=bad, data_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists() and not (tmp_path / "fb.json").exists()


def test_a_queued_jobs_seconds_run_from_its_creation_to_its_answer():
    from srmoa_dist.bench.feedback_bench import _job_seconds

    assert _job_seconds({"created": 100.0, "finished": 112.5}) == 12.5
    assert np.isnan(_job_seconds({"created": 100.0, "finished": None}))
