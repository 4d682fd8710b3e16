"""Tenants on the real SmolLM2, with 10 real SR-TTT edits: namespace A's edits change none of namespace
B's answers (free generation) and B's searches never return A's experts, while an edit made in the
shared namespace reaches both.

The edits run the code path of `POST /v1/feedback` in a tenant's namespace (`runtime.edit_context`):
`ttt.Editor` over a `routing.namespaces.NamespaceView` of a real `KeyStore`, real LMDB expert shards
under tmp_path, one ledger, verification on (each edit re-asked, its neighbours re-checked, locality
probes compared; a failing edit is rolled back). A's 10 edits are queued feedback jobs trained in
batches (`Editor.run_many`, as the trainer actor drains its queue with `ttt.batch_edits`).

The config is a fast one for this test only (`FAST_TTT`, `FAST_EXPERT`): this is a test of namespace
isolation, not of edit quality (`bench lifelong` and tests/unit/test_ttt_real.py measure that with the
defaults), but the edits must be real ones, so the control asserts they took:
- adapters on the last 3 of the 30 layers (`first_layer=27`): each step runs only those (the layers
  below are computed once, `ttt.trainer.AnswerLoss`), not the default's 23;
- 6 AdamW steps at lr 8e-2 (default 16 at 2e-2);
- all 10 queued requests may share a batch (`batch_edits=10`) and the neighbour margin is 0 (only
  questions scoring >= tau against each other go to separate batches): 10 edits train in 3 batches
  (8, 1, 1), each verified in one batched generation; at most 2 guard rows per edit;
- no contrast rows (each costs one base-model generation per edit), 2 locality probes instead of 4,
  16 verification tokens (enough for the taught sentence's answer).
The encoder has the default relation gate: the shared edit ("What is Pozix Myzhaekim's profession?")
routes near A's "What is Xaexath Saepekre's profession?", and only the gate (an edit leaves questions
that do not name its subject) keeps B's answer to it the base model's.
Measured (2 shared cores, one torch thread): 59 s, of which the 10 edits 33 s (training 18 s,
verification 11 s), the shared edit 5 s, the base answers 4 s and the routed asks from A and B 11 s;
8/10 edits verified, 8/10 taught answers asked from A.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from srmoa_dist.bench.facts import make_facts
from srmoa_dist.config import ExpertConfig, KeyStoreConfig, SrmoaConfig, StoreConfig, TTTConfig
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.model.fusion import ExpertFusion
from srmoa_dist.model.generation import GenerationParams, generate, queries
from srmoa_dist.routing.encoder_cache import calibrated
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.namespaces import NamespaceView
from srmoa_dist.routing.relation_gate import gated
from srmoa_dist.runtime.edit_context import LOCALITY_PROMPTS
from srmoa_dist.ttt.detect import answer_matches
from srmoa_dist.ttt.edit_env import make_fetch
from srmoa_dist.ttt.editor import Editor
from srmoa_dist.ttt.ledger import EditLedger

TAU = 0.55      # deferral threshold; a store calibrates it (query_encoder.calibrate_tau), fixed here
N_A = 10
VERIFIED_MIN = 7      # of A's 10 edits verified (8 measured)
TAUGHT_MIN = 7        # of A's 10 questions answered with the taught answer when asked from A (8 measured)
FAST_TTT = TTTConfig(steps=6, lr=8e-2, batch_edits=N_A, neighbour_margin=0.0, max_guard_prompts=2,
                     contrast_prompts=0, locality_probes=2, verify_max_new_tokens=16)
FAST_EXPERT = ExpertConfig(first_layer=27)


def _chats(texts):
    return [[{"role": "user", "content": t}] for t in texts]


def _request(fact, response):
    """A feedback request as the API takes it: the failing question, the model's answer, the fix."""
    return {"prompt": fact.train[0], "response": response, "correct_answer": fact.answer, "rule": fact.rule}


