"""Every route answers a validated response model (no raw dicts), documented in /openapi.json; the
open models validate their documented fields and keep later ones."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from srmoa_dist.serve.responses import Stats
from srmoa_dist.serve.schemas import EditList, FeedbackJob


@pytest.fixture(scope="module")
def spec() -> dict:
    from srmoa_dist.serve.app import api

    return api.openapi()


HTML_ONLY = {("get", "/docs"), ("get", "/ui")}


def test_every_operation_has_a_json_response_model(spec):
    components = spec["components"]["schemas"]
    ops = [(m, p, op) for p, o in spec["paths"].items() for m, op in o.items()]
    routes = {(m, p) for m, p, _ in ops}
    assert {("get", "/v1/keyspace"), ("get", "/v1/stats"), ("get", "/v1/edits")} <= routes
    for method, path, op in ops:
        if (method, path) in HTML_ONLY:
            continue
        ok = {c: r for c, r in op["responses"].items() if c.startswith("2")}
        assert len(ok) == 1, (method, path, list(op["responses"]))
        schema = next(iter(ok.values()))["content"]["application/json"]["schema"]
        ref = schema.get("$ref", "")
        assert ref.startswith("#/components/schemas/"), (method, path, schema)
        name = ref.rsplit("/", 1)[-1]
        assert components[name].get("properties"), (method, path, name)     # a model, not a bare object


def test_edit_list_items_are_validated():
    rec = {"edit_id": "edit-1", "object": "edit", "status": "verified", "expert_id": 3, "created": True,
           "prompts": [{"structure": "direct", "messages": [{"role": "user", "content": "q?"}],
                        "target": "a"}], "extra": {"job_id": "job-1"}, "future_field": 1}
    got = EditList(data=[rec]).data[0]
    assert got.expert_id == 3 and got.prompts[0].messages[0].role == "user"
    assert got.model_dump()["future_field"] == 1                     # an open model keeps new fields
    with pytest.raises(ValidationError, match="expert_id"):
        EditList(data=[{**rec, "expert_id": "three"}])
    with pytest.raises(ValidationError, match="role"):
        EditList(data=[{**rec, "prompts": [{"structure": "x", "messages": [{"role": "wizard",
                                                                             "content": "q"}]}]}])


def test_feedback_job_result_and_stats_are_typed():
    job = FeedbackJob(job_id="job-1", status="done", created=1.0, attempt=1,
                      result={"edit_id": "edit-1", "status": "verified", "expert_id": 2,
                              "timings": {"train_s": 1.5}, "prompts": []})
    assert job.result.timings == {"train_s": 1.5} and job.result.expert_id == 2
    with pytest.raises(ValidationError):
        FeedbackJob(job_id="j", status="done", created=1.0, result={"timings": {"train_s": "slow"}})
    base = {"model": "m", "keystore": {"n_active": 1, "n_free": 0, "n_pinned": 1, "capacity": 64,
                                       "index_kind": "exact", "energy": 0.5, "usage_hist": {}},
            "shards": [{"entries": 1}], "experts": 1, "server": {"error": "timed out"},
            "ingress": {"inflight": 0, "rejected": 0, "limit": 8}}
    st = Stats.model_validate(base)
    assert st.keystore.model_dump()["usage_hist"] == {} and st.server.error == "timed out"
    with pytest.raises(ValidationError, match="n_active"):
        Stats.model_validate({**base, "keystore": {"index_kind": "exact"}})
