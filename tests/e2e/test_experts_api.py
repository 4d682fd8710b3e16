"""Experts as a product over HTTP: import / list / show / export / delete, adapters as models with the
`openai` client, per-request routing overrides, and tenants (namespaces) on an app with tenant keys."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from srmoa_dist.cli_experts import write_adapter_files
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.peft_distill import REPORT_NAME
from srmoa_dist.experts.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft_adapter, save_peft_adapter

pytestmark = pytest.mark.ray

SHAPES = {"layers.2.mlp": (64, 64), "layers.3.mlp": (64, 64)}   # the tiny Llama's adapted MLPs (d=64)
FACT = "Which river flows through the invented city of Brellin?"
OTHER = "Tell me the shared recipe for zorbel soup."


def _adapter(tmp_path, name: str, seed: int) -> dict:
    """A strong random parallel-MLP expert written as adapter files (the importer reads them)."""
    e = LoRAExpert.random(SHAPES, rank=4, alpha=64.0, dtype="float32", seed=seed, b_std=1.0)
    d = save_peft_adapter(e, tmp_path / name)
    return {CONFIG_NAME: (d / CONFIG_NAME).read_text(),
            WEIGHTS_NAME: base64.b64encode((d / WEIGHTS_NAME).read_bytes()).decode()}


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _ask(c: httpx.Client, model: str, text: str, headers: dict | None = None, **extra) -> dict:
    r = c.post("/v1/chat/completions", headers=headers, json={
        "model": model, "max_tokens": 6, "messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_adapter_import_as_model_export_and_delete(http, oai, model_id, tmp_path):
    files = _adapter(tmp_path, "brellin", seed=11)
    body = {"name": "brellin", "examples": [FACT, "Name the river of Brellin."], "files": files}
    r = http.post("/v1/experts", json=body)
    assert r.status_code == 201, r.text
    eid = r.json()["id"]
    assert r.json()["namespace"] == "default" and r.json()["origin"] == "import"
    _error(http.post("/v1/experts", json=body), 409, "name")                    # the name is taken

    # the adapter is a model; asking it forces the expert at gate 1, no search
    assert f"{model_id}:brellin" in [m.id for m in oai.models.list().data]
    forced = oai.chat.completions.create(model=f"{model_id}:brellin", max_tokens=6,
                                         messages=[{"role": "user", "content": "Hello there"}])
    routing = forced.model_extra["routing"]
    assert routing["expert_ids"] == [eid] and routing["gates"] == [1.0] and routing["forced"]
    plain = oai.chat.completions.create(model=model_id, max_tokens=6, extra_body={"use_experts": False},
                                        messages=[{"role": "user", "content": "Hello there"}])
    assert forced.choices[0].message.content != plain.choices[0].message.content    # the expert acts
    # its key was computed from the examples: asking one routes to it (tau lowered for this request)
    routed = _ask(http, model_id, FACT, tau=0.3)["routing"]
    assert eid in routed["expert_ids"] and not routed["forced"]

    page = http.get("/v1/experts", params={"origin": "import", "limit": 1000}).json()
    assert eid in [e["id"] for e in page["data"]]
    shown = http.get(f"/v1/experts/{eid}").json()
    assert shown["catalog"]["name"] == "brellin" and shown["key"]["namespace"] == "default"
    assert shown["catalog"]["examples"][0] == FACT and shown["key"]["pinned"]

    # export: a parallel MLP adapter has no exact PEFT form; it comes as a LoRA on mlp.down_proj fitted
    # to it, with its measured agreement (the route and the file say how close it is)
    r = http.get(f"/v1/experts/{eid}/adapter")
    assert r.status_code == 200, r.text
    doc = r.json()
    rep = doc["export"]
    assert rep["form"] == "parallel_mlp" and rep["method"] == "ridge_down_proj" and not rep["exact"]
    assert set(rep["residual"]) == set(SHAPES) and rep["own"]["prompts"] == 2 and rep["held_out"]["prompts"]
    assert 0.0 <= rep["own"]["tokens"] <= 1.0 and rep["fit_tokens"] > 0
    out = write_adapter_files(doc["files"], tmp_path / "exported")
    assert json.loads((out / REPORT_NAME).read_text())["own"] == rep["own"]
    assert json.loads((out / CONFIG_NAME).read_text())["target_modules"] == ["down_proj"]
    assert set(load_peft_adapter(out).targets) == {f"{n}.down_proj" for n in SHAPES}
    assert http.get(f"/v1/experts/{eid}/adapter").json()["files"] == doc["files"]     # kept, not refitted

    assert http.delete(f"/v1/experts/{eid}").json()["deleted"]
    _error(http.get(f"/v1/experts/{eid}"), 404, "expert_id")
    _error(http.post("/v1/chat/completions", json={"model": f"{model_id}:brellin", "messages": [
        {"role": "user", "content": "Hi"}]}), 404, "model")
    assert f"{model_id}:brellin" not in [m.id for m in oai.models.list().data]
    assert eid not in _ask(http, model_id, FACT, tau=0.3)["routing"]["expert_ids"]
    _error(http.delete(f"/v1/experts/{eid}"), 404, "expert_id")


def test_bad_imports_and_routing_overrides_name_the_field(http, model_id, tmp_path):
    good = _adapter(tmp_path, "g", seed=1)
    ok = {"name": "x1", "examples": ["hi"]}
    _error(http.post("/v1/experts", json={**ok, "files": good, "path": "/tmp"}), 400, "path")
    _error(http.post("/v1/experts", json={**ok, "examples": [], "files": good}), 400, "examples")
    _error(http.post("/v1/experts", json={**ok, "name": "has space", "files": good}), 400, "name")
    _error(http.post("/v1/experts", json={**ok, "files": {CONFIG_NAME: "{}"}}), 400, "files")
    _error(http.post("/v1/experts", json={**ok, "path": str(tmp_path / "nope")}), 400, "path")
    # a LoRA on attention projections does not fit a store of parallel MLP adapters
    lora = LoRAExpert.random({"layers.2.self_attn.q_proj": (64, 64)}, rank=4, alpha=8.0, dtype="float32")
    d = save_peft_adapter(lora, tmp_path / "qproj")
    e = _error(http.post("/v1/experts", json={**ok, "path": str(d)}), 400, "adapter.target_modules")
    assert "q_proj" in e["message"] and "parallel_mlp" in e["message"]
    wide = LoRAExpert.random({"layers.2.mlp": (32, 32)}, rank=4, alpha=8.0, dtype="float32")
    d = save_peft_adapter(wide, tmp_path / "wide")
    _error(http.post("/v1/experts", json={**ok, "path": str(d)}), 400, "adapter.hidden_size")
    assert http.get("/v1/models").json()["data"][0]["id"] == model_id
    ask = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _error(http.post("/v1/chat/completions", json={**ask, "tau": 1.5}), 400, "tau")
    _error(http.post("/v1/chat/completions", json={**ask, "k": 0}), 400, "k")
    _error(http.post("/v1/chat/completions", json={**ask, "k": 99}), 400, "k")
    _error(http.post("/v1/chat/completions", json={**ask, "model": f"{model_id}:nope"}), 404, "model")
    _error(http.post("/v1/chat/completions", json={**ask, "model": "other:nope"}), 404, "model")
    _error(http.get("/v1/experts", params={"limit": 0}), 400, "limit")
    _error(http.get("/v1/experts", params={"origin": "made-up"}), 400, "origin")
    r = http.post("/v1/chat/completions", json={**ask, "k": 1, "tau": -1.0})      # every row has a key
    assert r.status_code == 200 and len(r.json()["routing"]["expert_ids"]) <= 1


# ----------------------------------------------------------------------------------------------------
# tenants


@pytest.fixture(scope="module")
def tenants(ray_cluster, serve_port, tmp_path_factory, e2e_tiny_model_dir):
    """An app with a keys file (tenants a and b) and an admin key; (base URL, headers by role)."""
    from e2e_support import tiny_app_config
    from ray import serve

    from srmoa_dist.serve.app import build_app
    from srmoa_dist.serve.local import build_args, wait_ready

    root = tmp_path_factory.mktemp("tenants")
    keys = root / "keys.txt"
    keys.write_text("# key namespace\nkey-of-a a\nkey-of-b b\n")
    cfg = tiny_app_config(root / "data", e2e_tiny_model_dir,
                          serve={"api_keys_file": str(keys), "admin_key": "admin-of-all"})
    serve.run(build_app(build_args(cfg)), name="srmoa-tenants", route_prefix="/tenants", blocking=False)
    base = f"http://127.0.0.1:{serve_port}/tenants"
    wait_ready(base, cfg, 120)
    yield base, {r: {"Authorization": f"Bearer {k}"} for r, k in
                 (("a", "key-of-a"), ("b", "key-of-b"), ("admin", "admin-of-all"))}
    serve.delete("srmoa-tenants")


def test_namespaces_isolate_tenants_and_share_the_shared_one(tenants, model_id, tmp_path):
    import openai

    base, h = tenants
    with httpx.Client(base_url=base, timeout=120) as c:
        _error(c.get("/v1/models"), 401)
        imp = {"name": "brellin", "examples": [FACT], "files": _adapter(tmp_path, "a", 21)}
        _error(c.post("/v1/experts", json=imp, headers=h["a"]), 403)           # tenants do not import
        a = c.post("/v1/experts", json={**imp, "namespace": "a"}, headers=h["admin"]).json()
        s = c.post("/v1/experts", json={**imp, "name": "soup", "examples": [OTHER], "namespace": "shared",
                                        "files": _adapter(tmp_path, "s", 22)}, headers=h["admin"]).json()
        assert (a["namespace"], s["namespace"]) == ("a", "shared")
        # listings and models: a sees a + shared, b sees shared only
        ids = {r: [e["id"] for e in c.get("/v1/experts", headers=h[r]).json()["data"]] for r in ("a", "b")}
        assert a["id"] in ids["a"] and s["id"] in ids["a"] and a["id"] not in ids["b"] and s["id"] in ids["b"]
        _error(c.get("/v1/experts", params={"namespace": "a"}, headers=h["b"]), 403)
        _error(c.get(f"/v1/experts/{a['id']}", headers=h["b"]), 404)
        oa = openai.OpenAI(base_url=f"{base}/v1", api_key="key-of-a", max_retries=0)
        ob = openai.OpenAI(base_url=f"{base}/v1", api_key="key-of-b", max_retries=0)
        assert f"{model_id}:brellin" in [m.id for m in oa.models.list().data]
        assert f"{model_id}:brellin" not in [m.id for m in ob.models.list().data]
        with pytest.raises(openai.NotFoundError):
            ob.chat.completions.create(model=f"{model_id}:brellin",
                                       messages=[{"role": "user", "content": "x"}])
        # routing: a's question reaches a's expert from a, never from b (even at tau -1); shared reaches both
        ra = _ask(c, model_id, FACT, headers=h["a"], tau=0.3)["routing"]
        assert a["id"] in ra["expert_ids"]
        rb = _ask(c, model_id, FACT, headers=h["b"], tau=-1.0)["routing"]
        assert a["id"] not in rb["expert_ids"]
        for r in ("a", "b"):
            assert s["id"] in _ask(c, model_id, OTHER, headers=h[r], tau=0.3)["routing"]["expert_ids"]
        # b's answer to a's question is the base model's when it routes to nothing
        rb = _ask(c, model_id, FACT, headers=h["b"])
        if rb["routing"]["deferred"]:
            base_b = _ask(c, model_id, FACT, headers=h["b"], use_experts=False)
            assert rb["choices"][0]["message"]["content"] == base_b["choices"][0]["message"]["content"]

        # the shared expert goes (its strong random weights would blend into the edit's verification)
        assert c.delete(f"/v1/experts/{s['id']}", headers=h["admin"]).json()["deleted"]
        assert f"{model_id}:soup" not in [m.id for m in ob.models.list().data]
        # feedback from b trains in b: the new expert's key is in namespace b, a never reaches it
        q = "What is the capital of Zorbania?"
        fb = {"prompt": q, "response": "I do not know", "correct_answer": "Paris"}
        stats0 = c.get("/v1/stats", headers=h["admin"]).json()["namespaces"]
        assert stats0["keys"].get("a") == 1 and "shared" not in stats0["keys"]
        job = c.post("/v1/feedback", json=fb, headers=h["b"]).json()                # a tenant teaches itself
        deadline = time.monotonic() + 120
        while job["status"] in ("pending", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = c.get(f"/v1/feedback/{job['job_id']}", headers=h["b"]).json()
        reason = str((job.get("result") or {}).get("reason"))
        assert job["status"] == "done" and job["result"]["status"] == "verified", reason
        assert job["namespace"] == "b"
        eid = job["result"]["expert_id"]
        assert eid in _ask(c, model_id, q, headers=h["b"])["routing"]["expert_ids"]
        shown = c.get(f"/v1/experts/{eid}", headers=h["b"]).json()
        assert shown["key"]["namespace"] == "b" and shown["catalog"]["origin"] == "edit"
        assert shown["catalog"]["namespace"] == "b" and shown["catalog"]["examples"] == [q]
        _error(c.get(f"/v1/experts/{eid}", headers=h["a"]), 404)
        assert eid not in _ask(c, model_id, q, headers=h["a"], tau=-1.0)["routing"]["expert_ids"]
        _error(c.delete(f"/v1/experts/{eid}", headers=h["admin"]), 409, "expert_id")   # roll the edit back
        stats = c.get("/v1/stats", headers=h["admin"]).json()["namespaces"]
        assert stats["keys"]["b"] == 1 and stats["experts"]["b"]["edit"] == 1
        assert stats["requests"]["a"]["requests"] >= 1 and stats["requests"]["b"]["requests"] >= 1
        # jobs and edits are listed to their own namespace (and to the admin)
        def listed(role, route, key):
            return [x[key] for x in c.get(route, headers=h[role]).json()["data"]]

        assert job["job_id"] in listed("b", "/v1/feedback", "job_id")
        assert job["job_id"] in listed("admin", "/v1/feedback", "job_id")
        assert job["job_id"] not in listed("a", "/v1/feedback", "job_id")
        _error(c.get(f"/v1/feedback/{job['job_id']}", headers=h["a"]), 404, "job_id")
        edit_id = job["result"]["edit_id"]
        assert edit_id in listed("b", "/v1/edits", "edit_id")
        assert edit_id in listed("admin", "/v1/edits", "edit_id")
        assert edit_id not in listed("a", "/v1/edits", "edit_id")
