"""The store benchmark runs end to end at a tiny size and writes every promised figure."""

from __future__ import annotations

import json

import numpy as np

from srmoa_dist.bench.store import clustered_keys, run_store_bench

FIELDS = ("experts", "shards", "bytes_per_expert", "ingest_experts_per_s", "get_many_p50_ms",
          "get_many_p99_ms", "search_qps", "recall_at_k", "consolidation_updates_per_s", "keystore_rss_mb")


def test_clustered_keys_are_unit_float32():
    x = clustered_keys(500, 16, np.random.default_rng(0))
    assert x.dtype == np.float32 and x.shape == (500, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_store_bench_writes_json_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    rows = run_store_bench([1500, 3000], shards=2, out=out, work_dir=tmp_path)
    doc = json.loads(out.read_text())
    assert [r["experts"] for r in doc["results"]] == [1500, 3000] == [r["experts"] for r in rows]
    for row in doc["results"]:
        for f in FIELDS:
            assert f in row, f
        assert row["recall_at_k"] == 1.0            # exact index at these sizes
        assert row["search_qps"] > 0 and row["consolidation_updates_per_s"] > 0
        assert row["get_many_p50_ms"] <= row["get_many_p99_ms"]
    assert out.with_suffix(".png").stat().st_size > 0
