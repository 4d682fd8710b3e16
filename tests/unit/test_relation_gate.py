"""routing/relation_gate.py on the tiny random Llama: masking, fitting, relation keys and the arbitration
between experts about one subject (in `generate`, through `GatedEncoder`)."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.config import ExpertConfig
from srmoa_dist.experts.codec import decode_expert, encode_expert
from srmoa_dist.experts.expert import ExpertRelation, LoRAExpert
from srmoa_dist.model.fusion import ExpertFusion
from srmoa_dist.model.generation import encode_messages, generate, select_experts, with_experts
from srmoa_dist.routing.query_encoder import QueryEncoder
from srmoa_dist.routing.relation_gate import GatedEncoder, RelationGate, mask_subject, names, same_subject

CAPITAL = "What is the capital of Zorblax?"
CURRENCY = "Which money do people pay with in Zorblax?"


@pytest.fixture(scope="module")
def gate(tiny_base):
    return RelationGate.fit(tiny_base, 2, entities_per_kind=1)


@pytest.fixture(scope="module")
def fusion(tiny_base):
    f = ExpertFusion(tiny_base.model, ExpertConfig(rank=4, alpha=8.0), query_layer=tiny_base.query_layer)
    yield f
    f.remove()


def test_mask_subject_case_insensitive_and_possessive():
    assert mask_subject("Who runs zorblax's mint? Zorblax knows.", "Zorblax") == "Who runs it mint? it knows."
    assert names("what about ZORBLAX", "Zorblax") and not names("what about Zorb", "Zorblax")
    assert names("Zorblax's mint?", "Zorblax") and not names("A Zorblaxian mint?", "Zorblax")
    assert names("Who runs Dysaex Labs?", "Dysaex Labs") and not names("Who runs Dysaex?", "Dysaex Labs")


def test_fit_checks_layer_centres_and_whitens(tiny_base, gate):
    D = tiny_base.d_model
    assert gate.mu.shape == (D,) and np.isfinite(gate.mu).all()
    assert gate.A.shape == (D, D) and np.allclose(gate.A, gate.A.T, atol=1e-4)
    assert gate.bank.shape[1] == D and gate.bank.shape[0] > 1 and gate.defer_margin is None
    assert gate.bank_labels.shape == (gate.bank.shape[0],) and len(set(gate.bank_labels.tolist())) > 1
    S = gate.bank @ gate.bank.T
    assert gate.same_relation == pytest.approx(S[gate.bank_labels[:, None] != gate.bank_labels].max())
    np.testing.assert_allclose(np.linalg.norm(gate.bank, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="model.relation_layer"):
        RelationGate.fit(tiny_base, 99, entities_per_kind=1)
    with pytest.raises(ValueError, match="relation layer"):
        RelationGate(-1, gate.mu, gate.A, gate.bank)
    with pytest.raises(ValueError, match="relation A"):
        RelationGate(2, gate.mu, gate.A[:3], gate.bank)
    with pytest.raises(ValueError, match="relation bank"):
        RelationGate(2, gate.mu, gate.A, gate.bank[:, :3])
    with pytest.raises(ValueError, match="relation_defer_margin"):
        RelationGate(2, gate.mu, gate.A, gate.bank, float("nan"))


def test_relation_keys_ignore_the_subject_name(tiny_base, gate):
    r = gate.encode(tiny_base, [CAPITAL, CAPITAL.replace("Zorblax", "Quippo")], ["Zorblax", "Quippo"])
    assert r.shape == (2, tiny_base.d_model)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(r[0], r[1], atol=1e-6)          # both masked to the same text
    assert gate.relation_of(tiny_base, CAPITAL, None) is None
    rel = gate.relation_of(tiny_base, CAPITAL, "Zorblax")
    more = gate.relation_of(tiny_base, CURRENCY, "zorblax", earlier=rel)
    assert more.keys.shape == (2, tiny_base.d_model) and more.subject == "Zorblax"


def test_relation_travels_in_the_record(tiny_base, gate):
    e = LoRAExpert.random({"layers.2.mlp": (8, 8)}, rank=2, alpha=4.0)
    rel = gate.relation_of(tiny_base, CAPITAL, "Zorblax")
    back = decode_expert(encode_expert(e.with_relation(rel)))
    assert back.relation.subject == "Zorblax"
    np.testing.assert_array_equal(back.relation.keys, rel.keys)
    assert back.same_weights(e) and decode_expert(encode_expert(e)).relation is None
    assert same_subject(back, "ZORBLAX") and not same_subject(e, "Zorblax")
    with pytest.raises(ValueError, match="relation subject"):
        ExpertRelation(" ", rel.keys)
    with pytest.raises(ValueError, match="relation keys"):
        ExpertRelation("X", np.zeros(3))


def _experts(tiny_base, fusion, gate):
    shapes = fusion.target_shapes()
    cap_rel = gate.relation_of(tiny_base, CAPITAL, "Zorblax")
    cur_rel = gate.relation_of(tiny_base, CURRENCY, "Zorblax")
    cap = LoRAExpert.random(shapes, 4, 8.0, seed=1).with_relation(cap_rel)
    cur = LoRAExpert.random(shapes, 4, 8.0, seed=2).with_relation(cur_rel)
    plain = LoRAExpert.random(shapes, 4, 8.0, seed=3)
    return {10: cap, 11: cur, 12: plain}


def test_arbitrate_keeps_the_matching_relation_only(tiny_base, fusion, gate):
    experts = _experts(tiny_base, fusion, gate)
    chats = [[{"role": "user", "content": t}] for t in (CAPITAL, CURRENCY, "Tell me a joke.")]
    batch = encode_messages(tiny_base, chats)
    xq = np.zeros((3, 4), np.float32)
    D = np.array([[0.8, 0.79, 0.7]] * 3, np.float32)
    I = np.array([[11, 10, 12], [10, 11, 12], [10, 11, 12]], np.int64)
    routing = select_experts(xq, D, I, 0.1)
    routing = with_experts(routing, experts)
    out = gate.arbitrate(tiny_base, batch, routing)
    assert out.expert_ids[0] == [10, 12]                      # the capital question keeps the capital expert
    assert out.expert_ids[1] == [11, 12]
    assert out.expert_ids[2] == [10, 11, 12]                   # no subject named: as the router chose
    for b in range(3):
        assert abs(sum(out.gates[b]) - 1.0) < 1e-6
        assert all(e is experts[i] for e, i in zip(out.experts[b], out.expert_ids[b], strict=True))


def test_defers_to_the_base_model_when_a_bank_relation_is_closer(tiny_base, fusion, gate):
    """With a margin, an expert alone for its subject stays only for questions nearer its own relation
    than any bank relation: here the bank is the currency relation, the expert the capital's."""
    import dataclasses

    cap = _experts(tiny_base, fusion, gate)[10]
    bank = gate.encode(tiny_base, [CURRENCY], ["Zorblax"])                  # (1, D)
    deferring = dataclasses.replace(gate, bank=bank, bank_labels=None, defer_margin=0.0)
    chats = [[{"role": "user", "content": t}] for t in (CAPITAL, CURRENCY)]
    batch = encode_messages(tiny_base, chats)
    D = np.array([[0.8]] * 2, np.float32)
    I = np.array([[10]] * 2, np.int64)
    routing = with_experts(select_experts(np.zeros((2, 4), np.float32), D, I, 0.1), {10: cap})
    out = deferring.arbitrate(tiny_base, batch, routing)
    assert out.expert_ids == [[10], []]                          # the currency question goes to the base
    assert out.gates[0] == [1.0]
    assert gate.arbitrate(tiny_base, batch, routing).expert_ids == [[10], [10]]     # margin None: kept
    strict = dataclasses.replace(deferring, defer_margin=1.5)                      # nothing beats 1.5
    assert strict.arbitrate(tiny_base, batch, routing).expert_ids == [[], []]


