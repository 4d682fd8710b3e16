"""Fan-out search over K partitions, merged: the global top-k (exact partitions)."""

import numpy as np

from srmoa_dist.bench.partition_sim import merge_topk, run_partition_sim, simulate


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_merge_topk_of_exact_partitions_is_the_global_top_k():
    rng = np.random.default_rng(0)
    keys, q = _unit(rng.standard_normal((600, 16))), _unit(rng.standard_normal((20, 16)))
    S = q @ keys.T
    parts = []
    for p in range(3):
        ids = np.arange(p, 600, 3)
        top = np.argsort(-S[:, ids], axis=1)[:, :5]
        parts.append((np.take_along_axis(S[:, ids], top, 1), ids[top]))
    D, I = merge_topk(parts, 5)
    want = np.argsort(-S, axis=1)[:, :5]
    np.testing.assert_array_equal(I, want)
    np.testing.assert_allclose(D, np.take_along_axis(S, want, 1), rtol=1e-6)
    D2, I2 = merge_topk([(D[:, :2], np.full((20, 2), -1))], 3)          # missing hits stay -1 / -inf
    assert (I2 == -1).all() and np.isneginf(D2).all()


def test_simulate_exact_partitions_recall_one(tmp_path):
    rng = np.random.default_rng(1)
    keys, q = _unit(rng.standard_normal((3000, 16))), _unit(rng.standard_normal((50, 16)))
    rows = simulate(keys, q, (1, 4), say=lambda s: None)
    assert [r["partitions"] for r in rows] == [1, 4] and all(r["recall_at_k"] == 1.0 for r in rows)
    doc = run_partition_sim(tmp_path / "p.json", n=4000, ks=(1, 2), n_queries=50, d=16, say=lambda s: None)
    assert (tmp_path / "p.json").is_file() and doc["rows"][1]["keys_per_partition"] == 2000
