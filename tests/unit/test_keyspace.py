"""GET /v1/keyspace's body (serve/keyspace.py) from a real KeyStore and ledger-shaped edit records,
and the /ui page it feeds (self-contained: no external asset)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from srmoa_dist.config import KeyStoreConfig
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.projection import key_dump
from srmoa_dist.serve.keyspace import KeySpace, build_keyspace
from srmoa_dist.serve.ui import ui_html


def _edit(edit_id: str, expert_id: int, status: str, t: float, **kw) -> dict:
    return {"edit_id": edit_id, "status": status, "expert_id": expert_id, "rule": kw.get("rule", ""),
            "question": kw.get("question", "q?"), "correct_answer": kw.get("answer"), "created": True,
            "steps": 30, "train_seconds": 1.5, "created_at": t, "updated_at": t, "notes": [status]}


@pytest.fixture
def store(tmp_path):
    ks = KeyStore.open(tmp_path / "ks", KeyStoreConfig(d_key=8))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((6, 8)).astype(np.float32)
    ks.add(keys / np.linalg.norm(keys, axis=1, keepdims=True), pinned=np.array([1, 0, 0, 1, 0, 0], bool))
    return ks


def test_one_point_per_active_key_with_its_live_edit(store):
    edits = [_edit("e-old", 0, "verified", 1.0, rule="old rule"),
             _edit("e-new", 0, "verified", 3.0, rule="new rule", answer="Paris"),
             _edit("e-back", 1, "rolled_back", 2.0),
             _edit("e-fail", -1, "failed", 4.0)]
    ks = build_keyspace(key_dump(store), edits)
    assert isinstance(ks, KeySpace) and ks.n_active == ks.n_shown == 6 == len(ks.points)
    by_id = {p.id: p for p in ks.points}
    assert by_id[0].edited and by_id[0].edit.rule == "new rule" and by_id[0].edit.correct_answer == "Paris"
    assert not by_id[1].edited and by_id[1].edit is None           # its only edit was rolled back
    assert [p.id for p in ks.points if p.pinned] == [0, 3]
    assert ks.namespaces == ["default"] and len(ks.explained) == 2
    assert [e.edit_id for e in ks.edits] == ["e-fail", "e-new", "e-back", "e-old"]   # newest first
    assert ks.edits[0].note == "failed"
    ks.model_validate_json(ks.model_dump_json())                   # the response validates


def test_limit_keeps_the_pinned_keys_then_the_most_used(store):
    ks = build_keyspace(key_dump(store), [], limit=3)
    assert ks.n_active == 6 and ks.n_shown == 3
    assert {0, 3} <= {p.id for p in ks.points}
    with pytest.raises(ValueError, match="limit"):
        build_keyspace(key_dump(store), [], limit=0)


def test_an_empty_store_is_an_empty_map(tmp_path):
    ks = build_keyspace(key_dump(KeyStore.open(tmp_path / "e", KeyStoreConfig(d_key=8))), [])
    assert ks.n_active == 0 and ks.points == [] and ks.namespaces == []


def test_the_page_loads_nothing_from_outside():
    html = ui_html()
    assert "/v1/keyspace" in html and "<svg" in html
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls            # the SVG namespace is a name, not a fetch
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"'](?!data:)", html)
