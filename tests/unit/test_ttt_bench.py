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
    # every answer metric recomputed from the per-prompt outputs the document keeps
    answers = [f["answer"] for f in on_disk["facts"]]
    fact_expert = {e["fact"]: e["expert_id"] for e in on_disk["edits"]
                   if e["status"] in ("verified", "committed")}
    rows = on_disk["outputs"]

    def rate(variant: str, kind: str) -> float:
        hits = [contains_answer(r[variant], answers[r["fact"]]) for r in rows if r["kind"] == kind]
        return sum(hits) / len(hits)

    for name in ("sr_ttt", "baseline_base", "baseline_rule_in_context", "combined"):
        assert on_disk[name]["reliability"] == rate(name, "trained"), name
        assert on_disk[name]["generalization"] == rate(name, "held_out"), name
    held = [r for r in rows if r["kind"] == "held_out"]
    precision = sum(r["routed_to"] is not None and r["routed_to"] == fact_expert.get(r["fact"], -2)
                    for r in held) / len(held)
    for name in ("sr_ttt", "baseline_rule_in_context", "combined"):
        assert on_disk[name]["routing_precision"] == precision, name
    assert {k: on_disk[k] for k in METRICS} == {k: on_disk["sr_ttt"][k] for k in METRICS}
    n_probe = sum(r["kind"] == "probe" for r in rows)
    for name in ("sr_ttt", "baseline_rule_in_context", "combined"):                # a share of the probes
        assert on_disk[name]["locality"] in {i / n_probe for i in range(n_probe + 1)}, name
    assert on_disk["baseline_base"]["locality"] == 1.0           # the base model against itself
    assert on_disk["baseline_base"]["routing_precision"] is None
    assert on_disk["edit_seconds_p50"] > 0 and on_disk["peak_rss_mb"] > 0
    assert on_disk["tau"] == on_disk["tau_calibration"]["tau"]
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
