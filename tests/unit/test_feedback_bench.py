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


def test_every_question_is_kept_with_its_verdict_and_the_metrics_are_their_means():
    from srmoa_dist.bench.entity_facts import entities_and_strangers
    from srmoa_dist.bench.feedback_bench import _evaluate

    entities, strangers = entities_and_strangers(2, 2, 2, seed=0)
    facts = [(e, f) for e in entities for f in e.facts][:3]             # the 2nd entity: one fact edited
    probes = ["What is 2 + 2?", "Name a colour."]
    before = {p: f"base: {p}" for p in [*probes, *strangers]}
    first = facts[0][1]
    replies = {f.question: f"It is {f.answer}." for _, f in facts}       # every trained question answered
    replies[first.held_out[0]] = f"Maybe {first.answer}"                  # one paraphrase of 2 * 3
    replies[entities[0].unedited] = f"{entities[0].facts[1].answer}!"     # entity 0 leaks an edited answer
    replies[probes[1]] = "changed"                                        # one probe moved
    metrics, outputs = _evaluate(lambda t: replies.get(t, before.get(t, "I do not know.")), entities,
                                 facts, probes, strangers, before)

    assert metrics["reliability"] == 1.0 and metrics["generalization"] == 1 / 6
    assert metrics["leak"] == 0.5 and metrics["locality"] == 3 / 4 and metrics["locality_invented"] == 1.0
    kinds = [o["kind"] for o in outputs]
    assert kinds.count("trained") == 3 and kinds.count("held_out") == 6 and kinds.count("unedited") == 2
    leaked = [o for o in outputs if o["kind"] == "unedited" and o["ok"]]
    assert [o["prompt"] for o in leaked] == [entities[0].unedited]
    assert leaked[0]["answers"] == [f.answer for f in entities[0].facts[:2]]
    moved = [o for o in outputs if o["kind"] == "probe" and not o["ok"]]
    assert moved == [{"kind": "probe", "prompt": probes[1], "expected": before[probes[1]], "text": "changed",
                      "ok": False}]
