"""Routed generation on a tiny random Llama (and a couple of slow checks on SmolLM2)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.model.generation import (
    Generation,
    GenerationParams,
    encode_messages,
    generate,
    generate_stream,
    prefill_lower,
    prefill_upper,
    queries,
    route,
    routed_logits,
    select_experts,
)
from srmoa_dist.routing.query_encoder import QueryEncoder

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me a joke"}],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module")
def encoder(tiny_base):
    return QueryEncoder.calibrate(
        tiny_base, d_key=16, prompts=[c[-1]["content"] for c in CHATS] * 4 + ["Why?"]
    )


def _router_for(table: dict[int, tuple[list[int], list[float]]], k: int = 2):
    """A router that returns, for batch row b, the ids/scores of table[b] (-1 padded)."""

    def router(xq):
        D = np.full((len(xq), k), -1.0, np.float32)
        I = np.full((len(xq), k), -1, np.int64)
        for b, (ids, scores) in table.items():
            I[b, : len(ids)], D[b, : len(ids)] = ids, scores
        return D, I

    return router


def test_two_stage_prefill_equals_one_forward(tiny_base):
    batch = encode_messages(tiny_base, CHATS)
    with torch.no_grad():
        ref = tiny_base.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        lower = prefill_lower(tiny_base, batch.input_ids, batch.attention_mask)
        out = prefill_upper(tiny_base, lower)
    m = batch.attention_mask.bool()
    torch.testing.assert_close(out[m], ref[m], atol=1e-5, rtol=1e-5)
    assert lower.cache.get_seq_length() == batch.input_ids.shape[1]


def test_greedy_equals_hf_generate(tiny_base):
    batch = encode_messages(tiny_base, CHATS)
    n = 8
    with torch.no_grad():
        hf = tiny_base.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tiny_base.tokenizer.pad_token_id,
        )
    gens = generate(tiny_base, None, None, CHATS, params=GenerationParams(max_new_tokens=n))
    eos = tiny_base.tokenizer.eos_token_id
    for b, g in enumerate(gens):
        ref = hf[b, batch.input_ids.shape[1] :].tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert g.token_ids == ref
        assert g.finish_reason == ("stop" if len(ref) < n else "length")
        assert g.prompt_tokens == batch.lengths[b] and g.expert_ids == [] and g.query.shape == (0,)


def test_routed_generation_mixed_batch(tiny_base, fusion, encoder):
    experts = {
        7: LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=64.0, dtype="float16", seed=7),
        9: LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=64.0, dtype="float16", seed=9),
    }
    fetched = []

    def fetch(ids):
        fetched.append(list(ids))
        return {i: experts[i] for i in ids}

    router = _router_for({0: ([7, 9], [0.8, 0.7]), 2: ([9, -1], [0.9, 0.1])})   # -1: deferred by the store
    params = GenerationParams(max_new_tokens=6)
    base_gens = generate(tiny_base, fusion, encoder, CHATS, params=params)
    gens = generate(tiny_base, fusion, encoder, CHATS, router, fetch, params)
    assert fetched == [[7, 9]]
    assert gens[0].expert_ids == [7, 9] and gens[0].scores == pytest.approx([0.8, 0.7])
    assert sum(gens[0].gates) == pytest.approx(1.0) and gens[0].gates[0] > gens[0].gates[1]
    assert gens[1].expert_ids == [] and gens[1].token_ids == base_gens[1].token_ids
    assert gens[2].expert_ids == [9] and gens[2].gates == [1.0]  # the deferred slot is dropped
    assert gens[0].token_ids != base_gens[0].token_ids
    for g in gens:
        assert g.query.shape == (16,) and np.linalg.norm(g.query) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(np.stack([g.query for g in gens]), queries(tiny_base, encoder, CHATS))


def test_expert_missing_from_the_store_is_skipped_not_fatal(tiny_base, fusion, encoder):
    """An expert deleted between search and fetch (a rollback) is left out: the other expert of the
    row takes the whole gate, a row left with none gets the base model's tokens, both say so."""
    seven = LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=64.0, dtype="float16", seed=7)

    def fetch(ids):
        return {i: seven for i in ids if i == 7}                 # 9 is gone

    params = GenerationParams(max_new_tokens=6)
    base_gens = generate(tiny_base, fusion, encoder, CHATS, params=params)
    only7 = generate(tiny_base, fusion, encoder, CHATS, _router_for({0: ([7], [0.8])}), fetch, params)
    gens = generate(tiny_base, fusion, encoder, CHATS,
                    _router_for({0: ([9, 7], [0.9, 0.8]), 2: ([9], [0.9])}), fetch, params)
    assert gens[0].expert_ids == [7] and gens[0].gates == [1.0] and gens[0].scores == pytest.approx([0.8])
    assert gens[0].skipped == [9] and gens[0].token_ids == only7[0].token_ids
    assert gens[0].token_ids != base_gens[0].token_ids
    assert gens[2].expert_ids == [] and gens[2].gates == [] and gens[2].skipped == [9]
    assert gens[2].token_ids == base_gens[2].token_ids
    assert gens[1].skipped == [] and gens[1].token_ids == base_gens[1].token_ids
    streamed = list(generate_stream(tiny_base, fusion, encoder, CHATS[2], _router_for({0: ([9], [0.9])}),
                                    fetch, params))
    assert streamed[-1].skipped == [9] and streamed[-1].token_ids == base_gens[2].token_ids


