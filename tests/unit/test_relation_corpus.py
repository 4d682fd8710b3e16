"""The discriminant's corpus: deterministic, labelled by fact, disjoint from every benchmark relation."""

from __future__ import annotations

import pytest

from srmoa_dist.bench.entity_facts import ENTITY_RELATIONS
from srmoa_dist.bench.facts import RELATIONS as FACT_RELATIONS
from srmoa_dist.routing.relation_corpus import RELATIONS, make_relation_corpus, relation_labels


def test_deterministic_and_labelled_by_fact():
    texts, labels = make_relation_corpus(3, seed=4)
    assert (texts, labels) == make_relation_corpus(3, seed=4)
    assert texts != make_relation_corpus(3, seed=5)[0]
    n_rel = sum(len(r) for r in RELATIONS.values())
    assert len(set(labels)) == 3 * n_rel and len(texts) == 4 * 3 * n_rel
    # the four wordings of a label share the entity; two labels of one entity share it too
    assert len({t for t, c in zip(texts, labels) if c == 0}) == 4


def test_disjoint_from_benchmark_wordings():
    ours = {w for rels in RELATIONS.values() for r in rels for w in r}
    for rel in (*FACT_RELATIONS, *ENTITY_RELATIONS):
        for template in (*rel.train, *rel.held_out):
            assert template not in ours, template


def test_bad_size():
    with pytest.raises(ValueError, match="entities_per_kind"):
        make_relation_corpus(0)


def test_corpus_questions_are_distinct_one_wording_per_class():
    from srmoa_dist.routing.relation_corpus import corpus_questions

    q = corpus_questions(500, seed=3)
    assert len(q) == 500 and len(set(q)) == 500
    assert q == corpus_questions(500, seed=3) and q != corpus_questions(500, seed=4)
    first_wordings = {r[0].split("{e}")[0] for rels in RELATIONS.values() for r in rels}
    assert all(any(t.startswith(w) for w in first_wordings) for t in q[:50])
    with pytest.raises(ValueError, match="n must be"):
        corpus_questions(0)


def test_relation_labels_name_the_relation_of_each_text():
    texts, facts = make_relation_corpus(2, seed=1)
    rel = relation_labels(2)
    assert len(rel) == len(texts) and len(set(rel)) == sum(len(r) for r in RELATIONS.values())
    for f, r in zip(facts, rel):
        assert all(rel[i] == r for i, g in enumerate(facts) if g == f)     # a fact has one relation
    # two entities' questions of one relation share the label and the wording
    first = [t for t, r in zip(texts, rel) if r == 0]
    assert len(first) == 8 and first[0].split()[:4] == first[4].split()[:4]
    with pytest.raises(ValueError, match="entities_per_kind"):
        relation_labels(0)