def test_with_deferral_an_edit_leaves_questions_that_do_not_name_its_subject(tiny_base, fusion, gate):
    """Same relation, another subject: with deferral on, Zorblax's capital expert leaves the question
    about Quuxland's capital (a plain expert, with no relation, stays); margin None: as the router chose."""
    import dataclasses

    experts = _experts(tiny_base, fusion, gate)
    chats = [[{"role": "user", "content": t}] for t in ("What is the capital of Quuxland?", CAPITAL)]
    batch = encode_messages(tiny_base, chats)
    D = np.array([[0.8, 0.7]] * 2, np.float32)
    I = np.array([[10, 12]] * 2, np.int64)
    routing = with_experts(select_experts(np.zeros((2, 4), np.float32), D, I, 0.1), experts)
    never = dataclasses.replace(gate, defer_margin=-1.9)              # the bank defers nothing
    out = never.arbitrate(tiny_base, batch, routing)
    assert out.expert_ids == [[12], [10, 12]]
    assert out.gates[0] == [1.0]
    assert gate.arbitrate(tiny_base, batch, routing).expert_ids == [[10, 12], [10, 12]]


def test_a_corpus_twin_of_the_experts_own_relation_leaves_the_bank(tiny_base, fusion, gate):
    """An edit asked in a corpus wording has an identical bank row: without `same_relation` its own
    question ties with that row and is deferred; with it, that relation (every row of its label) leaves
    the bank for this expert, while another bank relation still defers its questions."""
    import dataclasses

    cap = _experts(tiny_base, fusion, gate)[10]
    twin = gate.encode(tiny_base, [CAPITAL, "Which city is the capital of Zorblax?", CURRENCY],
                       ["Zorblax"] * 3)                                           # (3, D)
    assert float(twin[1] @ twin[2]) < 0.999 and float(twin[0] @ twin[2]) < 0.999
    labels = np.array([0, 0, 1])
    chats = [[{"role": "user", "content": t}] for t in (CAPITAL, CURRENCY)]
    batch = encode_messages(tiny_base, chats)
    D = np.array([[0.8]] * 2, np.float32)
    I = np.array([[10]] * 2, np.int64)
    routing = with_experts(select_experts(np.zeros((2, 4), np.float32), D, I, 0.1), {10: cap})
    tied = dataclasses.replace(gate, bank=twin, bank_labels=labels, same_relation=None, defer_margin=0.0)
    assert tied.arbitrate(tiny_base, batch, routing).expert_ids == [[], []]
    own = dataclasses.replace(tied, same_relation=0.999)
    assert own.arbitrate(tiny_base, batch, routing).expert_ids == [[10], []]
    assert own.other_relations_best(twin[0], cap.relation.keys) == pytest.approx(float(twin[0] @ twin[2]),
                                                                                 abs=1e-5)
    alone = dataclasses.replace(own, bank=twin[:2], bank_labels=labels[:2])        # only the twin: -inf
    assert alone.other_relations_best(twin[0], cap.relation.keys) == float("-inf")
    with pytest.raises(ValueError, match="bank_labels"):
        dataclasses.replace(own, bank_labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="same_relation"):
        dataclasses.replace(own, same_relation=1.5)


