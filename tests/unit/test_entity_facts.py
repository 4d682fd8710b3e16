"""The lifelong benchmark's fact generator: several relations per entity, held-out text never trained."""

from __future__ import annotations

import pytest

from srmoa_dist.bench.entity_facts import make_entity_facts, relations_of


def test_several_facts_per_entity_with_an_unedited_question():
    es = make_entity_facts(9, 3, seed=0)
    assert [e.kind for e in es[:3]] == ["country", "company", "person"]
    for e in es:
        assert len(e.facts) == 3 and len({f.relation for f in e.facts}) == 3
        assert all(f.entity == e.name and e.name in f.question for f in e.facts)
        assert e.name in e.unedited
        asked = next(r for r in relations_of(e.kind) if r.name == e.unedited_relation)   # its relation
        assert e.unedited in {t.format(e=e.name) for t in asked.train}
        assert e.unedited_relation not in {f.relation for f in e.facts}
        edited = {t for f in e.facts for t in f.train + f.held_out}
        assert e.unedited not in edited
        kinds = {r.name for r in relations_of(e.kind)}
        assert {f.relation for f in e.facts} <= kinds
        for f in e.facts:
            assert all(h.lower() not in t.lower() for h in f.held_out for t in f.train)
            assert f.answer in f.rule
    assert [f.fact_id for e in es for f in e.facts] == list(range(27))


def test_deterministic_and_large_enough_for_3000_distinct_facts():
    assert make_entity_facts(5, 2, seed=3) == make_entity_facts(5, 2, seed=3)
    assert make_entity_facts(5, 2, seed=3) != make_entity_facts(5, 2, seed=4)
    es = make_entity_facts(1000, 3, seed=0)
    facts = [f for e in es for f in e.facts]
    assert len({(f.entity, f.relation) for f in facts}) == 3000
    answers = [f.answer.lower() for f in facts]
    assert len(set(answers)) == 3000                       # an answer names one fact only


def test_bad_sizes_are_value_errors():
    with pytest.raises(ValueError, match="facts_per_entity"):
        make_entity_facts(3, 5)
    with pytest.raises(ValueError, match="n_entities"):
        make_entity_facts(-1, 2)
