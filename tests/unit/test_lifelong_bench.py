"""The lifelong benchmark end to end at a tiny size on a tiny random Llama (no quality can be asserted)."""

from __future__ import annotations

import json

import pytest

from srmoa_dist.bench.lifelong import (
    _EvalSet,
    _write_partial,
    by_relation,
    format_summary,
    held_out_misses,
    run_lifelong_bench,
)
from srmoa_dist.config import ExpertConfig, KeyStoreConfig, SrmoaConfig, StoreConfig, TTTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(text: str, experts: list[int]):
    """A finished generation served by `experts` (ids), at gate 1."""
    import numpy as np

    from srmoa_dist.model.generation import Generation

    return Generation(text=text, expert_ids=experts, scores=[0.9] * len(experts), gates=[1.0] * len(experts),
                      query=np.zeros(0, np.float32), prompt_tokens=5, completion_tokens=3,
                      finish_reason="stop")


def test_lifelong_bench_smoke(tiny_bench_base, tmp_path):
    base, mcfg = tiny_bench_base
    cfg = SrmoaConfig(model=mcfg, expert=ExpertConfig(rank=4, alpha=8.0), store=StoreConfig(n_shards=2),
                      keystore=KeyStoreConfig(d_key=16, k=4),
                      ttt=TTTConfig(steps=2, lr=0.05, verify_max_new_tokens=4, check_isolation=False,
                                    locality_probes=2))
    out = tmp_path / "lifelong.json"
    said: list[str] = []
    doc = run_lifelong_bench(4, out, facts_per_entity=2, checkpoints=(2,), data_dir=tmp_path / "d", cfg=cfg,
                             base=base, tau=0.2, n_probes=4, n_near_miss=1, n_strangers=2, serve_queries=300,
                             max_new_tokens=4, batch_size=8, say=said.append,
                             baselines=("base", "rule_in_context", "shared_lora", "grace"))
    on_disk = json.loads(out.read_text())
    assert on_disk["n_edits"] == 4 and on_disk["facts_per_entity"] == 2
    assert "partial" not in on_disk                 # the finished run replaced the per-checkpoint file
    assert [c["edits"] for c in on_disk["checkpoints"]] == [2, 4]
    for name in ("base", "rule_in_context", "shared_lora", "grace"):
        assert [c["edits"] for c in on_disk["baselines"][name]] == [2, 4]
    assert on_disk["grace"]["entries"] + on_disk["grace"]["expansions"] == 4
    assert on_disk["grace"]["calibration"]["eps0"] == on_disk["grace"]["eps0"] > 0
    base_c = on_disk["baselines"]["base"][-1]
    assert base_c["locality"] == 1.0                              # the base model against itself
    assert base_c["n"] == {"trained": 4, "held_out": 8, "probe": 4, "stranger": 2, "unedited": 2}
    assert base_c["locality_invented"] == 1.0
    kinds = {"reliability": "trained", "generalization": "held_out", "locality": "probe", "leak": "unedited"}
    for c in on_disk["checkpoints"] + [on_disk["after_consolidation"]["sr_ttt"]]:
        n = {**c["n"], "probe": c["n"]["probe"] + c["n"]["stranger"]}     # locality: both kinds of probe
        for m, kind in kinds.items():                      # a share of that kind's prompts
            assert c[m] in {i / n[kind] for i in range(n[kind] + 1)}, (m, c)
        assert c["locality_invented"] in {i / 2 for i in range(3)}
    # the latest evaluation (after consolidation) recomputed from the outputs the document keeps
    from srmoa_dist.bench.ttt_bench import contains_answer

    last = on_disk["after_consolidation"]["sr_ttt"]
    for m in ("reliability", "generalization", "leak"):
        rows = [o for o in on_disk["outputs"] if o["kind"] == kinds[m]]
        hits = [any(contains_answer(o["text"], a) for a in o["answers"]) for o in rows]
        assert last[m] == sum(hits) / len(hits), m
    missed = [o for o in on_disk["outputs"]
              if o["kind"] == "held_out" and not any(contains_answer(o["text"], a) for a in o["answers"])]
    assert sum(last["held_out_misses"].values()) == len(missed)      # every wrong paraphrase has one cause
    assert last["held_out_misses"]["unrouted"] == sum(not o["experts"] for o in missed)
    rel = last["by_relation"]                       # the same paraphrases and unedited questions, by relation
    edited_rels = {f["relation"] for f in on_disk["edits"]}
    assert {r for r, v in rel.items() if v["held_out"]} == edited_rels
    assert sum(v["held_out"] for v in rel.values()) == last["n"]["held_out"]
    assert sum(v["right"] for v in rel.values()) == round(last["generalization"] * last["n"]["held_out"])
    for cause, count in last["held_out_misses"].items():
        assert sum(v[cause] for v in rel.values()) == count
    assert sum(v["unedited"] for v in rel.values()) == last["n"]["unedited"]
    assert sum(v["leaked"] for v in rel.values()) == round(last["leak"] * last["n"]["unedited"])
    cons = on_disk["after_consolidation"]["consolidation"]
    assert cons["queries"] == 300 and cons["pool"] == 4 * 2 + 2 + 4 + 2
    assert on_disk["edit_seconds_p50"] > 0 and on_disk["edit_seconds_p90"] >= on_disk["edit_seconds_p50"]
    assert sum(on_disk["edits_summary"].values()) == 4
    assert set(on_disk["phase_seconds_p50"]) >= {"train_s", "commit_s"}
    check = on_disk["greedy_check"]               # the eval's confirmed outputs equal decoding's
    assert check["rows"] == sum(base_c["n"].values()) and check["identical"] == check["rows"]
    assert all(c["eval_s"] > 0 for c in on_disk["checkpoints"])
    assert (tmp_path / "lifelong.png").stat().st_size > 0
    assert said and said[0] == format_summary(on_disk)
    assert doc["tau"] == 0.2
    # the invented near-misses ask the benchmark's relations about entities no edit is about
    edited = {f["entity"] for f in on_disk["edits"]}
    strangers = [o["prompt"] for o in on_disk["outputs"] if o["kind"] == "stranger"]
    assert len(strangers) == 2 and not [q for q in strangers for e in edited if e in q]