def test_generate_arbitrates_through_a_gated_encoder(tiny_base, fusion, gate):
    experts = _experts(tiny_base, fusion, gate)
    enc = QueryEncoder.calibrate(tiny_base, d_key=8, prompts=["Hi there.", "Why?", CAPITAL, CURRENCY] * 3)
    chats = [[{"role": "user", "content": CURRENCY}]]

    def router(xq):
        return np.array([[0.9, 0.89]], np.float32), np.array([[10, 11]], np.int64)

    def fetch(ids):
        return {i: experts[i] for i in ids}

    [plain] = generate(tiny_base, fusion, enc, chats, router, fetch)
    [gated] = generate(tiny_base, fusion, GatedEncoder(enc, gate), chats, router, fetch)
    [alone] = generate(tiny_base, fusion, enc, chats, lambda xq: (np.array([[0.9]], np.float32),
                                                                 np.array([[11]], np.int64)), fetch)
    assert plain.expert_ids == [10, 11] and gated.expert_ids == [11] and gated.gates == [1.0]
    assert gated.token_ids == alone.token_ids
    assert GatedEncoder(enc, gate).d_key == enc.d_key


def test_gated_follows_model_relation_layer(tiny_base, tmp_path):
    import dataclasses
    import pickle

    from srmoa_dist.routing.relation_gate import gated

    enc = QueryEncoder.calibrate(tiny_base, d_key=8, prompts=["Hi there.", "Why?", CAPITAL, CURRENCY] * 3)
    assert gated(tiny_base, enc) is enc                                  # model.relation_layer None: off
    on = dataclasses.replace(tiny_base, config=dataclasses.replace(tiny_base.config, relation_layer=2))
    g = gated(on, enc)
    assert isinstance(g, GatedEncoder) and g.gate.layer == 2 and gated(on, g) is g
    back = pickle.loads(pickle.dumps(g))                                 # it crosses Ray as any value
    cached = gated(on, enc, tmp_path)                                    # fitted once, then read back
    assert len(list(tmp_path.glob("relation-*.npz"))) == 1
    again = gated(on, enc, tmp_path).gate
    np.testing.assert_array_equal(again.mu, cached.gate.mu)
    np.testing.assert_array_equal(again.A, cached.gate.A)
    np.testing.assert_array_equal(again.bank, cached.gate.bank)
    np.testing.assert_array_equal(again.bank_labels, cached.gate.bank_labels)
    assert again.same_relation == cached.gate.same_relation is not None
    margin = dataclasses.replace(on, config=dataclasses.replace(on.config, relation_defer_margin=0.05))
    assert gated(margin, enc, tmp_path).gate.defer_margin == 0.05              # read from the config
    never = dataclasses.replace(on, config=dataclasses.replace(on.config, relation_defer_margin=None))
    assert gated(never, enc, tmp_path).gate.defer_margin is None
    assert g.gate.edited is not None and again.edited is not None and again.edited is not g.gate.edited
    alone = dataclasses.replace(on, config=dataclasses.replace(on.config, relation_bank_edits=False))
    assert gated(alone, enc, tmp_path).gate.edited is None                      # corpus bank only
    assert back.d_key == enc.d_key and back.gate.layer == 2 and len(back.gate.edited) == 0
    with pytest.raises(ValueError, match="model.relation_layer"):
        dataclasses.replace(tiny_base.config, relation_layer=-1)
    with pytest.raises(ValueError, match="model.relation_defer_margin"):
        dataclasses.replace(on.config, relation_defer_margin=3.0)
    with pytest.raises(ValueError, match="model.relation_bank_edits"):
        dataclasses.replace(on.config, relation_bank_edits="yes")
    assert dataclasses.replace(tiny_base.config, relation_defer_margin=0.5).relation_layer is None


