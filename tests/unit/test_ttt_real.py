"""One real SR-TTT edit on SmolLM2-135M: an invented fact is learned, reached by a paraphrase, and
nothing else changes. Slow (real model); about a minute on 2 quiet cores."""

from __future__ import annotations

import time

import numpy as np
import pytest

from srmoa_dist.config import ExpertConfig, KeyStoreConfig, SrmoaConfig, StoreConfig, TTTConfig
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.model.fusion import ExpertFusion
from srmoa_dist.model.generation import GenerationParams, generate
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.query_encoder import QueryEncoder
from srmoa_dist.ttt.detect import answer_matches, explicit_failure
from srmoa_dist.ttt.edit import apply_edit
from srmoa_dist.ttt.edit_env import make_fetch, make_router
from srmoa_dist.ttt.ledger import EditLedger

QUESTION = "What is the capital of Veloria?"
RULE = "The capital of the invented country Veloria is Quenmark."
ANSWER = "Quenmark"
PARAPHRASE = "Which city is the capital of Veloria?"          # held out: never trained on
UNRELATED = ["What is the capital of France?", "How do I boil an egg?"]   # a near miss and a far one
TAU = 0.55   # deferral threshold; a store calibrates it (query_encoder.calibrate_tau), fixed here


def _chat(text: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": text}]]


@pytest.mark.slow
def test_smollm2_learns_an_invented_fact(smollm2_base, tmp_path):
    base = smollm2_base
    cfg = SrmoaConfig(data_dir=str(tmp_path), expert=ExpertConfig(),
                      keystore=KeyStoreConfig(tau=TAU, device="cpu"), ttt=TTTConfig(verify_max_new_tokens=12))
    fusion = ExpertFusion(base.model, cfg.expert, query_layer=base.query_layer)
    try:
        enc = QueryEncoder.calibrate(base, d_key=cfg.keystore.d_key)
        ks = KeyStore(cfg.keystore)
        store = ShardedExpertStore(cfg.shards_dir, StoreConfig(n_shards=2))
        ledger = EditLedger(cfg.ledger_dir)
        params = GenerationParams(max_new_tokens=12)
        prompts = [QUESTION, PARAPHRASE, *UNRELATED]
        before = [generate(base, None, None, _chat(p), params=params)[0] for p in prompts]
        assert not any(answer_matches(g.text, ANSWER) for g in before)   # the base model cannot know it

        failure = explicit_failure(QUESTION, before[0].text, correct_answer=ANSWER, rule=RULE)
        t0 = time.perf_counter()
        r = apply_edit(failure, base=base, fusion=fusion, encoder=enc, store=store, keystore=ks,
                       ledger=ledger, cfg=cfg, locality_prompts=UNRELATED, exclude=[PARAPHRASE])
        edit_s = time.perf_counter() - t0
        per_step = r.timings["train_s"] / max(r.steps, 1)
        print(f"\nSR-TTT edit: {r.status}, {r.steps} steps, {per_step:.2f} s/step, "
              f"train {r.timings['train_s']:.1f} s, edit {edit_s:.1f} s, lm {r.lm_losses[0]:.2f} -> "
              f"{r.lm_losses[-1]:.3f}")
        assert r.status == "verified", r.reason
        assert r.steps <= cfg.ttt.steps and r.lm_losses[-1] < r.lm_losses[0] / 10
        assert all(PARAPHRASE.lower() not in str(p.to_dict()).lower() for p in r.prompts)

        router, fetch = make_router(ks, cfg.keystore.k), make_fetch(store)
        after = [generate(base, fusion, enc, _chat(p), router, fetch, params)[0] for p in prompts]
        key = ks.get([r.expert_id])[0]
        scores = [float(g.query @ key) for g in after]
        print("scores to the edited key:", np.round(scores, 3), "answers:", [g.text for g in after])
        # the trained prompt and the never-trained paraphrase reach the expert and answer
        for g in after[:2]:
            assert r.expert_id in g.expert_ids and answer_matches(g.text, ANSWER), (g.text, g.expert_ids)
        # unrelated prompts: deferred to the base model, token for token the same greedy output
        for g0, g1 in zip(before[2:], after[2:]):
            assert g1.expert_ids == [] and g1.token_ids == g0.token_ids, (g0.text, g1.text)
        store.close()
    finally:
        fusion.remove()


@pytest.mark.slow
def test_smollm2_two_facts_about_one_entity_both_hold_and_do_not_leak(smollm2_base, tmp_path):
    """Two edits about one invented country through the feedback path (`Editor`), with the relation
    gate as served by default (arbitration, deferral, other edits' relations): both answered, the second
    trained with the first as its neighbour, and an unedited question about the country answers with
    neither and reaches neither expert: another country's anthem was edited too, and that edit's
    relation is what the unedited anthem question is nearest. The second is asked in a wording of the
    gate's own corpus, whose bank holds its paraphrase's twin: that relation must leave the bank for this
    expert, else the paraphrase is deferred (and the edit's own question ties with its twin)."""
    from srmoa_dist.bench.model_cache import shared_model_cache
    from srmoa_dist.routing.relation_gate import GatedEncoder, gated, search_slack, sync_edited
    from srmoa_dist.ttt.editor import Editor

    base = smollm2_base
    cfg = SrmoaConfig(data_dir=str(tmp_path), keystore=KeyStoreConfig(tau=TAU, device="cpu"),
                      ttt=TTTConfig(verify_max_new_tokens=16))
    fusion = ExpertFusion(base.model, cfg.expert, query_layer=base.query_layer)
    facts = [("What is the capital of Veloria?", "Quenmark", "Which city is the capital of Veloria?"),
             ("What is the national dish of Veloria?", "drelk stew",
              "Which food is Veloria's national dish?"),
             ("What is the national anthem of Brosnia?", "Dawn of Brosnia",
              "Which song is the national anthem of Brosnia?")]
    unedited = "What is the national anthem of Veloria?"
    try:
        enc = gated(base, QueryEncoder.calibrate(base, d_key=cfg.keystore.d_key),
                    shared_model_cache() / "encoders")
        assert isinstance(enc, GatedEncoder) and enc.gate.defer_margin == -0.1    # the default config
        assert enc.gate.edited is not None
        ks = KeyStore(cfg.keystore)
        store = ShardedExpertStore(cfg.shards_dir, StoreConfig(n_shards=2))
        editor = Editor(cfg, base=base, fusion=fusion, encoder=enc, store=store, keystore=ks,
                        ledger=EditLedger(cfg.ledger_dir), locality_prompts=UNRELATED)
        results = [editor.run({"prompt": q, "correct_answer": a}, exclude=[h]) for q, a, h in facts]
        print("\nedits:", [(r.status, r.steps, round(r.timings["total_s"], 1)) for r in results])
        assert [r.status for r in results] == ["verified"] * 3, [r.reason for r in results]
        assert results[1].neighbours == (results[0].edit_id,)          # the second saw the first as neighbour
        assert sync_edited(enc, ks, store) == 0                         # the editor synced before verifying
        assert enc.gate.edited.stats()["experts"] == 3
        router = make_router(ks, cfg.keystore.k, cfg.keystore.tau, search_slack(enc))     # as served
        fetch = make_fetch(store)
        params = GenerationParams(max_new_tokens=16, gate_temperature=cfg.keystore.temperature)
        asks = [q for q, _, _ in facts] + [h for _, _, h in facts] + [unedited]
        got = [generate(base, fusion, enc, _chat(p), router, fetch, params)[0] for p in asks]
        print("answers:", [(g.text, g.expert_ids) for g in got])
        for (q, a, _), g_q in zip(facts, got[:3]):
            assert answer_matches(g_q.text, a), (q, g_q.text)
        # held-out paraphrases' answers are printed, not asserted: bench lifelong measures them (see
        # README Results). The corpus-worded one must reach its expert: its corpus twin left the bank.
        assert results[1].expert_id in got[4].expert_ids, got[4]
        assert not any(answer_matches(got[6].text, a) for _, a, _ in facts), got[6].text
        assert not {r.expert_id for r in results[:2]} & set(got[6].expert_ids), got[6]
        store.close()
    finally:
        fusion.remove()
