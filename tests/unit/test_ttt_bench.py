"""A fast smoke test of the SR-TTT benchmark on a tiny random Llama (no quality can be asserted on it)."""

from __future__ import annotations

import json

from srmoa_dist.bench.ttt_bench import contains_answer, format_summary, run_ttt_bench, with_rule
from srmoa_dist.config import ExpertConfig, KeyStoreConfig, ModelConfig, SrmoaConfig, StoreConfig, TTTConfig

METRICS = ("reliability", "generalization", "locality", "routing_precision")


def _cfg(mcfg: ModelConfig) -> SrmoaConfig:
    return SrmoaConfig(model=mcfg, expert=ExpertConfig(rank=4, alpha=8.0), store=StoreConfig(n_shards=2),
                       keystore=KeyStoreConfig(d_key=16, k=4),
                       ttt=TTTConfig(steps=3, lr=0.05, verify_max_new_tokens=4, check_isolation=False))


def test_run_ttt_bench_smoke(tiny_bench_base, tmp_path):
    base, mcfg = tiny_bench_base
    out = tmp_path / "bench_ttt.json"
    said: list[str] = []
    doc = run_ttt_bench(2, out, data_dir=tmp_path / "data", seed=0, cfg=_cfg(mcfg), base=base,
                        n_probes=6, n_near_miss=2, max_new_tokens=4, batch_size=8, say=said.append)
    on_disk = json.loads(out.read_text())
    assert on_disk["n_edits"] == doc["n_edits"] == 2
    for d in (on_disk, on_disk["sr_ttt"], on_disk["baseline_rule_in_context"], on_disk["combined"]):
        for k in METRICS:
            assert 0.0 <= d[k] <= 1.0, (k, d[k])
    for k in ("reliability", "generalization", "locality"):
        assert 0.0 <= on_disk["baseline_base"][k] <= 1.0
    assert on_disk["baseline_base"]["locality"] == 1.0           # the base model against itself
    assert on_disk["baseline_base"]["routing_precision"] is None
    assert on_disk["edit_seconds_p50"] > 0 and on_disk["peak_rss_mb"] > 0
    assert -1.0 <= on_disk["tau"] <= 1.0
    assert sum(on_disk["edits_summary"][k] for k in ("verified", "committed_unverified", "rolled_back",
                                                     "errors")) == 2
    for k in ("date", "machine", "config", "edits", "facts", "outputs"):
        assert k in on_disk
    assert len(on_disk["outputs"]) == 2 * 6 + 6
    assert said and "reliability" in said[0] and said[0] == format_summary(on_disk)
    assert (tmp_path / "data" / "ttt_bench" / "ledger" / "edits.jsonl").exists()   # the real on-disk stores


def test_run_ttt_bench_without_rule_option(tiny_bench_base, tmp_path):
    base, mcfg = tiny_bench_base
    doc = run_ttt_bench(1, tmp_path / "o.json", seed=1, with_rule_option=False, cfg=_cfg(mcfg), base=base,
                        tau=0.5, n_probes=4, n_near_miss=1, max_new_tokens=3, verify=False, say=None)
    assert doc["baseline_rule_in_context"] is None and doc["combined"] is None
    assert doc["tau"] == 0.5 and doc["edits_summary"]["committed_unverified"] == 1


def test_judge_and_rule_prefix():
    assert contains_answer("The capital is  TARSK, of course.", "Tarsk")
    assert not contains_answer("The capital is Tars.", "Tarsk")
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}]
    assert with_rule(chat, "R.")[-1]["content"] == "R.\n\nQ?" and chat[-1]["content"] == "Q?"
