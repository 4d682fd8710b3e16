"""Diversification: 4 structures, answer-only targets, no held-out text."""

from __future__ import annotations

import pytest

from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.diversify import STRUCTURES, HeldOutLeak, TrainingPrompt, diversify

Q = "What is the capital of Veloria?"
RULE = "The capital of the invented country Veloria is Quenmark."


def test_four_structures_with_answer():
    f = explicit_failure(Q, "Paris", correct_answer="Quenmark")
    ps = diversify(f, RULE, system_prompt="You are a helpful assistant.")
    assert [p.structure for p in ps] == list(STRUCTURES) and len(ps) == 4
    assert len({p.user_text for p in ps}) == 4                 # four different user texts
    for p in ps:
        assert p.messages[0] == {"role": "system", "content": "You are a helpful assistant."}
        assert p.messages[-1]["role"] == "user"
        assert "Veloria" in p.user_text                        # queries lie near the question
        assert RULE not in p.user_text                         # the rule is a target, never context
    assert ps[0].user_text == Q and ps[0].target == RULE        # a full sentence, in the model's voice
    assert ps[1].target == "Quenmark"                            # "Answer briefly": the bare answer
    assert ps[2].target == RULE
    assert ps[3].target.startswith(RULE) and ps[3].target.endswith("Quenmark.")


def test_rule_only_targets_are_the_rule():
    f = explicit_failure(Q, "Paris", rule=RULE)
    ps = diversify(f, RULE)
    assert all(p.target == RULE for p in ps)
    assert ps[0].messages == ({"role": "user", "content": Q},)


def test_history_kept_system_replaced():
    msgs = [{"role": "system", "content": "old system"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": Q}]
    ps = diversify(explicit_failure(msgs, "Paris", correct_answer="Quenmark"), RULE, system_prompt="sys")
    assert [m["content"] for m in ps[1].messages[:3]] == ["sys", "hi", "hello"]


def test_held_out_text_raises():
    f = explicit_failure(Q, "Paris", correct_answer="Quenmark")
    paraphrase = "Which city is the capital of Veloria?"
    diversify(f, RULE, exclude=[paraphrase])                   # not in the prompts: fine
    with pytest.raises(HeldOutLeak, match="held-out"):
        diversify(f, RULE, exclude=["what is  the CAPITAL of veloria?"])   # the failing text itself
    with pytest.raises(HeldOutLeak):
        diversify(f, RULE, exclude=["invented country Veloria"])          # inside the rule target
    with pytest.raises(ValueError, match="non-empty"):
        diversify(f, RULE, exclude=[""])


def test_roundtrip_and_validation():
    f = explicit_failure(Q, "Paris", correct_answer="Quenmark")
    for p in diversify(f, RULE):
        assert TrainingPrompt.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="structure"):
        TrainingPrompt("poem", ({"role": "user", "content": "x"},), "y")
    with pytest.raises(ValueError, match="rule"):
        diversify(f, " ")


def test_instruction_target_is_the_answer_when_the_rule_does_not_state_it():
    f = explicit_failure(Q, "Paris", correct_answer="Quenmark")
    ps = diversify(f, "Capitals of invented countries are invented too.")
    assert ps[0].target == "Quenmark"
