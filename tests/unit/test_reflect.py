"""Reflection: rule parsing and validation, without a model (ask is a plain callable)."""

from __future__ import annotations

import pytest

from srmoa_dist.config import TTTConfig
from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.reflect import (
    RuleRejected,
    clean_rule,
    is_sentence,
    parse_rule,
    reflect,
    reflection_prompt,
    validate_rule,
)

CFG = TTTConfig(max_rule_chars=120, reflect="always")   # ask the model even with a correct answer


def _failure(**kw):
    return explicit_failure("What is the capital of Veloria?", "Paris", **kw)


def test_given_rule_is_validated_and_used():
    f = _failure(rule="  The capital of   Veloria is Quenmark. ")
    assert reflect(f, ask=None, cfg=CFG) == "The capital of Veloria is Quenmark."


def test_model_rule_parsed():
    asked = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return "Let me think.\n**RULE:** The capital of Veloria is Quenmark.\nThat is all."

    rule = reflect(_failure(correct_answer="Quenmark"), ask, CFG)
    assert rule == "The capital of Veloria is Quenmark."
    assert "Veloria" in asked[0] and "Paris" in asked[0] and "Quenmark" in asked[0] and "RULE:" in asked[0]


def test_parse_rule_multiline_and_case():
    assert parse_rule("rule: Convert minutes to\nhours before dividing.\n\nmore", 200) == (
        "Convert minutes to hours before dividing.")


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("I do not know.", "no 'RULE:' line"),
        ("RULE:", "empty"),
        ("RULE:   \n", "empty"),
        ("RULE: ok", "too short"),
        ("RULE: " + "x y " * 100, "more than max_rule_chars=120"),
    ],
)
def test_bad_rules_rejected_with_reason(reply, reason):
    with pytest.raises(RuleRejected) as ei:
        parse_rule(reply, 120)
    assert reason in ei.value.reason
    assert isinstance(ei.value, ValueError)


def test_fallback_when_model_rule_rejected():
    f = _failure(correct_answer="Quenmark")
    rule = reflect(f, lambda p: "no rule here", CFG)
    assert "Quenmark" in rule and "Veloria" in rule
    with pytest.raises(RuleRejected, match="no 'RULE:' line"):
        reflect(f, lambda p: "no rule here", CFG, fallback=False)


def test_no_rule_no_answer_no_model():
    f = _failure(rule="The capital of Veloria is Quenmark.")
    object.__setattr__(f, "rule", None)  # a rule-less, answer-less failure cannot be built directly
    with pytest.raises(RuleRejected, match="no model"):
        reflect(f, None, CFG)


def test_given_rule_too_long():
    with pytest.raises(RuleRejected, match="max_rule_chars"):
        reflect(_failure(rule="word " * 50), None, CFG)


def test_validate_rule_types():
    with pytest.raises(RuleRejected, match="string"):
        validate_rule(None, 10)  # type: ignore[arg-type]


def test_reflection_prompt_without_answer():
    p = reflection_prompt(_failure(rule="The capital of Veloria is Quenmark."))
    assert "Correct answer" not in p and "RULE:" in p


def test_nested_marker_and_wrong_answer_rule_rejected():
    reply = 'RULE: The assistant should have used the rule of "RULE: The capital of Veloria is Quenmark."'
    assert parse_rule(reply, 200) == "The capital of Veloria is Quenmark."
    reply = 'The assistant should have used "RULE: Take 25% off first."'
    assert parse_rule(reply, 200) == "Take 25% off first."
    # the model restates its wrong answer: rejected, then the fallback rule from the answer is used
    f = _failure(correct_answer="Quenmark")
    rule = reflect(f, lambda p: "RULE: The capital of Veloria is Nova Nova.", CFG)
    assert rule == "The capital of Veloria is Quenmark."                 # the clean rule of the exchange
    with pytest.raises(RuleRejected, match="does not state the correct answer"):
        reflect(f, lambda p: "RULE: The capital of Veloria is Nova Nova.", CFG, fallback=False)
    g = explicit_failure("A shirt costs $20 with 25% off. Price?", "$5", correct_answer="15")
    assert reflect(g, lambda p: "RULE: 25% off $20 leaves $15.00.", CFG) == "25% off $20 leaves $15.00."