def test_route_deferral_and_gates():
    xq = np.zeros((3, 4), np.float32)
    D = np.array([[0.9, 0.5, 0.2], [0.3, 0.2, 0.1], [0.7, 0.7, -1]], np.float32)
    I = np.array([[4, 5, -1], [-1, -1, -1], [9, 8, -1]])     # -1: below the store's tau, or no key
    r = route(xq, lambda q: (D, I), GenerationParams(gate_temperature=0.1))
    assert r.expert_ids == [[4, 5], [], [9, 8]] and r.scores[1] == [] and r.gates[1] == []
    g = np.exp(np.array([0.9, 0.5]) / 0.1)
    assert r.gates[0] == pytest.approx(list(g / g.sum()))
    assert r.gates[2] == pytest.approx([0.5, 0.5])
    assert r.gate_tensor().shape == (3, 2)
    r = route(xq, lambda q: (D[:, ::-1], I[:, ::-1]), GenerationParams(gate_temperature=0.1))
    assert r.expert_ids == [[4, 5], [], [8, 9]]                # best first; equal scores: the router's order
    assert route(xq, None, GenerationParams()).expert_ids == [[], [], []]


def test_a_router_that_searched_under_its_tau_marks_those_candidates():
    """A router with a `tau` attribute (`ttt.edit.KeyRouter` with a slack) searched under it: the
    routing carries that tau per sequence, and `under_tau` names the candidates scored under it."""
    from srmoa_dist.model.generation import at_or_over_tau, drop_per_row, under_tau

    class Router:
        tau = 0.6

        def __call__(self, q):
            return (np.array([[0.9, 0.5], [0.55, 0.45]], np.float32), np.array([[4, 5], [6, 7]]))

    r = route(np.zeros((2, 4), np.float32), Router(), GenerationParams(gate_temperature=0.1))
    assert r.tau == [0.6, 0.6] and under_tau(r) == [{5}, {6, 7}]
    kept = drop_per_row(r, under_tau(r))
    assert kept.expert_ids == [[4], []] and kept.gates[0] == [1.0]
    assert at_or_over_tau(r).expert_ids == kept.expert_ids and at_or_over_tau(r).gates == kept.gates
    plain = route(np.zeros((2, 4), np.float32), lambda q: Router()(q), GenerationParams())
    assert plain.tau is None and under_tau(plain) == [set(), set()] and at_or_over_tau(plain) is plain
    picked = select_experts(np.zeros((2, 4), np.float32), *Router()(None), 0.1, tau=[0.4, 0.5])
    assert picked.tau == [0.4, 0.5]


def test_sampling_seeded_and_top_p(tiny_base):
    chats = CHATS[:2]
    p = GenerationParams(max_new_tokens=6, temperature=1.5, seed=3)
    a = generate(tiny_base, None, None, chats, params=p)
    b = generate(tiny_base, None, None, chats, params=p)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    greedy = generate(tiny_base, None, None, chats, params=GenerationParams(max_new_tokens=6))
    nucleus = generate(
        tiny_base,
        None,
        None,
        chats,
        params=GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=0),
    )
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]


def test_per_row_params_in_one_batch(tiny_base):
    """Each row samples and stops by its own params, as it would alone; a seeded row gets the same
    tokens whatever batch it is in (its own generator), in one batched forward."""
    alone = [
        GenerationParams(max_new_tokens=6, temperature=1.5, seed=11),
        GenerationParams(max_new_tokens=3),
        GenerationParams(max_new_tokens=8, temperature=0.9, top_p=0.8, seed=5),
    ]
    solo = [generate(tiny_base, None, None, [c], params=p)[0] for c, p in zip(CHATS, alone)]
    mixed = generate(tiny_base, None, None, CHATS, params=alone)
    assert [g.token_ids for g in mixed] == [g.token_ids for g in solo]
    assert [g.completion_tokens for g in mixed] == [g.completion_tokens for g in solo]
    assert [g.finish_reason for g in mixed] == [g.finish_reason for g in solo]
    # the seeded row again, now next to other sampling rows and in another position
    other = [GenerationParams(max_new_tokens=8, temperature=1.0, seed=99), alone[0]]
    again = generate(tiny_base, None, None, [CHATS[2], CHATS[0]], params=other)
    assert again[1].token_ids == solo[0].token_ids
    # greedy rows equal the all-greedy batch
    greedy = generate(tiny_base, None, None, CHATS, params=GenerationParams(max_new_tokens=3))
    assert mixed[1].token_ids == greedy[1].token_ids
    with pytest.raises(ValueError, match="2 GenerationParams for a batch of 3"):
        generate(tiny_base, None, None, CHATS, params=alone[:2])
    with pytest.raises(ValueError, match="system_prompt applies to the whole batch"):
        generate(tiny_base, None, None, CHATS[:2],
                 params=[GenerationParams(system_prompt="a"), GenerationParams(system_prompt="b")])


