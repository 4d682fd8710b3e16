"""srmoa init --seed-kind real: non-zero seed experts under keys that real queries retrieve."""

import json
from pathlib import Path

import numpy as np
import yaml

from srmoa_dist.config import SrmoaConfig, resolve
from srmoa_dist.experts.codec import encode_expert
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.model.generation import queries
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.runtime.store_init import SEED_QUESTIONS_FILE, ensure_encoder, init_store, real_seed_batch

GEOMETRY_1M = Path(__file__).resolve().parents[2] / "results" / "scale" / "expert_1m.yaml"


def test_the_million_expert_geometry_fits_8_lmdb_pages():
    """README Results: 1,000,000 experts of SmolLM2-135M in <= 40 GB -> one record in 8 pages (32 KiB)."""
    cfg = SrmoaConfig.from_dict(yaml.safe_load(open(GEOMETRY_1M)))
    e = cfg.expert
    layers = range(e.first_layer, e.last_layer + 1)
    shapes = {f"layers.{i}.mlp": (576, 576) for i in layers}
    rec = encode_expert(LoRAExpert.random(shapes, e.rank, e.alpha, e.dtype, seed=0))
    pages = -(-(len(rec) + 16) // 4096)                   # LMDB overflow pages: 16-byte page header
    assert len(layers) == 14 and pages == 8
    assert 1_000_000 * pages * 4096 <= 40e9


def test_real_seed_batch_is_nonzero_and_deterministic():
    cfg = SrmoaConfig.from_dict({"expert": {"rank": 2, "alpha": 4.0}})
    shapes = {"layers.2.mlp": (64, 64), "layers.3.mlp": (64, 64)}
    ids = np.arange(10, 14)
    a, b = real_seed_batch(ids, shapes, cfg, seed=3), real_seed_batch(ids, shapes, cfg, seed=3)
    assert list(a) == [10, 11, 12, 13]
    assert all(a[i].same_weights(b[i]) for i in a)
    assert not a[10].same_weights(a[11])
    A, B = a[12].float32()["layers.3.mlp"]
    assert A.shape == (2, 64) and B.shape == (64, 2) and 0 < np.abs(B).max() < 0.01
    assert abs(A.std() - 1 / 8) < 0.03


def test_init_real_seeds_are_retrieved_by_their_questions(tiny_base, tmp_path):
    cfg = resolve(tmp_path / "store", overrides={
        "model": {"name_or_path": "tiny", "query_layer": 1, "relation_layer": None, "device": "cpu",
                  "system_prompt": tiny_base.system_prompt},
        "keystore": {"d_key": 16}, "store": {"n_shards": 2, "durable": False}})
    out = init_store(cfg, n_experts=300, base=tiny_base, seed_kind="real", progress=lambda s: None)
    assert out["keys"] == 300 and out["seed_experts_added"] == 300 and out["seed_kind"] == "real"
    questions = json.loads((tmp_path / "store" / SEED_QUESTIONS_FILE).read_text())
    assert len(questions) == 300 and len(set(questions)) == 300
    enc = ensure_encoder(cfg, tiny_base)
    q = queries(tiny_base, enc, [[{"role": "user", "content": t}] for t in questions[:20]])
    with KeyStore.open(cfg.keystore_dir, cfg.keystore, cfg.gravity) as ks:
        D, I = ks.search(q, 1, tau=-1.0)
    assert (I[:, 0] == np.arange(20)).mean() >= 0.9 and np.median(D[:, 0]) > 0.9
    store = ShardedExpertStore(cfg.shards_dir, cfg.store)
    try:
        got = store.get_many([0, 299])
        assert all(np.abs(e.float32()["layers.3.mlp"][1]).max() > 0 for e in got)
    finally:
        store.close()
    again = init_store(cfg, n_experts=300, base=tiny_base, seed_kind="real", progress=lambda s: None)
    assert again["seed_experts_added"] == 0 and again["keys"] == 300            # idempotent