def test_auto_builds_the_clean_rule_without_asking_when_an_answer_is_given():
    asked = []
    f = _failure(correct_answer="Quenmark")
    rule = reflect(f, lambda p: asked.append(p) or "RULE: x", TTTConfig(reflect="auto"))
    assert rule == "The capital of Veloria is Quenmark." and asked == []
    # without a correct answer, auto asks the model
    g = _failure(rule="The capital of Veloria is Quenmark.")
    object.__setattr__(g, "rule", None)  # a rule-less, answer-less failure cannot be built directly
    assert reflect(g, lambda p: "RULE: The capital of Veloria is Quenmark.", TTTConfig()) == (
        "The capital of Veloria is Quenmark.")
    with pytest.raises(RuleRejected, match="never"):
        reflect(g, lambda p: "RULE: The capital of Veloria is Quenmark.", TTTConfig(reflect="never"))


@pytest.mark.parametrize("q, rule", [
    ("What is the capital of Veloria?", "The capital of Veloria is Quenmark."),
    ("Which city is the capital of Veloria?", "Quenmark is the capital of Veloria."),
    ("Where was Bo Tam born?", "Bo Tam was born in Quenmark."),
    ("Who founded Brak Labs?", "Quenmark founded Brak Labs."),
    ("Name the official currency of Veloria.", "The official currency of Veloria is Quenmark."),
    ("Where is Brak Labs headquartered?", "Brak Labs is headquartered in Quenmark."),
    ("What instrument does Yo Ma play?", "The answer is Quenmark."),
    # a place asked with a noun phrase, not a verb, last: "is in", not the last word taken for a verb
    ("Where is the main factory of Brak Holdings?", "The main factory of Brak Holdings is in Quenmark."),
    ("In which city is the headquarters of Brak Labs?", "The headquarters of Brak Labs is in Quenmark."),
    ("In which city was Bo Tam born?", "Bo Tam was born in Quenmark."),
    # a preposition or "called" last belongs to the statement's verb
    ("Who is Bo Tam married to?", "Bo Tam is married to Quenmark."),
    ("Which product is Brak Labs famous for?", "Brak Labs is famous for Quenmark."),
    ("What is Bo Tam's dog called?", "Bo Tam's dog is called Quenmark."),
    # an attribute asked of a thing: the thing is the subject, not the answer
    ("What color is the flag of Veloria?", "The flag of Veloria is Quenmark."),
    ("Who leads Veloria as president?", "Quenmark leads Veloria as president."),
    # a clause's verb or a name last is left where it was
    ("What is the name of the firm Bo Tam works for?", "The name of the firm Bo Tam works for is Quenmark."),
    ("Where is Bob Reed?", "Bob Reed is in Quenmark."),
])
def test_clean_rule_is_a_plain_sentence_not_a_template(q, rule):
    assert clean_rule(q, "Quenmark") == rule
    assert q.rstrip("?") not in rule and ":" not in rule      # never quotes the question


def test_sr_moa_rule_form_is_accepted():
    f = _failure(rule="RULE: The capital of Veloria is Quenmark.")
    assert reflect(f, ask=None, cfg=CFG) == "The capital of Veloria is Quenmark."
    with pytest.raises(RuleRejected, match="nothing after it"):
        validate_rule("RULE: ** ", 100)


def test_malformed_model_rule_falls_back_to_the_clean_rule():
    assert not is_sentence('Suost" to provide a correct answer.')
    assert not is_sentence("Quenmark")
    assert is_sentence("The capital of Veloria is Quenmark.")
    f = _failure(correct_answer="Quenmark")
    rule = reflect(f, lambda p: 'RULE: Suost" to provide Quenmark a correct answer.', CFG)
    assert rule == "The capital of Veloria is Quenmark."