def test_per_row_stop_and_length(tiny_base):
    """A stop string or a token budget ends its own row only; the others run on."""
    ref = generate(tiny_base, None, None, CHATS, params=GenerationParams(max_new_tokens=10))
    text0 = ref[0].text
    stop = text0[2:4]
    assert len(text0) >= 4 and stop.strip() and text0.find(stop) == 2, text0   # the tiny model's text
    rows = [GenerationParams(max_new_tokens=10, stop=(stop,)), GenerationParams(max_new_tokens=2),
            GenerationParams(max_new_tokens=10)]
    got = generate(tiny_base, None, None, CHATS, params=rows)
    assert got[0].text == text0[: text0.find(stop)] and got[0].finish_reason == "stop"
    assert got[1].token_ids == ref[1].token_ids[:2]
    assert got[2].token_ids == ref[2].token_ids and got[2].finish_reason == ref[2].finish_reason


def test_encoded_chats_and_route_step(tiny_base, fusion, encoder):
    """A ChatBatch encoded once gives the same generation as its messages; a route step handed down
    (xq -> BatchRouting, experts fetched) routes like a router and a fetch, and says when it degraded."""
    from srmoa_dist.model.chat import encode_one, pad, with_system
    from srmoa_dist.model.generation import fetch_experts, no_routing, select_experts

    seven = LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=64.0, dtype="float16", seed=7)
    router = _router_for({1: ([7], [0.9])})
    fetch = lambda ids: {7: seven}                              # noqa: E731
    params = GenerationParams(max_new_tokens=5)
    ref = generate(tiny_base, fusion, encoder, CHATS, router, fetch, params)
    rows = [encode_one(tiny_base.tokenizer, with_system(c, tiny_base.system_prompt)) for c in CHATS]
    batch = pad(tiny_base.tokenizer, rows, tiny_base.device)
    seen = []

    def step(xq):
        seen.append(xq.shape)
        return fetch_experts(select_experts(xq, *router(xq), params.gate_temperature), fetch)

    got = generate(tiny_base, fusion, encoder, batch, params=params, route_step=step)
    assert seen == [(3, 16)]
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]
    assert [g.expert_ids for g in got] == [[], [7], []]
    assert [g.prompt_tokens for g in got] == list(batch.lengths)
    down = generate(tiny_base, fusion, encoder, batch, params=params,
                    route_step=lambda xq: no_routing(xq, "the key store did not answer"))
    assert all(g.degraded == "the key store did not answer" and g.expert_ids == [] for g in down)
    assert down[1].token_ids == generate(tiny_base, None, None, CHATS, params=params)[1].token_ids
    with pytest.raises(ValueError, match="not both"):
        generate(tiny_base, fusion, encoder, batch, router, fetch, params, route_step=step)


def test_stream_deltas_add_up(tiny_base):
    params = GenerationParams(max_new_tokens=8)
    items = list(generate_stream(tiny_base, None, None, CHATS[0], params=params))
    final = items[-1]
    assert isinstance(final, Generation) and all(isinstance(x, str) for x in items[:-1])
    assert "".join(items[:-1]) == final.text
    assert final.text == generate(tiny_base, None, None, CHATS[:1], params=params)[0].text


def test_routed_logits_under_routing(tiny_base, fusion):
    batch = encode_messages(tiny_base, CHATS)
    e = LoRAExpert.random(fusion.target_shapes(), rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        plain = routed_logits(tiny_base, fusion, batch.input_ids, batch.attention_mask)
        routed = routed_logits(tiny_base, fusion, batch.input_ids, batch.attention_mask, [[], [e], []])
    assert torch.equal(plain[0], routed[0]) and torch.equal(plain[2], routed[2])
    assert not torch.allclose(plain[1], routed[1], atol=1e-3)


def test_generation_params_validated():
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(temperature=-1)


@pytest.mark.slow
def test_smollm2_chat_generation(smollm2_base):
    t0 = time.perf_counter()
    g = generate(
        smollm2_base,
        None,
        None,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        params=GenerationParams(max_new_tokens=24),
    )[0]
    assert "Paris" in g.text, g.text
    assert g.finish_reason == "stop" and g.completion_tokens <= 24
    assert time.perf_counter() - t0 < 60
