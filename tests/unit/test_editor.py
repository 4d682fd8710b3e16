"""`ttt.editor.Editor`: how queued feedback requests are split into training batches."""

from __future__ import annotations

import dataclasses

import pytest

from srmoa_dist.config import KeyStoreConfig, SrmoaConfig, TTTConfig
from srmoa_dist.routing.query_encoder import QueryEncoder
from srmoa_dist.routing.relation_gate import GatedEncoder, RelationGate
from srmoa_dist.ttt.editor import Editor
from srmoa_dist.ttt.ledger import EditLedger

QUESTIONS = ("What is the capital of Zorblax?", "Which currency is used in Zorblax?",
             "What is the capital of Quuxland?", "What is the capital of Zorblax?")


@pytest.fixture(scope="module")
def encoder(tiny_base):
    return QueryEncoder.calibrate(tiny_base, d_key=8, prompts=["Hi there.", "Why?", *QUESTIONS] * 3)


def _batches(tiny_base, encoder, tmp_path, batch_edits: int = 8) -> list[list[int]]:
    # tau -1: every pair of questions is near for the router
    cfg = SrmoaConfig(data_dir=str(tmp_path), keystore=KeyStoreConfig(tau=-1.0, d_key=8),
                      ttt=TTTConfig(batch_edits=batch_edits))
    editor = Editor(cfg, base=tiny_base, fusion=None, encoder=encoder, store=None, keystore=None,
                    ledger=EditLedger(tmp_path / "ledger"), locality_prompts=())
    failures = {i: editor.failure({"prompt": q, "correct_answer": "x"}) for i, q in enumerate(QUESTIONS)}
    return editor._batches(failures)


def test_near_requests_go_to_separate_batches(tiny_base, encoder, tmp_path):
    assert _batches(tiny_base, encoder, tmp_path) == [[0], [1], [2], [3]]


def test_with_the_relation_gate_one_subjects_facts_share_a_batch(tiny_base, encoder, tmp_path):
    """Zorblax's capital and currency train together (the gate keeps them apart at serving); Quuxland's
    capital stays apart (near, another subject), and so does Zorblax's capital asked again (over
    ttt.refine_radius: the later edit refines the first)."""
    gate = RelationGate.fit(tiny_base, 2, entities_per_kind=1, defer_margin=-0.1)
    gated = GatedEncoder(encoder, gate)
    assert _batches(tiny_base, gated, tmp_path) == [[0, 1], [2], [3]]
    assert _batches(tiny_base, gated, tmp_path, batch_edits=1) == [[0], [1], [2], [3]]
    arbitrating = GatedEncoder(encoder, dataclasses.replace(gate, defer_margin=None))   # no deferral
    assert _batches(tiny_base, arbitrating, tmp_path) == [[0], [1], [2], [3]]


def test_each_batch_is_answered_as_soon_as_it_settles(make_tiny_world, tmp_path, monkeypatch):
    """run_many(on_result=...): a request is reported when its own batch has settled, before the next
    batch trains; a malformed request is reported too (with its error)."""
    from srmoa_dist.config import ExpertConfig
    from srmoa_dist.experts.store import ShardedExpertStore
    from srmoa_dist.routing.keystore import KeyStore
    from srmoa_dist.ttt import editor as editor_mod

    base, fusion, enc = make_tiny_world(ExpertConfig(rank=4, alpha=8.0), 8)
    cfg = SrmoaConfig(data_dir=str(tmp_path), expert=ExpertConfig(rank=4, alpha=8.0),
                      keystore=KeyStoreConfig(tau=-1.0, d_key=8, k=4),     # every pair is near
                      ttt=TTTConfig(steps=2, contrast_prompts=0, verify_max_new_tokens=4))
    store = ShardedExpertStore(tmp_path / "shards", cfg.store)
    editor = Editor(cfg, base=base, fusion=fusion, encoder=enc, store=store, keystore=KeyStore(cfg.keystore),
                    ledger=EditLedger(cfg.ledger_dir), locality_prompts=())
    events: list[tuple] = []
    real = editor_mod.apply_edits

    def spy(env, edits, **kw):
        events.append(("train", len(edits)))
        return real(env, edits, **kw)

    monkeypatch.setattr(editor_mod, "apply_edits", spy)
    requests = [{"prompt": QUESTIONS[0], "correct_answer": "Blip"}, {"correct_answer": "no prompt"},
                {"prompt": QUESTIONS[2], "correct_answer": "Blop"}]
    out = editor.run_many(requests, on_result=lambda i, r: events.append(("answered", i, type(r).__name__)))
    try:
        assert events == [("train", 1), ("answered", 0, "EditResult"), ("train", 1),
                          ("answered", 2, "EditResult"), ("answered", 1, "KeyError")], events
        assert isinstance(out[1], KeyError) and all(isinstance(out[i], editor_mod.EditResult) for i in (0, 2))
    finally:
        store.close()
        fusion.remove()