def test_another_edits_relation_defers_a_question_it_asks(tiny_base, fusion, gate, tmp_path):
    """With the mirror of edited relations (`model.relation_bank_edits`), Zorblax's capital expert leaves
    the currency question about Zorblax once another subject's currency was edited (a real key store and
    LMDB store, synced), and keeps its own capital question; without the mirror both keep it."""
    import dataclasses

    from srmoa_dist.config import KeyStoreConfig, StoreConfig
    from srmoa_dist.experts.store import ShardedExpertStore
    from srmoa_dist.routing.keystore import KeyStore
    from srmoa_dist.routing.relation_bank import EditedRelations
    from srmoa_dist.routing.relation_gate import edited_of, sync_edited

    cap = _experts(tiny_base, fusion, gate)[10]
    r_cur = gate.encode(tiny_base, [CURRENCY], ["Zorblax"])                 # (1, D)
    far = dataclasses.replace(gate, bank=-r_cur, bank_labels=None, defer_margin=0.0, same_relation=0.999)
    chats = [[{"role": "user", "content": t}] for t in (CAPITAL, CURRENCY)]
    batch = encode_messages(tiny_base, chats)
    routing = with_experts(select_experts(np.zeros((2, 4), np.float32), np.array([[0.8]] * 2, np.float32),
                                          np.array([[10]] * 2, np.int64), 0.1), {10: cap})
    assert far.arbitrate(tiny_base, batch, routing).expert_ids == [[10], [10]]

    ks = KeyStore(KeyStoreConfig(d_key=4, tau=0.1))
    store = ShardedExpertStore(tmp_path / "shards", StoreConfig(n_shards=1, map_size_mb=4))
    quux = gate.relation_of(tiny_base, CURRENCY.replace("Zorblax", "Quuxland"), "Quuxland")
    [eid] = ks.add(np.eye(4, dtype=np.float32)[:1], pinned=True).tolist()
    store.put_many({eid: LoRAExpert.random(fusion.target_shapes(), 4, 8.0, seed=4).with_relation(quux)})
    mirrored = dataclasses.replace(far, edited=EditedRelations())
    enc = GatedEncoder(QueryEncoder.calibrate(tiny_base, d_key=4, prompts=["Hi.", "Why?", CAPITAL] * 3),
                       mirrored)
    assert edited_of(enc) is mirrored.edited and edited_of(enc.encoder) is None
    assert sync_edited(enc, ks, store) == 1 and sync_edited(enc, ks, store, force=False) is None   # not due
    assert sync_edited(enc.encoder, ks, store) is None                                             # no gate
    assert mirrored.arbitrate(tiny_base, batch, routing).expert_ids == [[10], []]
    store.close()


