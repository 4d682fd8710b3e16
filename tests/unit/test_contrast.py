"""Contrast prompts: the subject of a question, generic questions about it, a reply's first sentence."""

from __future__ import annotations

import pytest

from srmoa_dist.ttt.contrast import contrast_questions, first_sentence, subject_of


@pytest.mark.parametrize("q, s", [
    ("What is the capital of Raerkora?", "Raerkora"),
    ("Who is the CEO of Dysaex Labs?", "Dysaex Labs"),
    ("Where was Bo Tam born?", "Bo Tam"),
    ("What is Bo Tam's profession?", "Bo Tam"),
    ("If I travel to Veloria, which currency will I need?", "Veloria"),
    ("What is 2 plus 2?", None),
    ("how do i boil an egg", None),
])
def test_subject_of(q, s):
    assert subject_of(q) == s


def test_contrast_questions_and_first_sentence():
    assert contrast_questions("Who founded Brak Labs?", 2) == [
        "Tell me something interesting about Brak Labs.", "What is Brak Labs known for?"]
    assert contrast_questions("What is 2 plus 2?", 2) == []
    assert contrast_questions("Who founded Brak Labs?", 0) == []
    assert first_sentence("Brak Labs makes tools. It was founded in 1990.") == "Brak Labs makes tools."
    assert first_sentence("  no end in sight ") == "no end in sight"
