"""`srmoa bench peer` at a tiny size: the same LoRA adapters in one PEFT PeftModel and in the routed
fusion path compute the same model (mixed-adapter batch), and the run reports tokens/s of both."""

from __future__ import annotations

import dataclasses
import json

import pytest


@pytest.fixture
def tiny_model_dir(tmp_path, make_tiny_model):
    model, tok = make_tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _cfg(model_dir):
    from srmoa_dist.config import ModelConfig, SrmoaConfig

    cfg = SrmoaConfig()
    return cfg.replace(model=ModelConfig(name_or_path=str(model_dir), query_layer=1, relation_layer=None,
                                         device="cpu"),
                       expert=dataclasses.replace(cfg.expert, form="lora"))


def test_peer_bench_tiny(tmp_path, tiny_model_dir):
    from srmoa_dist.bench.peer_bench import PATHS, run_peer_bench

    out = tmp_path / "peer.json"
    doc = run_peer_bench(out, cfg=_cfg(tiny_model_dir), adapters=3, batch_sizes=(1, 3), new_tokens=4,
                         repeats=1, say=lambda s: None)
    assert json.loads(out.read_text())["fusion_vs_peft"] == doc["fusion_vs_peft"]
    a = doc["agreement"]
    # the adapters change the logits, and PEFT's mixed batch equals the fusion path's
    assert a["max_abs_adapter_effect"] > 1e-2, a
    assert a["max_abs_logit_diff"] < 1e-4 and a["same_greedy_tokens"], a
    assert doc["adapter"]["form"] == "lora" and doc["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert doc["adapter"]["layers"] == [2, 3]
    assert [r["batch"] for r in doc["batches"]] == [1, 3]
    row = doc["batches"][1]
    assert row["adapters_in_batch"] == 3
    for p in PATHS:
        assert row[p]["tokens_per_s"] > 0 and len(row[p]["runs_s"]) == 1
    assert row["fusion_vs_peft"] == pytest.approx(row["fusion"]["tokens_per_s"] / row["peft"]["tokens_per_s"])


def test_peer_bench_needs_lora_form(tiny_model_dir):
    from srmoa_dist.bench.peer_bench import PeerRun

    cfg = _cfg(tiny_model_dir)
    cfg = cfg.replace(expert=dataclasses.replace(cfg.expert, form="parallel_mlp"))
    with pytest.raises(ValueError, match="expert.form must be 'lora'"):
        PeerRun(cfg)
    with pytest.raises(ValueError, match="batch_sizes"):
        PeerRun(_cfg(tiny_model_dir), batch_sizes=(0,))
