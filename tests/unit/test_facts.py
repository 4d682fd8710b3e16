"""The benchmark's fictional facts and probe sets: deterministic, unique, disjoint, no held-out leak."""

from __future__ import annotations

import pytest

from srmoa_dist.bench.facts import (
    GENERIC_PROMPTS,
    N_HELD_OUT,
    N_TRAIN,
    RELATION_BY_NAME,
    RELATIONS,
    make_facts,
    make_probes,
)
from srmoa_dist.routing.query_encoder import CALIBRATION_PROMPTS


def test_deterministic_and_prefix_stable():
    a, b = make_facts(30, seed=3), make_facts(30, seed=3)
    assert a == b
    assert make_facts(7, seed=3) == a[:7]                  # facts do not depend on n
    assert make_facts(30, seed=4) != a


def test_shapes_rules_and_relations_balanced():
    facts = make_facts(len(RELATIONS) * 3, seed=0)
    for f in facts:
        assert len(f.train) == N_TRAIN and len(f.held_out) == N_HELD_OUT and f.question == f.train[0]
        assert f.entity in f.rule and f.answer in f.rule
        assert all(f.entity in t for t in f.train + f.held_out)
        assert all(f.answer.lower() not in t.lower() for t in f.train + f.held_out)   # questions, not answers
        assert f.near_misses and all(f.entity not in t for t in f.near_misses)
        rel = RELATION_BY_NAME[f.relation]
        assert all(any(real in t for real in rel.real) for t in f.near_misses)
    counts = {r.name: sum(f.relation == r.name for f in facts) for r in RELATIONS}
    assert set(counts.values()) == {3}


def test_no_duplicates_and_no_name_inside_another():
    facts = make_facts(100, seed=0)
    assert len({(f.relation, f.entity) for f in facts}) == 100
    texts = [t for f in facts for t in f.train + f.held_out]
    assert len(texts) == len(set(texts))
    names = [f.entity for f in facts] + [f.answer for f in facts if f.relation not in
                                         ("flag_color", "mascot", "profession", "instrument")]
    low = [n.lower() for n in names]
    assert len(set(low)) == len(low)
    for f in facts:       # an answer is found in the reply of its own fact only
        others = [g for g in facts if g is not f]
        assert not any(f.answer.lower() in g.answer.lower() for g in others if g.relation == f.relation
                       and g.answer != f.answer)


def test_held_out_never_in_training_text():
    for f in make_facts(50, seed=1):
        for h in f.held_out:
            assert all(h.lower() not in t.lower() for t in f.train)


def test_avoid_keeps_names_apart():
    first = make_facts(20, seed=0)
    names = [f.entity for f in first] + [f.answer for f in first]
    second = make_facts(20, seed=0, avoid=names)
    assert not {f.entity for f in first} & {f.entity for f in second}


def test_probe_sets_disjoint_and_free_of_facts():
    p = make_probes(0, n_locality=20, n_near_miss=8, n_verify=4)
    assert len(p.locality) == 20 and p.n_near_miss == 8 and len(p.verify) == 4
    sets = [set(p.locality), set(p.verify), set(p.calibration)]
    assert all(len(s) == n for s, n in zip(sets, (20, 4, len(p.calibration))))
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert not set(p.locality + p.verify + p.calibration) & set(CALIBRATION_PROMPTS)
    near = p.locality[-p.n_near_miss:]
    assert all(t not in GENERIC_PROMPTS for t in near) and all(t in GENERIC_PROMPTS for t in p.locality[:12])
    assert sum(t not in GENERIC_PROMPTS for t in p.calibration) >= 20        # near-misses for tau
    facts = make_facts(50, seed=0)
    ents = [f.entity for f in facts]
    assert not any(e in t for e in ents for t in p.locality + p.verify + p.calibration)
    assert make_probes(0) == make_probes(0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_facts(-1)
    with pytest.raises(ValueError):
        make_probes(0, n_locality=4, n_near_miss=5)
