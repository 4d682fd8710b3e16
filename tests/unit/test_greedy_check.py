"""model/greedy_check.py: a known greedy output confirmed in one routed forward, on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.config import ExpertConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.model.fusion import ExpertFusion
from srmoa_dist.model.generation import GenerationParams, generate, make_route_step
from srmoa_dist.model.greedy_check import Expected, confirm_greedy, expected_answer, expected_output
from srmoa_dist.routing.query_encoder import QueryEncoder

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me a joke"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name a colour, any colour at all, please."}],
]


@pytest.fixture(scope="module")
def encoder(tiny_base):
    return QueryEncoder.calibrate(tiny_base, d_key=16, prompts=[c[-1]["content"] for c in CHATS] * 4)


def _step(fusion):
    experts = {7: LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=64.0, dtype="float16", seed=7),
               9: LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=64.0, dtype="float16", seed=9)}

    def router(xq):
        D = np.full((len(xq), 2), -1.0, np.float32)
        I = np.full((len(xq), 2), -1, np.int64)
        I[0], D[0] = [7, 9], [0.8, 0.7]                 # row 0: two experts; row 2: one; others: none
        I[2, 0], D[2, 0] = 9, 0.9
        return D, I

    return make_route_step(router, lambda ids: {i: experts[i] for i in ids}, 0.1)


@pytest.mark.parametrize("max_new", [1, 3, 8])
def test_confirms_what_greedy_decoding_gives_under_routing(tiny_base, fusion, encoder, max_new):
    step = _step(fusion)
    gens = generate(tiny_base, fusion, encoder, CHATS, params=GenerationParams(max_new_tokens=max_new),
                    route_step=step)
    got = confirm_greedy(tiny_base, fusion, encoder, CHATS,
                         [expected_output(g.token_ids, max_new) for g in gens], step)
    for g, c in zip(gens, got):
        assert c is not None, "a greedy output is confirmed against itself"
        assert c.token_ids == g.token_ids and c.text == g.text and c.finish_reason == g.finish_reason
        assert c.expert_ids == g.expert_ids and c.gates == pytest.approx(g.gates)
        np.testing.assert_allclose(c.query, g.query, atol=1e-5)
    assert got[0].expert_ids == [7, 9] and got[1].expert_ids == []


def test_refutes_a_changed_token_a_missing_stop_and_another_routing(tiny_base, fusion, encoder):
    step = _step(fusion)
    gens = generate(tiny_base, fusion, encoder, CHATS, params=GenerationParams(max_new_tokens=8),
                    route_step=step)
    exp = [expected_output(g.token_ids, 8) for g in gens]
    wrong = list(exp)
    ids = list(exp[0].token_ids)
    ids[-1] = (ids[-1] + 1) % len(tiny_base.tokenizer)              # the last token changed
    wrong[0] = Expected(tuple(ids), exp[0].stops)
    wrong[1] = Expected(exp[1].token_ids[:-1], stops=True) if len(exp[1].token_ids) > 1 else exp[1]
    got = confirm_greedy(tiny_base, fusion, encoder, CHATS, wrong, step)
    assert got[0] is None
    if len(exp[1].token_ids) > 1:
        assert got[1] is None, "a shortened output that claims to stop is refuted"
    assert got[2] is not None and got[3] is not None
    # without the route step, row 0 (two experts) is the base model: its routed output is refuted
    plain = confirm_greedy(tiny_base, fusion, encoder, CHATS, exp, None)
    base_gens = generate(tiny_base, fusion, encoder, CHATS, params=GenerationParams(max_new_tokens=8))
    assert (plain[0] is None) == (base_gens[0].token_ids != gens[0].token_ids)


def test_expected_answer_is_the_trained_target_tokens(tiny_base):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    e = expected_answer(tiny_base, msgs, "Paris is the capital.", max_new_tokens=64)
    assert e.stops and tiny_base.tokenizer.decode(list(e.token_ids)).strip() == "Paris is the capital."
    short = expected_answer(tiny_base, msgs, "Paris is the capital.", max_new_tokens=2)
    assert not short.stops and short.token_ids == e.token_ids[:2]


def test_inputs_validated(tiny_base, fusion, encoder):
    with pytest.raises(ValueError, match="must stop"):
        Expected((), stops=False)
    with pytest.raises(ValueError, match="2 chats but 1 expected"):
        confirm_greedy(tiny_base, fusion, encoder, CHATS[:2], [Expected((1,), True)], None)
    assert confirm_greedy(tiny_base, fusion, encoder, [], [], None) == []


@pytest.mark.slow
def test_smollm2_confirms_its_own_greedy_outputs_with_an_expert(smollm2_base):
    """On the real model (rounding of a full forward vs cached decoding): decoded outputs are confirmed,
    an expert's output is refuted without it, and the trained target form is confirmed when it is said."""
    base = smollm2_base
    fusion = ExpertFusion(base.model, ExpertConfig(rank=4, alpha=8.0), query_layer=base.query_layer)
    try:
        expert = LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=512.0, dtype="float16", seed=3)

        def step_for(ids):
            def router(xq):
                D = np.full((len(xq), 1), -1.0, np.float32)
                I = np.full((len(xq), 1), -1, np.int64)
                for b in ids:
                    D[b, 0], I[b, 0] = 0.9, 0
                return D, I
            return make_route_step(router, lambda got: {0: expert}, 0.1)

        from srmoa_dist.routing.query_encoder import CALIBRATION_PROMPTS

        enc = QueryEncoder.calibrate(base, d_key=16, prompts=CALIBRATION_PROMPTS[:32])
        chats = CHATS + [[{"role": "user", "content": "How many legs does a spider have?"}]]
        step = step_for([0, 2])
        params = GenerationParams(max_new_tokens=24)
        gens = generate(base, fusion, None, chats, params=params)
        routed = generate(base, fusion, enc, chats, params=params, route_step=step)
        exp = [expected_output(g.token_ids, 24) for g in routed]
        got = confirm_greedy(base, fusion, enc, chats, exp, step)
        assert all(g is not None and g.token_ids == r.token_ids for g, r in zip(got, routed))
        assert routed[0].token_ids != gens[0].token_ids           # the strong expert changes row 0
        plain = confirm_greedy(base, fusion, enc, chats, exp, None)
        assert plain[0] is None and plain[1] is not None and plain[3] is not None
        said = gens[4].text
        e = expected_answer(base, chats[4], said, 24)
        [c] = confirm_greedy(base, None, None, chats[4:], [e], None)
        assert c is not None and c.text == said
    finally:
        fusion.remove()