def test_a_checkpoint_is_on_disk_before_the_run_ends(tmp_path):
    out = tmp_path / "run.json"
    curves = {"sr_ttt": [{"edits": 10, "reliability": 1.0}], "base": [{"edits": 10, "reliability": 0.0}]}
    _write_partial(out, 1000, 3, 0.6, curves, [{"fact": 0, "status": "verified"}] * 10)
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["edits_done"] == 10 and doc["n_edits"] == 1000
    assert doc["checkpoints"] == curves["sr_ttt"] and doc["baselines"] == {"base": curves["base"]}


def test_lifelong_bench_rejects_a_negative_stranger_count(tmp_path):
    with pytest.raises(ValueError, match="n_strangers"):
        run_lifelong_bench(1, tmp_path / "x.json", n_strangers=-1)


def test_calibration_facts_do_not_depend_on_the_run_size():
    """tau is calibrated on the same held-apart facts in a 100- and a 1,000-edit run of one seed, and
    none of them names an entity or an answer the runs edit."""
    from srmoa_dist.bench.entity_facts import make_entity_facts
    from srmoa_dist.bench.lifelong import calibration_facts

    small = calibration_facts(100, 34 + 8, 3, seed=0)
    large = calibration_facts(1000, 334 + 8, 3, seed=0)
    assert [f.question for f in small] == [f.question for f in large] and len(small) == 50
    edited = make_entity_facts(334 + 8, 3, seed=0)
    names = {e.name for e in edited} | {f.answer for e in edited for f in e.facts}
    assert not names & ({f.entity for f in large} | {f.answer for f in large})
    assert [f.question for f in calibration_facts(1000, 342, 3, seed=1)] != [f.question for f in large]


def test_held_out_misses_name_the_routing_of_each_wrong_paraphrase():
    """A wrong held-out paraphrase is unrouted, served by other experts, or served by its own fact's
    expert; right answers and other kinds of row are not counted."""
    es = _EvalSet([], [], [])
    rows = [("held_out", 0, _gen("It is Vask.", [7])),          # right: not a miss
            ("held_out", 0, _gen("No idea.", [])),              # unrouted
            ("held_out", 0, _gen("It is Brol.", [9])),          # another fact's expert
            ("held_out", 0, _gen("It is Va.", [9, 7])),         # its own expert among those served
            ("held_out", 1, _gen("Who knows.", [7])),           # fact 1 was rolled back: no expert of its own
            ("trained", 0, _gen("No idea.", []))]               # not a paraphrase
    for kind, fact, _ in rows:
        es.add("q", kind, ("Vask",) if fact == 0 else ("Dorn",), fact)
    assert held_out_misses(es, [g for *_, g in rows], {0: 7}) == {
        "unrouted": 1, "other_expert": 2, "own_expert": 1}


def test_by_relation_counts_each_relations_paraphrases_and_leaks():
    """by_relation: per relation, the paraphrases right and why the others were not (as held_out_misses
    says), and the unedited questions of that relation with the ones that leaked an edited answer."""
    es = _EvalSet([], [], [])
    rows = [("held_out", ("Vask",), 0, "capital", _gen("It is Vask.", [7])),
            ("held_out", ("Vask",), 0, "capital", _gen("No idea.", [])),
            ("held_out", ("Dorn",), 1, "currency", _gen("It is Va.", [8])),          # its own expert, wrong
            ("unedited", ("Vask", "Dorn"), None, "river", _gen("The Vask river.", [7])),   # leaked
            ("unedited", ("Keb",), None, "river", _gen("I do not know.", [])),
            ("unedited", ("Dorn",), None, "capital", _gen("It is Sul.", [])),
            ("probe", (), None, None, _gen("Hello.", []))]                         # not counted
    for kind, answers, fact, rel, _ in rows:
        es.add("q", kind, answers, fact, rel)
    got = by_relation(es, [g for *_, g in rows], {0: 7, 1: 8})
    zero = {"held_out": 0, "right": 0, "unrouted": 0, "other_expert": 0, "own_expert": 0, "unedited": 0,
            "leaked": 0}
    assert got == {"capital": {**zero, "held_out": 2, "right": 1, "unrouted": 1, "unedited": 1},
                   "currency": {**zero, "held_out": 1, "own_expert": 1},
                   "river": {**zero, "unedited": 2, "leaked": 1}}
    assert list(got) == ["capital", "currency", "river"]
