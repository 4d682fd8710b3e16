"""Failure detection: verdicts, the numeric checker, the verifier registry."""

from __future__ import annotations

from decimal import Decimal

import pytest

from srmoa_dist.ttt.detect import (
    Failure,
    NumericAnswerChecker,
    Verdict,
    answer_matches,
    detect,
    explicit_failure,
    extract_last_number,
    failure_from_verdict,
    get_verifier,
    parse_reference,
    register_verifier,
    verifier_names,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 apples and buys 4 more, so 7.", "7"),
        ("The total is $1,234.50 in the end", "1234.50"),
        ("It costs $5.", "5"),
        ("Answer: -12", "-12"),
        ("The result is 0.25, i.e. a quarter", "0.25"),
        ("We get 12,000 people and then 18 more; final 12,018.", "12018"),
        ("x2 and v3 are names, the number is 9", "9"),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == Decimal(expected)


def test_extract_last_number_none_and_bad_input():
    assert extract_last_number("no digits here") is None
    with pytest.raises(ValueError, match="string"):
        extract_last_number(42)  # type: ignore[arg-type]


def test_parse_reference_gsm8k_and_bare():
    assert parse_reference("Natalia sold 48/2 = 24 clips.\n#### 72") == 72
    assert parse_reference("#### 1,080") == 1080
    assert parse_reference("3.5") == Decimal("3.5")
    with pytest.raises(ValueError, match="####"):
        parse_reference("#### many")
    with pytest.raises(ValueError, match="non-empty"):
        parse_reference("  ")


def test_numeric_checker_verdicts():
    chk = NumericAnswerChecker()
    v = chk([{"role": "user", "content": "q"}], "so the answer is 72.", "work\n#### 72")
    assert v.correct and v.answer == "72" and v.source == "numeric"
    v = chk([{"role": "user", "content": "q"}], "I think it is 70", "#### 72")
    assert not v.correct and v.answer == "72" and "70" in v.detail
    v = chk([{"role": "user", "content": "q"}], "no idea", "#### 72")
    assert not v.correct and "no number" in v.detail
    assert chk([{"role": "user", "content": "q"}], "$1,080.00", "#### 1080").correct


def test_detect_returns_failure_or_none():
    assert detect("What is 2+2?", "4", "#### 4") is None
    f = detect("What is 2+2?", "It is 5", "#### 4", request_id="r1", expert_ids=[3])
    assert isinstance(f, Failure)
    assert f.correct_answer == "4" and f.rule is None and f.source == "numeric"
    assert f.question == "What is 2+2?" and f.expert_ids == (3,) and f.request_id == "r1"


def test_registry_hook():
    class Exact:
        name = "exact"

        def __call__(self, messages, response, reference):
            return Verdict(response.strip() == reference, answer=reference, source=self.name)

    register_verifier("exact-test", Exact)
    assert "exact-test" in verifier_names() and "numeric" in verifier_names()
    assert detect("Say hi", "hello", "hi", verifier="exact-test").correct_answer == "hi"
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("exact-test", Exact)
    register_verifier("exact-test", Exact, replace=True)
    with pytest.raises(ValueError, match="unknown verifier"):
        get_verifier("nope")


def test_verdict_and_failure_validation():
    with pytest.raises(ValueError, match="bool"):
        Verdict("yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="answer"):
        Verdict(False, answer="  ")
    with pytest.raises(ValueError, match="correct_answer, a rule"):
        explicit_failure("q?", "a")
    with pytest.raises(ValueError, match="end with a user"):
        explicit_failure([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "a",
                         correct_answer="b")
    with pytest.raises(ValueError, match="role"):
        explicit_failure([{"role": "bot", "content": "q"}], "a", correct_answer="b")
    with pytest.raises(ValueError, match="non-empty list"):
        explicit_failure([], "a", correct_answer="b")
    f = explicit_failure("What is the capital of Veloria?", "Paris", correct_answer="Quenmark")
    assert f.messages == ({"role": "user", "content": "What is the capital of Veloria?"},)
    v = Verdict(False, answer="Quenmark", rule="The capital of Veloria is Quenmark.")
    g = failure_from_verdict("What is the capital of Veloria?", "Paris", v)
    assert g is not None and g.rule.startswith("The capital")
    assert failure_from_verdict("q", "a", Verdict(True)) is None


def test_answer_matches():
    assert answer_matches("The capital is Quenmark.", "quenmark")
    assert not answer_matches("The capital is Paris.", "Quenmark")
    assert answer_matches("so she pays $1,080 in total", "1080")
    assert not answer_matches("so she pays 1,081", "1080")


def _gsm8k_dev() -> list[dict]:
    """GSM8K's development split, read in place from $SRMOA_SHARED_DIR (default ../shared)."""
    import json
    import os
    from pathlib import Path

    shared = Path(os.environ.get("SRMOA_SHARED_DIR", Path(__file__).resolve().parents[3] / "shared"))
    path = shared / "data" / "gsm8k" / "dev.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K dev split not found at {path}: set SRMOA_SHARED_DIR to the folder holding data/")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_numeric_checker_on_the_gsm8k_dev_split():
    """Every reference parses; its own worked solution is judged right, and an off-by-one answer wrong."""
    rows = _gsm8k_dev()
    assert len(rows) > 100
    chk = NumericAnswerChecker()
    for row in rows:
        messages = [{"role": "user", "content": row["question"]}]
        ref = parse_reference(row["answer"])
        worked = row["answer"].split("####")[0].strip() + f"\nThe answer is {ref}."
        assert chk(messages, worked, row["answer"]).correct, row["question"]
        assert not chk(messages, f"The answer is {ref + 1}.", row["answer"]).correct, row["question"]