@pytest.mark.slow
def test_edits_in_namespace_a_never_reach_namespace_b(smollm2_base, smollm2_cache_dir, tmp_path,
                                                             one_torch_thread):
    base = smollm2_base
    cfg = SrmoaConfig(data_dir=str(tmp_path), expert=FAST_EXPERT, ttt=FAST_TTT,
                      keystore=KeyStoreConfig(tau=TAU, device="cpu"))
    fusion = ExpertFusion(base.model, cfg.expert, query_layer=base.query_layer)
    store = ShardedExpertStore(cfg.shards_dir, StoreConfig(n_shards=2))
    try:
        # the default relation gate: an edit leaves questions that do not name its subject
        enc = gated(base, calibrated(base, cfg.keystore.d_key, smollm2_cache_dir),
                    smollm2_cache_dir / "encoders")
        ks = KeyStore(cfg.keystore)
        ledger = EditLedger(cfg.ledger_dir)
        facts = make_facts(N_A + 1, seed=7)
        a_facts, shared_fact = facts[:N_A], facts[N_A]
        chats = _chats([f.train[0] for f in facts])             # A's questions, then the shared one
        params = GenerationParams(max_new_tokens=cfg.ttt.verify_max_new_tokens,
                                  gate_temperature=cfg.keystore.temperature)
        t = time.perf_counter()
        plain = generate(base, None, None, chats, params=params)        # the base model's answers
        t_plain = time.perf_counter() - t
        assert not any(answer_matches(g.text, f.answer) for g, f in zip(plain, facts))

        def editor(own, reach):
            return Editor(cfg, base=base, fusion=fusion, encoder=enc, store=store,
                          keystore=NamespaceView(ks, own, reach), ledger=ledger,
                          locality_prompts=LOCALITY_PROMPTS[: cfg.ttt.locality_probes])

        t = time.perf_counter()
        shared = editor("shared", ()).run(_request(shared_fact, plain[N_A].text),
                                          exclude=shared_fact.held_out)
        assert shared.status == "verified", shared.reason
        t_shared, t = time.perf_counter() - t, time.perf_counter()
        results = editor("a", ("shared",)).run_many(
            [_request(f, g.text) for f, g in zip(a_facts, plain)], excludes=[f.held_out for f in a_facts])
        t_a = time.perf_counter() - t
        assert not [r for r in results if isinstance(r, BaseException)], results
        verified = [r for r in results if r.status == "verified"]
        a_ids = {r.expert_id for r in verified}
        assert len(verified) >= VERIFIED_MIN, [r.reason for r in results if r.status != "verified"]
        assert set(ks.namespace_of(sorted(a_ids))) == {"a"}
        assert ks.namespace_of([shared.expert_id]) == ["shared"]
        assert all(ledger.get(r.edit_id).extra["namespace"] == "a" for r in verified)
        assert shared.expert_id not in a_ids and len(a_ids) == len(verified)      # one new expert each

        def ask(reach):
            def router(xq):
                return ks.search(xq, namespaces=[reach] * xq.shape[0])
            return generate(base, fusion, enc, chats, router=router, fetch=make_fetch(store), params=params)

        # from A: the edits took (the control: what B must not see is there)
        t = time.perf_counter()
        from_a = ask({"a", "shared"})
        taught = sum(answer_matches(g.text, f.answer) for g, f in zip(from_a, a_facts))
        assert taught >= TAUGHT_MIN, [(g.text, f.answer) for g, f in zip(from_a, a_facts)]
        # from B: no search returns an A key, even with deferral off (tau -inf: every key it may see)
        Q = queries(base, enc, chats)                                                   # (21, d_key)
        _, I = ks.search(Q, cfg.keystore.k, tau=-np.inf, namespaces=[{"b", "shared"}] * len(chats))
        assert set(I.ravel().tolist()) <= {shared.expert_id, -1}
        _, I_a = ks.search(Q[:N_A], cfg.keystore.k, tau=-np.inf, namespaces=[{"a", "shared"}] * N_A)
        own = [r.expert_id if r.status == "verified" else None for r in results]
        assert sum(e in row for row, e in zip(I_a.tolist(), own)) >= TAUGHT_MIN     # the same, from A
        # ... and B's free generation is the base model's, token for token, on all of A's questions
        from_b = ask({"b", "shared"})
        t_ask = time.perf_counter() - t
        assert not a_ids & {i for g in from_b for i in g.expert_ids}
        assert [g.token_ids for g in from_b[:N_A]] == [g.token_ids for g in plain[:N_A]]

        # the shared edit reaches both tenants, and no one outside it
        for g in (from_a[N_A], from_b[N_A]):
            assert shared.expert_id in g.expert_ids and answer_matches(g.text, shared_fact.answer), g.text
        _, I_b = ks.search(Q, cfg.keystore.k, tau=-np.inf, namespaces=[{"b"}] * len(chats))
        assert (I_b == -1).all()                                 # B alone holds no key at all
        batches = {r.timings["train_s"]: (r.batch_size, r.timings["verify_s"]) for r in results}
        print(f"\nnamespaces on SmolLM2, {N_A} real edits in A in {len(batches)} batches "
              f"({sorted(b for b, _ in batches.values())}): {len(verified)}/{N_A} verified, {taught}/{N_A} "
              f"taught answers asked from A; from B none of A's keys searched, {N_A}/{N_A} answers "
              f"token-identical to the base model; the shared edit reaches A and B.\n  seconds: shared "
              f"edit {t_shared:.1f}, A's {N_A} edits {t_a:.1f} (training {sum(batches):.1f}, verification "
              f"{sum(v for _, v in batches.values()):.1f}), base answers {t_plain:.1f}, asks {t_ask:.1f}")
    finally:
        store.close()
        fusion.remove()
