"""QueryEncoder: user-token pooling, whitening, persistence, tau calibration."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from srmoa_dist.model.generation import encode_messages, prefill_lower, queries
from srmoa_dist.routing.query_encoder import (
    CALIBRATION_PROMPTS,
    QueryEncoder,
    calibrate_tau,
    ledoit_wolf_shrinkage,
    orthogonal_projection,
)

PROMPTS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Tell me a joke about cats.",
    "How do I boil an egg?",
    "The quick brown fox",
    "Answer briefly: 0123?",
    "Are dogs lazy?",
    "What is the capital of the fox?",
]


@pytest.fixture(scope="module")
def encoder(tiny_base):
    return QueryEncoder.calibrate(tiny_base, d_key=32, prompts=PROMPTS, seed=5, batch_size=3)


@pytest.fixture(scope="module")
def discriminant_encoder(tiny_base):
    """With the discriminant, fitted on a small corpus (2 entities per kind)."""
    return QueryEncoder.calibrate(tiny_base, d_key=32, prompts=PROMPTS, seed=5, batch_size=32,
                                  discriminant_weight=0.5, corpus_entities=2)


def test_calibration_set_is_generic_and_large():
    assert len(CALIBRATION_PROMPTS) >= 100 and len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS)


def test_user_mask_is_exactly_the_user_content(tiny_base):
    chats = [
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Tell me a joke"},
        ],
    ]
    batch = encode_messages(tiny_base, chats)
    tok = tiny_base.tokenizer
    for b, want in enumerate(["Why is the sky blue?", "Tell me a joke"]):
        assert tok.decode(batch.input_ids[b][batch.user_mask[b]]) == want
    assert not batch.user_mask[batch.attention_mask == 0].any()


def test_pooling_ignores_every_other_token(tiny_base, encoder):
    """Changing the hidden states of the system prompt / template tokens does not change q (exactly)."""
    batch = encode_messages(tiny_base, [[{"role": "user", "content": "Why is the sky blue?"}]])
    with torch.no_grad():
        h = prefill_lower(tiny_base, batch.input_ids, batch.attention_mask).hidden
    q = encoder.encode_hidden(h, batch.user_mask)
    h2 = h.clone()
    h2[~batch.user_mask] = torch.randn_like(h2[~batch.user_mask]) * 10
    np.testing.assert_array_equal(encoder.encode_hidden(h2, batch.user_mask), q)
    h3 = h.clone()
    h3[batch.user_mask] += 1.0
    assert not np.allclose(encoder.encode_hidden(h3, batch.user_mask), q)


def test_system_prompt_tokens_not_pooled(tiny_base, encoder):
    """Another system prompt moves q only through attention context, far less than another question."""
    q = queries(
        tiny_base,
        encoder,
        [[{"role": "user", "content": "Why is the sky blue?"}]] * 2
        + [[{"role": "user", "content": "How do I boil an egg?"}]],
    )
    q_sys = queries(
        tiny_base,
        encoder,
        [[{"role": "user", "content": "Why is the sky blue?"}]],
        system_prompt="You are a pirate. Answer briefly.",
    )
    np.testing.assert_array_equal(q[0], q[1])
    assert float(q[0] @ q_sys[0]) > float(q[0] @ q[2])


def test_queries_unit_norm_and_whitened(tiny_base, encoder):
    q = queries(tiny_base, encoder, [[{"role": "user", "content": p}] for p in PROMPTS])
    assert q.shape == (len(PROMPTS), 32) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    # centred: the calibration queries do not share one direction
    assert np.linalg.norm(q.mean(0)) < 0.5
    W = encoder.W.astype(np.float64)
    d = min(W.shape)
    np.testing.assert_allclose(W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W, np.eye(d), atol=1e-5)
    np.testing.assert_allclose(encoder.P, encoder.P.T, atol=1e-6)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    batch = encode_messages(tiny_base, chats)
    X = QueryEncoder.pool(prefill_lower(tiny_base, batch.input_ids, batch.attention_mask).hidden,
                          batch.user_mask).numpy().astype(np.float64)
    Z = (X - X.mean(0)) @ encoder.W.astype(np.float64).T
    assert encoder.shrinkage == pytest.approx(ledoit_wolf_shrinkage(Z), rel=1e-4)   # the fitted lambda


def test_projection_seeded():
    np.testing.assert_array_equal(orthogonal_projection(64, 16, 1), orthogonal_projection(64, 16, 1))
    assert not np.allclose(orthogonal_projection(64, 16, 1), orthogonal_projection(64, 16, 2))
    assert orthogonal_projection(16, 64, 0).shape == (64, 16)


def test_fit_whitens_projected_calibration_set():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 24)) * np.linspace(0.1, 5, 24) + 3.0
    enc = QueryEncoder.fit(X, d_key=8, seed=0, shrinkage=0.0)
    Z = (X - enc.mu) @ enc.W.T @ enc.P.T
    np.testing.assert_allclose(np.cov(Z.T), np.eye(8), atol=1e-3)
    # white noise (20 samples in 50 dims): the sample covariance is mostly noise, shrink it hard;
    # a strongly anisotropic set with many samples: keep its structure
    assert 0.8 < ledoit_wolf_shrinkage(rng.standard_normal((20, 50))) <= 1
    assert ledoit_wolf_shrinkage(rng.standard_normal((400, 24)) * np.linspace(0.1, 5, 24)) < 0.2


def test_save_load_identical(tmp_path, tiny_base, discriminant_encoder):
    enc = discriminant_encoder
    p = tmp_path / "enc" / "query_encoder.npz"
    enc.save(p)
    back = QueryEncoder.load(p)
    assert enc.L is not None and back.discriminant_weight == enc.discriminant_weight == 0.5
    for f in ("mu", "W", "P", "L", "mu_d"):
        np.testing.assert_array_equal(getattr(back, f), getattr(enc, f))
    assert (back.query_layer, back.seed, back.model_name, back.calibration_hash) == (
        1,
        5,
        "tiny-random-llama",
        enc.calibration_hash,
    )
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    np.testing.assert_array_equal(queries(tiny_base, back, chats), queries(tiny_base, enc, chats))
    back.check_model(tiny_base)


def facts_and_wordings(rng: np.random.Generator, n_entities: int, n_relations: int, per_fact: int):
    """Pooled stand-ins (n, 48) of questions, label = the fact: a strong entity part (dims 0..15) that
    rewording moves a lot, a weak relation part (dims 16..23) that it moves little, and wording noise
    (dims 24..39) as large as the relation part. Only the ratio of the two tells facts apart."""
    d = np.arange(48)
    ent, rel, wrd = d < 16, (d >= 16) & (d < 24), (d >= 24) & (d < 40)
    E = 3.0 * rng.standard_normal((n_entities, 48)) * ent
    R = 0.7 * rng.standard_normal((n_relations, 48)) * rel
    X, y = [], []
    for e in range(n_entities):
        for r in range(n_relations):
            noise = rng.standard_normal((per_fact, 48)) * (1.2 * ent + 0.1 * rel + 0.7 * wrd + 0.01)
            X.append(E[e] + R[r] + noise)
            y += [e * n_relations + r] * per_fact
    return np.concatenate(X), np.array(y)


def test_discriminant_routes_a_rewording_to_its_own_fact():
    """Same entity, another relation: the whitened block alone confuses them; with the discriminant
    (fitted on other entities) a new wording's nearest key is its own fact's."""
    rng = np.random.default_rng(0)
    generic = rng.standard_normal((200, 48)) * 2.0
    corpus = facts_and_wordings(rng, 60, 4, 4)
    X, y = facts_and_wordings(rng, 10, 4, 6)                       # 40 facts, 6 wordings each
    plain = QueryEncoder.fit(generic, d_key=16, seed=0)
    mixed = QueryEncoder.fit(generic, d_key=16, seed=0, corpus=corpus, discriminant_weight=0.5)
    assert (mixed.d_key, mixed.L.shape, mixed.W.shape) == (16, (8, 48), (8, 48))

    def top1(enc):
        q = enc.encode_pooled(X)
        train, held = np.arange(len(y)) % 6 < 3, np.arange(len(y)) % 6 >= 3
        K = np.stack([q[train & (y == c)].mean(0) for c in range(40)])
        return float(((q[held] @ K.T).argmax(1) == y[held]).mean())

    np.testing.assert_allclose(np.linalg.norm(mixed.encode_pooled(X), axis=1), 1.0, atol=1e-5)
    assert top1(plain) < 0.45 and top1(mixed) > 0.7             # 0.36 and 0.74 with these seeds


def test_discriminant_weight_validated():
    rng = np.random.default_rng(1)
    generic = rng.standard_normal((50, 48))
    corpus = facts_and_wordings(rng, 20, 3, 3)
    with pytest.raises(ValueError, match="discriminant_weight"):
        QueryEncoder.fit(generic, d_key=8, corpus=corpus, discriminant_weight=1.0)
    enc = QueryEncoder.fit(generic, d_key=8, corpus=corpus)
    with pytest.raises(ValueError, match="discriminant_weight"):
        replace(enc, discriminant_weight=0.0)


def test_version_1_file_loads_as_whitening_only(tmp_path, encoder):
    """An encoder saved before the discriminant existed still loads and encodes as it did."""
    plain = QueryEncoder.fit(np.random.default_rng(2).standard_normal((40, encoder.d_model)), d_key=8)
    p = tmp_path / "v1.npz"
    np.savez(p, format_version=np.int64(1), mu=plain.mu, W=plain.W, P=plain.P, query_layer=np.int64(1),
             seed=np.int64(0), shrinkage=np.float64(plain.shrinkage), model_name=np.str_("m"),
             calibration_hash=np.str_(""), tau=np.float64(np.nan))
    back = QueryEncoder.load(p)
    assert back.L is None and back.discriminant_weight == 0.0 and back.d_key == 8
    x = np.random.default_rng(3).standard_normal((4, encoder.d_model)).astype(np.float32)
    np.testing.assert_array_equal(back.encode_pooled(x), plain.encode_pooled(x))


def test_calibrate_tau_rate_and_margin():
    rng = np.random.default_rng(0)
    unrelated = rng.uniform(-0.2, 0.3, 180)
    near_miss = rng.uniform(0.3, 0.6, 20)  # same relation, another entity: the hard negatives
    neg = np.concatenate([unrelated, near_miss])
    pos = rng.uniform(0.7, 0.95, 50)
    tau = calibrate_tau(pos, neg, 0.01)
    assert (neg >= tau).mean() <= 0.01
    assert (pos >= tau).all()
    bar = np.sort(neg.astype(np.float32))[::-1][2]
    assert tau == pytest.approx((bar + pos.astype(np.float32).min()) / 2, abs=1e-6)
    # without positives: just above the highest negative that must fail
    t0 = calibrate_tau([], neg, 0.0)
    assert t0 > neg.max() and np.float32(t0) == np.nextafter(np.float32(neg.max()), np.float32(1))
    with pytest.raises(ValueError):
        calibrate_tau(pos, [], 0.01)


@pytest.mark.slow
def test_smollm2_paraphrase_routes_to_its_key(smollm2_base):
    """Invented facts: keys from 2 phrasings; a held-out paraphrase scores highest on its own key and
    above a near-miss (same relation, a real country)."""
    enc = QueryEncoder.calibrate(smollm2_base, d_key=128)
    facts = [("Zorvania", "capital"), ("Maldovex", "currency"), ("Pellucid Isles", "language")]

    def q(texts):
        return queries(smollm2_base, enc, [[{"role": "user", "content": t}] for t in texts])

    keys = []
    for e, r in facts:
        m = q([f"What is the {r} of {e}?", f"Tell me the {r} of {e}."]).mean(0)
        keys.append(m / np.linalg.norm(m))
    K = np.stack(keys)
    S = q([f"Do you know what the {r} of {e} is?" for e, r in facts]) @ K.T
    assert (S.argmax(1) == np.arange(3)).all()
    near = q(["What is the capital of France?", "What is the currency of Japan?"]) @ K.T
    assert near.max() < np.diag(S).min()