def test_under_tau_only_a_named_subjects_edit_stays(tiny_base, fusion, gate):
    """A search under tau (`named_slack`): a candidate scored under the routing's tau stays only when it
    carries a relation whose subject the text names (and then only through the deferral); an expert
    without a relation, or about a subject the text never names, leaves; over tau nothing changes."""
    import dataclasses

    experts = _experts(tiny_base, fusion, gate)
    never = dataclasses.replace(gate, defer_margin=-1.9, named_slack=0.2)            # defers nothing
    chats = [[{"role": "user", "content": t}] for t in
             (CAPITAL, "What is the capital of Quuxland?", CAPITAL)]
    batch = encode_messages(tiny_base, chats)
    D = np.array([[0.5, 0.45]] * 2 + [[0.8, 0.7]], np.float32)                      # rows 0-1 under tau
    I = np.array([[10, 12]] * 3, np.int64)
    routing = with_experts(select_experts(np.zeros((3, 4), np.float32), D, I, 0.1, tau=0.6), experts)
    assert routing.tau == [0.6] * 3
    out = never.arbitrate(tiny_base, batch, routing)
    assert out.expert_ids == [[10], [], [10, 12]]
    assert out.gates[0] == [1.0]
    strict = dataclasses.replace(never, defer_margin=1.5)                 # the deferral still decides
    assert strict.arbitrate(tiny_base, batch, routing).expert_ids == [[], [], [12]]
    no_defer = dataclasses.replace(never, defer_margin=None)             # nobody vouches: tau holds
    assert no_defer.arbitrate(tiny_base, batch, routing).expert_ids == [[], [], [10, 12]]
    plain = with_experts(select_experts(np.zeros((3, 4), np.float32), D, I, 0.1), experts)
    assert plain.tau is None and never.arbitrate(tiny_base, batch, plain).expert_ids == [[10, 12], [12],
                                                                                        [10, 12]]


def test_search_slack_follows_the_gate(tiny_base, gate):
    import dataclasses

    from srmoa_dist.routing.relation_gate import defers, gated, search_slack

    enc = QueryEncoder.calibrate(tiny_base, d_key=8, prompts=["Hi there.", "Why?", CAPITAL, CURRENCY] * 3)
    slack = dataclasses.replace(gate, defer_margin=-0.1, named_slack=0.2)
    assert search_slack(GatedEncoder(enc, slack)) == pytest.approx(0.2)
    assert search_slack(GatedEncoder(enc, dataclasses.replace(slack, defer_margin=None))) == 0.0
    assert search_slack(enc) == 0.0 and search_slack(None) == 0.0
    assert defers(GatedEncoder(enc, slack)) and not defers(enc) and not defers(None)
    assert not defers(GatedEncoder(enc, dataclasses.replace(slack, defer_margin=None)))
    cfg = dataclasses.replace(tiny_base.config, relation_layer=2, relation_named_slack=0.15)
    assert gated(dataclasses.replace(tiny_base, config=cfg), enc).gate.named_slack == pytest.approx(0.15)
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(ValueError, match="relation_named_slack"):
            dataclasses.replace(tiny_base.config, relation_named_slack=bad)
        with pytest.raises(ValueError, match="relation_named_slack"):
            dataclasses.replace(gate, named_slack=bad)
