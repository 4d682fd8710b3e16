"""Tenants on the real SmolLM2: 20 experts in namespace A change none of namespace B's answers (free
generation) and B's queries never reach A's experts, while an expert of the shared namespace reaches both.

The 20 A-side experts are imported, not trained (a real SR-TTT edit is ~15 s here, 20 would take the
suite's budget): strong random parallel-MLP adapters whose keys are computed from each fact's four
phrasings with the serving query encoder, as `POST /v1/experts` computes them. The control: the same
questions asked from A reach A's experts (and change answers), so the filter is what isolates B.
"""

from __future__ import annotations

import pytest

from srmoa_dist.bench.facts import make_facts
from srmoa_dist.config import ExpertConfig, KeyStoreConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.model.fusion import ExpertFusion
from srmoa_dist.model.generation import GenerationParams, generate, queries
from srmoa_dist.routing.encoder_cache import calibrated
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.serve.experts_api import routing_key

TAU = 0.55
N_A = 20


def _chats(texts):
    return [[{"role": "user", "content": t}] for t in texts]


@pytest.mark.slow
def test_namespace_a_experts_never_reach_namespace_b(smollm2_base, smollm2_cache_dir):
    base = smollm2_base
    ks_cfg = KeyStoreConfig(tau=TAU, k=4, device="cpu")
    fusion = ExpertFusion(base.model, ExpertConfig(), query_layer=base.query_layer)
    try:
        enc = calibrated(base, ks_cfg.d_key, smollm2_cache_dir)
        facts = make_facts(N_A + 1, seed=7)
        a_facts, shared_fact = facts[:N_A], facts[N_A]
        ks = KeyStore(ks_cfg)
        experts: dict[int, LoRAExpert] = {}

        def put(fact, ns: str, seed: int) -> int:
            key = routing_key(queries(base, enc, _chats(fact.train)))
            [eid] = ks.add(key[None], pinned=True, namespace=ns).tolist()
            experts[eid] = LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=8.0, seed=seed, b_std=0.2)
            return eid

        a_ids = {put(f, "a", i) for i, f in enumerate(a_facts)}
        s_id = put(shared_fact, "shared", 99)
        params = GenerationParams(max_new_tokens=10)

        def ask(texts, reach):
            def router(xq):
                return ks.search(xq, namespaces=None if reach is None else [reach] * xq.shape[0])
            return generate(base, fusion, enc, _chats(texts), router=router,
                            fetch=lambda ids: {i: experts[i] for i in ids}, params=params)

        b_texts = [f.held_out[0] for f in a_facts]                       # A's facts, asked from B
        plain = generate(base, None, None, _chats(b_texts), params=params)
        from_b = ask(b_texts, {"b", "shared"})
        assert not a_ids & {i for g in from_b for i in g.expert_ids}     # B never reaches A's experts
        assert [g.text for g in from_b if not g.expert_ids] == [p.text for p, g in zip(plain, from_b)
                                                                if not g.expert_ids]
        assert sum(not g.expert_ids for g in from_b) >= N_A - 2          # B's answers are the base model's

        from_a = ask(b_texts, {"a", "shared"})                           # the same questions from A
        reached = sum(bool(a_ids & set(g.expert_ids)) for g in from_a)
        changed = sum(g.text != p.text for g, p in zip(from_a, plain) if g.expert_ids)
        assert reached >= N_A // 2 and changed >= 3, (reached, changed)   # 20 and 5 here (10 tokens)

        shared_q = [shared_fact.question]                                # one of its examples
        for reach in ({"a", "shared"}, {"b", "shared"}):                 # the shared namespace reaches both
            [g] = ask(shared_q, reach)
            assert s_id in g.expert_ids
        [g] = ask(shared_q, {"b"})
        assert s_id not in g.expert_ids
        print(f"\nnamespaces on SmolLM2: A reaches its experts on {reached}/{N_A} of its held-out "
              f"questions ({changed} answers changed); from B 0 reach A, "
              f"{sum(not g.expert_ids for g in from_b)}/{N_A} answered exactly as the base model")
    finally:
        fusion.remove()
