"""The edit ledger: append-only JSONL, fold by edit id, exact keys, torn lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from srmoa_dist.ttt.ledger import EditLedger, EditRecord, decode_key, encode_key


def _record(edit_id: str, **kw) -> EditRecord:
    rng = np.random.default_rng(0)
    base = dict(
        edit_id=edit_id, status="committed", rule="The capital of Veloria is Quenmark.",
        prompts=({"structure": "instruction", "messages": [{"role": "user", "content": "q"}],
                  "target": "a"},),
        expert_id=7, created=False, prev_version=2, new_version=3,
        prev_key=rng.standard_normal(16).astype(np.float32),
        new_key=rng.standard_normal(16).astype(np.float32),
        lm_losses=(3.0, 1.0, 0.04), router_losses=(0.7, 0.1, 0.0), steps=3, question="q", correct_answer="a",
    )
    base.update(kw)
    return EditRecord(**base)


def test_roundtrip_and_status(tmp_path):
    led = EditLedger(tmp_path / "ledger")
    r = led.commit(_record("e1"))
    assert r.created_at > 0 and r.updated_at >= r.created_at
    led.commit(_record("e2", expert_id=9, created=True, prev_version=None, prev_key=None))
    led.set_status("e1", "verified", note="answer ok", locality_changed=0)
    led.set_status("e2", "rolled_back", note="locality broke")

    again = EditLedger(tmp_path / "ledger")             # a fresh reader folds the same lines
    assert [e.edit_id for e in again.list()] == ["e1", "e2"]
    e1 = again.get("e1")
    assert e1.status == "verified" and e1.notes == ("answer ok",) and e1.extra == {"locality_changed": 0}
    assert np.array_equal(e1.prev_key, r.prev_key) and e1.prev_key.dtype == np.float32
    assert e1.lm_losses == (3.0, 1.0, 0.04) and e1.prompts == r.prompts and e1.prev_version == 2
    e2 = again.get("e2")
    assert e2.status == "rolled_back" and e2.prev_key is None and e2.created
    assert [e.edit_id for e in again.list("verified")] == ["e1"]
    assert again.live_experts() == {7}
    assert len(again) == 2 and "e1" in again


def test_errors(tmp_path):
    led = EditLedger(tmp_path)
    led.commit(_record("e1"))
    with pytest.raises(ValueError, match="already"):
        led.commit(_record("e1"))
    with pytest.raises(KeyError, match="no edit"):
        led.get("nope")
    with pytest.raises(ValueError, match="status"):
        led.set_status("e1", "done")
    with pytest.raises(ValueError, match="status"):
        _record("x", status="weird")
    with pytest.raises(ValueError, match="unknown status"):
        led.list("weird")


def test_append_only_and_torn_line(tmp_path):
    led = EditLedger(tmp_path)
    led.commit(_record("e1"))
    led.set_status("e1", "verified")
    lines = led.path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["op"] == "commit"
    with open(led.path, "a") as f:
        f.write('{"format": 1, "op": "sta')              # a crash mid-append
    assert EditLedger(tmp_path).get("e1").status == "verified"
    led.path.write_text(lines[0] + "\n" + "garbage\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2"):
        EditLedger(tmp_path)


def test_key_codec_exact():
    k = np.random.default_rng(1).standard_normal(128).astype(np.float32)
    assert np.array_equal(decode_key(encode_key(k)), k)
    assert encode_key(None) is None and decode_key(None) is None
    assert EditLedger.new_id() != EditLedger.new_id()


def test_torn_last_line_is_truncated_so_later_appends_stay_readable(tmp_path):
    led = EditLedger(tmp_path)
    led.commit(_record("e1"))
    led.set_status("e1", "verified")
    good = led.path.read_bytes()
    with open(led.path, "ab") as f:
        f.write(b'{"format": 1, "op": "status", "edit_id": "e1", "sta')      # a crash mid-append
    again = EditLedger(tmp_path)
    assert again.path.read_bytes() == good                                   # cut back to the last newline
    again.commit(_record("e2", expert_id=9))
    again.set_status("e2", "verified")
    third = EditLedger(tmp_path)                                             # would refuse the joined line
    assert [e.edit_id for e in third.list()] == ["e1", "e2"]
    assert third.get("e1").status == "verified" and third.get("e2").status == "verified"


def test_last_line_without_newline_is_dropped_not_joined(tmp_path):
    led = EditLedger(tmp_path)
    led.commit(_record("e1"))
    whole = led.path.read_bytes()
    led.path.write_bytes(whole + whole.rstrip(b"\n").replace(b'"e1"', b'"e2"'))   # torn right before "\n"
    again = EditLedger(tmp_path)
    assert [e.edit_id for e in again.list()] == ["e1"] and again.path.read_bytes() == whole
    again.commit(_record("e3"))
    assert [e.edit_id for e in EditLedger(tmp_path).list()] == ["e1", "e3"]


def test_non_object_line_is_a_clear_error(tmp_path):
    led = EditLedger(tmp_path)
    led.commit(_record("e1"))
    with open(led.path, "ab") as f:
        f.write(b"[1, 2]\n")
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        EditLedger(tmp_path)


def test_intent_then_commit_replaces_it_and_survives_a_reopen(tmp_path):
    led = EditLedger(tmp_path / "ledger")
    i1 = led.intent(_record("e1", status="intent", expert_id=-1, extra={"job_id": "job-1"}))
    led.intent(_record("e1", status="intent", expert_id=7, extra={"job_id": "job-1"}))    # rewritten
    assert [r.edit_id for r in led.in_flight()] == ["e1"] and led.live_experts() == set()
    again = EditLedger(tmp_path / "ledger")
    assert again.get("e1").status == "intent" and again.get("e1").expert_id == 7
    c = led.commit(_record("e1", extra={"job_id": "job-1"}))
    assert c.status == "committed" and c.created_at == i1.created_at and led.in_flight() == []
    again = EditLedger(tmp_path / "ledger")
    assert again.get("e1").status == "committed" and again.live_experts() == {7}
    assert [r.edit_id for r in again.by_job("job-1")] == ["e1"] and again.by_job("job-2") == []
    led.set_status("e1", "rolling_back")
    assert [r.edit_id for r in led.in_flight()] == ["e1"] and led.live_experts() == set()


def test_intent_rules(tmp_path):
    led = EditLedger(tmp_path / "ledger")
    with pytest.raises(ValueError, match="status 'intent'"):
        led.intent(_record("e1"))
    with pytest.raises(ValueError, match="intent\\(\\)"):
        led.commit(_record("e1", status="intent"))
    led.commit(_record("e1"))
    with pytest.raises(ValueError, match="already in the ledger"):
        led.intent(_record("e1", status="intent"))          # a settled edit is never an intent again
    with pytest.raises(ValueError, match="already in the ledger"):
        led.commit(_record("e1"))


def test_an_intent_line_after_a_commit_is_corrupt(tmp_path):
    led = EditLedger(tmp_path / "ledger")
    led.commit(_record("e1"))
    line = {"format": 1, "op": "intent", "record": _record("e1", status="intent").to_json()}
    with open(led.path, "a") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="line 2 is corrupt.*intent line for edit 'e1', which is committed"):
        EditLedger(tmp_path / "ledger")
