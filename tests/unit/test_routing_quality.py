"""bench routing end to end at a tiny size (tiny random Llama), and its parts."""

import json

import numpy as np

from srmoa_dist.bench.question_bank import make_question_bank, unrelated_prompts
from srmoa_dist.bench.routing_quality import evaluate_size, run_routing_bench, synthetic_keys


def test_question_bank_is_distinct_and_deterministic():
    bank = make_question_bank(3000, seed=1)
    qs = [f.key for f in bank] + [f.held_out for f in bank]
    assert len(set(qs)) == 6000
    assert len({(f.relation, f.entity) for f in bank}) == 3000
    assert make_question_bank(50, seed=1) == bank[:50]
    assert all(f.entity in f.key and f.entity in f.held_out for f in bank[:100])
    un = unrelated_prompts()
    assert len(un) > 500 and not set(un) & set(qs)


def test_synthetic_keys_are_unit_and_near_their_base():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((10, 32)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    s = synthetic_keys(real, 500, seed=0)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, rtol=1e-5)
    best = (s @ real.T).max(1)
    assert 0.75 < np.median(best) < 0.98


def test_evaluate_size_counts_own_and_false_routes():
    keys = np.eye(4, dtype=np.float32)
    held = np.array([[0.9, 0.1, 0, 0], [0, 0.2, 0.8, 0]], np.float32)      # fact 0 right, fact 1 wrong
    unrel = np.array([[0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0.99]], np.float32)
    r = evaluate_size(keys, held, np.array([0, 1]), unrel, tau=0.6, k=2)
    assert r["own_top1"] == 0.5 and r["routed_own"] == 0.5 and r["own_in_topk"] == 1.0   # 2nd of 2
    assert r["false_route"] == 0.5


def test_routing_bench_tiny_end_to_end(tiny_base, tmp_path):
    out = tmp_path / "routing.json"
    doc = run_routing_bench(out, sizes=(40, 120, 600), n_facts=200, base=tiny_base, d_key=16, n_unrelated=200,
                            cache_dir=tmp_path / "cache", say=lambda s: None)
    saved = json.loads(out.read_text())
    assert saved["distinct_questions"] == 400 and out.with_suffix(".png").stat().st_size > 1000
    assert [r["experts"] for r in saved["sizes"]] == [40, 120, 600]
    assert saved["sizes"][-1]["synthetic_keys"] == 400
    for r in saved["sizes"]:
        assert 0 <= r["routed_own"] <= r["own_top1"] <= r["own_in_topk"] <= 1
        assert 0 <= r["false_route"] <= 1
    assert -1 <= doc["tau"] <= 1
    assert list((tmp_path / "cache").glob("pooled-*.npy"))        # the pooled states were cached
    again = run_routing_bench(out, sizes=(40,), n_facts=200, base=tiny_base, d_key=16, n_unrelated=200,
                              cache_dir=tmp_path / "cache", say=lambda s: None)
    assert again["sizes"][0] == saved["sizes"][0] | {"exact_search_ms_per_query":
                                                     again["sizes"][0]["exact_search_ms_per_query"]}
