"""The HTTP API end to end: the real `openai` client for chat, completions and streaming; httpx for
feedback, edits, experts, stats, auth and every bad-input case (status + OpenAI-style error body)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.ray

Q = [{"role": "user", "content": "What is the capital of France?"}]


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in r.text
    if 400 <= status < 500 and status != 429:
        assert "retry-after" not in r.headers, r.headers        # deterministic: retrying cannot help
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def test_models_and_chat_with_openai_client(oai, model_id):
    assert [m.id for m in oai.models.list().data] == [model_id]
    r = oai.chat.completions.create(model=model_id, messages=Q, max_tokens=6)
    assert r.object == "chat.completion" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    routing = r.model_extra["routing"]
    assert set(routing) >= {"expert_ids", "scores", "gates", "deferred"}


def test_completions_with_openai_client(oai, model_id):
    r = oai.completions.create(model=model_id, prompt="Tell me a joke about cats", max_tokens=5)
    assert r.object == "text_completion" and len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert "routing" in r.model_extra
    r2 = oai.completions.create(model=model_id, prompt=["one", "two"], max_tokens=3)
    assert [c.index for c in r2.choices] == [0, 1] and len(r2.model_extra["routing"]) == 2


def test_streaming_chat_with_openai_client(oai, model_id):
    full = oai.chat.completions.create(model=model_id, messages=Q, max_tokens=6)
    chunks = list(oai.chat.completions.create(model=model_id, messages=Q, max_tokens=6, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content          # greedy: the same tokens streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "routing" in finals[0].model_extra
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streaming_completion_over_sse(http, model_id):
    with http.stream("POST", "/v1/completions", json={"model": model_id, "prompt": "Hello", "max_tokens": 4,
                                                      "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "routing" in events[-1]


def test_feedback_edit_route_and_rollback(http, model_id):
    fb = {"prompt": "What is the capital of Zorbania?", "response": "I do not know",
          "correct_answer": "Paris"}
    n_active = http.get("/v1/stats").json()["keystore"]["n_active"]
    r = http.post("/v1/feedback", json=fb)
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "pending" and job["object"] == "feedback.job"
    t0 = time.monotonic()
    calls = 0
    while job["status"] in ("pending", "running") and time.monotonic() - t0 < 120:
        job = http.get(f"/v1/feedback/{job['job_id']}", params={"wait": 10}).json()   # a long poll
        calls += 1
    assert job["status"] == "done", job
    assert calls <= (time.monotonic() - t0) / 10 + 1, "wait=10 answers when the job ends, else after 10 s"
    res = job["result"]
    assert res["status"] == "verified", res
    eid = res["expert_id"]
    # the failing prompt now reaches the edited expert
    ask = {"model": model_id, "max_tokens": 40, "messages": [{"role": "user", "content": fb["prompt"]}]}
    chat = http.post("/v1/chat/completions", json=ask).json()
    assert eid in chat["routing"]["expert_ids"] and not chat["routing"]["deferred"]
    assert "Paris" in chat["choices"][0]["message"]["content"]
    again = http.post("/v1/chat/completions", json=ask).json()        # the expert now from the cache
    assert again["choices"][0]["message"]["content"] == chat["choices"][0]["message"]["content"]
    ex = http.get(f"/v1/experts/{eid}").json()
    assert ex["id"] == eid and ex["version"] == res["new_version"] and ex["key"]["pinned"] is True
    edits = http.get("/v1/edits").json()["data"]
    assert res["edit_id"] in [e["edit_id"] for e in edits]
    # rollback: the key slot is freed, the prompt goes back to the base model
    r = http.delete(f"/v1/edits/{res['edit_id']}")
    assert r.status_code == 200 and r.json()["status"] == "rolled_back"
    ask = {"model": model_id, "max_tokens": 40, "messages": [{"role": "user", "content": fb["prompt"]}]}
    chat = http.post("/v1/chat/completions", json=ask).json()
    assert eid not in chat["routing"]["expert_ids"]
    _error(http.delete(f"/v1/edits/{res['edit_id']}"), 409, "edit_not_active")
    st = http.get("/v1/stats").json()
    assert st["keystore"]["n_active"] == n_active                   # the edit's slot is free again
    assert len(st["shards"]) == 2 and "usage_hist" in st["keystore"]
    cache = st["server"]["cache"]
    assert cache["hits"] >= 1 and st["cache_hit_rate"] == cache["hits"] / (cache["hits"] + cache["misses"])
    assert st["trainer"]["jobs"]["done"] >= 1
    phases = st["trainer"]["edit_phase_seconds"]                    # where the edits' time went
    assert {"train_s", "verify_s", "total_s"} <= set(phases), phases
    assert 0 < phases["train_s"]["p50"] <= phases["total_s"]["p90"] and phases["total_s"]["n"] >= 1


def test_feedback_marked_correct_is_skipped(http):
    r = http.post("/v1/feedback", json={"prompt": "2+2?", "response": "4", "verdict": "correct"})
    assert r.status_code == 202 and r.json()["status"] == "skipped"


BAD_CHAT = [
    # (body, status, code, param)
    ({"model": "srmoa-smollm2"}, 400, "missing_required_parameter", "messages"),
    ({"model": "srmoa-smollm2", "messages": []}, 400, "invalid_value", "messages"),
    ({"model": "srmoa-smollm2", "messages": "hello"}, 400, None, "messages"),
    ({"model": "srmoa-smollm2", "messages": [{"role": "user"}]}, 400, "missing_required_parameter",
     "messages[0].content"),
    ({"model": "srmoa-smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None,
     "messages[0].role"),
    ({"model": "srmoa-smollm2", "messages": [{"role": "user", "content": "   "}]}, 400, None, None),
    ({"model": "srmoa-smollm2", "messages": Q, "max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    ({"model": "srmoa-smollm2", "messages": Q, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"model": "srmoa-smollm2", "messages": Q, "max_tokens": 10_000}, 400, "invalid_value", "max_tokens"),
    ({"model": "srmoa-smollm2", "messages": Q, "temperature": 7}, 400, "invalid_value", "temperature"),
    ({"model": "srmoa-smollm2", "messages": Q, "n": 3}, 400, "invalid_value", "n"),
    ({"model": "no-such-model", "messages": Q}, 404, "model_not_found", "model"),
    ({"model": "srmoa-smollm2", "messages": [{"role": "user", "content": "word " * 300}]}, 400,
     "context_length_exceeded", "messages"),
    ({"model": "srmoa-smollm2", "messages": [{"role": "user", "content": "x" * 100_000}]}, 400,
     "context_length_exceeded", "messages"),
    ([1, 2, 3], 400, None, None),
]


@pytest.mark.parametrize("body,status,code,param", BAD_CHAT)
def test_bad_chat_requests(http, body, status, code, param):
    _error(http.post("/v1/chat/completions", json=body), status, code, param)


def test_bad_chat_request_streaming_gets_json_error(http):
    body = {"model": "srmoa-smollm2", "stream": True,
            "messages": [{"role": "user", "content": "word " * 300}]}
    _error(http.post("/v1/chat/completions", json=body), 400, "context_length_exceeded")


def test_malformed_json_and_routes(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "srmoa-smollm2", "messages": [',
                  headers={"content-type": "application/json"})
    _error(r, 400, "invalid_json")
    _error(http.post("/v1/completions", json={"model": "srmoa-smollm2", "prompt": ""}), 400, None, "prompt")
    _error(http.post("/v1/completions", json={"model": "srmoa-smollm2", "prompt": 42}), 400, None, "prompt")
    _error(http.get("/v1/nope"), 404, "unknown_route")
    _error(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_bad_feedback_experts_and_edits(http):
    _error(http.post("/v1/feedback", json={"prompt": "Why?"}), 400, None, None)          # no answer, no rule
    _error(http.post("/v1/feedback", json={"correct_answer": "x"}), 400, None, None)     # no prompt
    _error(http.post("/v1/feedback", json={"prompt": "q", "correct_answer": ""}), 400, None, "correct_answer")
    _error(http.get("/v1/feedback/job-doesnotexist"), 404, "job_not_found")
    _error(http.get("/v1/feedback/job-doesnotexist", params={"wait": 5}), 404, "job_not_found")
    for bad in ("21", "-1", "nan", "soon"):
        r = http.get("/v1/feedback/job-x", params={"wait": bad})
        assert r.status_code in (400, 422) and r.json()["error"]["param"] in ("wait", None), (bad, r.text)
    _error(http.get("/v1/experts/999999"), 404, "expert_not_found")
    _error(http.get("/v1/experts/abc"), 400, None, "expert_id")
    _error(http.get("/v1/experts/-3"), 400, None, "expert_id")
    _error(http.delete("/v1/edits/edit-nope"), 404, "edit_not_found")


def test_api_key_auth(ray_cluster, serve_port, tmp_path_factory, e2e_tiny_model_dir, model_id):
    """A second app with --api-key: 401 JSON without or with a wrong key, 200 with the right one."""
    from e2e_support import API_KEY, tiny_app_config
    from ray import serve

    from srmoa_dist.serve.app import build_app
    from srmoa_dist.serve.local import build_args

    cfg = tiny_app_config(tmp_path_factory.mktemp("auth") / "data", e2e_tiny_model_dir,
                          serve={"api_key": API_KEY})
    serve.run(build_app(build_args(cfg)), name="srmoa-auth", route_prefix="/auth", blocking=False)
    base = f"http://127.0.0.1:{serve_port}/auth"
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            e = _error(c.get("/v1/models"), 401, "invalid_api_key")
            assert "missing" in e["message"] and e["type"] == "authentication_error"
            _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
            basic = {"Authorization": "Basic abc"}
            _error(c.post("/v1/feedback", json={}, headers=basic), 401, "invalid_api_key")
            ok = c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == model_id
        import openai

        cli = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        assert cli.chat.completions.create(model=model_id, messages=Q, max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        serve.delete("srmoa-auth")


@pytest.fixture(scope="module")
def tight(ray_cluster, serve_port, tmp_path_factory, e2e_tiny_model_dir):
    """Base URL of an app that admits 2 requests at once (max_ongoing 1 + max_queued 1)."""
    from e2e_support import tiny_app_config
    from ray import serve

    from srmoa_dist.serve.app import build_app
    from srmoa_dist.serve.local import build_args, wait_ready

    cfg = tiny_app_config(tmp_path_factory.mktemp("tight") / "data", e2e_tiny_model_dir,
                          serve={"max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1},
                          runtime={"search_timeout_s": 1.0})
    serve.run(build_app(build_args(cfg)), name="srmoa-tight", route_prefix="/tight", blocking=False)
    base = f"http://127.0.0.1:{serve_port}/tight"
    wait_ready(base, cfg, 120)
    tight_cfg[:] = [cfg]
    yield base
    serve.delete("srmoa-tight")


tight_cfg: list = []          # the tight app's config, once its fixture has run


def test_overload_gets_503_with_retry_after(tight, model_id):
    """Bounded queues: past max_ongoing + max_queued requests in flight, a 503 JSON error with Retry-After."""
    import asyncio

    async def burst():
        async with httpx.AsyncClient(base_url=tight, timeout=120) as c:
            body = {"model": model_id, "max_tokens": 64, "messages": Q}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(24)))

    rs = asyncio.run(burst())
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r in rs:
        if r.status_code == 503:
            _error(r, 503, "overloaded")
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "service_unavailable_error"
    with httpx.Client(base_url=tight, timeout=60) as c:
        assert c.get("/v1/stats").json()["ingress"]["inflight"] == 0


def test_refused_multi_prompt_completion_releases_every_slot(tight, model_id):
    """A completion of more prompts than the admission limit is refused whole (400, no Retry-After: a
    retry cannot help), and takes no slot with it: the server keeps answering."""
    import asyncio

    with httpx.Client(base_url=tight, timeout=120) as c:
        for _ in range(3):               # before the fix, the first refusal leaked 2 slots for good
            e = _error(c.post("/v1/completions", json={"model": model_id, "prompt": ["a", "b", "c"],
                                                       "max_tokens": 2}), 400, "too_many_prompts", "prompt")
            assert "fewer prompts" in e["message"]
        r = c.post("/v1/completions", json={"model": model_id, "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert "retry-after" not in r.headers
        # one prompt: two sent at once may both wait in Serve's handle queue (max 1) for a moment
        r2 = c.post("/v1/completions", json={"model": model_id, "prompt": ["a"], "max_tokens": 2})
        assert r2.status_code == 200, r2.text
        ok = c.post("/v1/chat/completions", json={"model": model_id, "messages": Q, "max_tokens": 2})
        assert ok.status_code == 200, ok.text

    async def overlap():             # a 2-prompt completion while a chat holds a slot: all or nothing
        async with httpx.AsyncClient(base_url=tight, timeout=120) as c:
            chat = {"model": model_id, "max_tokens": 32, "messages": Q}
            two = {"model": model_id, "max_tokens": 2, "prompt": ["a", "b"]}
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=chat) for _ in range(2)),
                                        *(c.post("/v1/completions", json=two) for _ in range(4)))

    codes = [r.status_code for r in asyncio.run(overlap())]
    assert set(codes) <= {200, 503}, codes
    with httpx.Client(base_url=tight, timeout=60) as c:
        assert c.get("/v1/stats").json()["ingress"]["inflight"] == 0
        assert c.post("/v1/chat/completions", json={"model": model_id, "messages": Q,
                                                    "max_tokens": 2}).status_code == 200


def _base_query(cfg, rt, messages):
    """The routing query (1, d_key) the app computes for `messages` (same model dir, same encoder)."""
    from srmoa_dist.model.generation import queries
    from srmoa_dist.model.loading import load_base_model
    from srmoa_dist.runtime.store_init import ensure_encoder

    base = load_base_model(cfg.model, cfg.model_cache_dir)
    return queries(base, ensure_encoder(cfg, base, rt.keystore), [messages])


def _raw_query(cfg, rt, prompt):
    """The routing query (1, d_key) the app computes for a raw completion prompt."""
    import torch

    from srmoa_dist.model.chat import encode_prompt, pad
    from srmoa_dist.model.generation import prefill_lower
    from srmoa_dist.model.loading import load_base_model
    from srmoa_dist.runtime.store_init import ensure_encoder

    base = load_base_model(cfg.model, cfg.model_cache_dir)
    batch = pad(base.tokenizer, [encode_prompt(base.tokenizer, prompt)], base.device)
    with torch.no_grad():
        lower = prefill_lower(base, batch.input_ids, batch.attention_mask)
        return ensure_encoder(cfg, base, rt.keystore).encode_hidden(lower.hidden, batch.user_mask)


def test_routed_expert_missing_from_the_store_is_skipped(ray_cluster, app, http, model_id):
    """A key whose expert record is gone (a rollback window): the request is answered by the base
    model, 200, and its routing names the skipped expert (no 503, no Retry-After)."""
    _, cfg, rt = app
    msgs = [{"role": "user", "content": "Describe the three moons of Xylofon-7."}]
    [sid] = ray_cluster.get(rt.keystore.add.remote(_base_query(cfg, rt, msgs), True)).tolist()
    try:
        assert rt.client().contains([sid]) == [False]                    # a key without its expert
        ask = {"model": model_id, "max_tokens": 6, "messages": msgs}
        r = http.post("/v1/chat/completions", json=ask)
        assert r.status_code == 200, r.text
        routing = r.json()["routing"]
        assert routing["skipped"] == [sid] and routing["expert_ids"] == [] and routing["deferred"]
        assert routing["degraded"] and "no longer in the store" in routing["degraded_reason"]
        base = http.post("/v1/chat/completions", json={**ask, "use_experts": False}).json()
        assert r.json()["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
        assert not base["routing"]["degraded"] and base["routing"]["skipped"] == []
    finally:
        ray_cluster.get(rt.keystore.free.remote([sid]))
    raw = msgs[0]["content"]                  # a completion routes on the raw prompt (no chat template)
    [sid] = ray_cluster.get(rt.keystore.add.remote(_raw_query(cfg, rt, raw), True)).tolist()
    try:
        st = http.post("/v1/completions", json={"model": model_id, "prompt": raw, "max_tokens": 3})
        assert st.status_code == 200 and st.json()["routing"]["skipped"] == [sid]
    finally:
        ray_cluster.get(rt.keystore.free.remote([sid]))


def test_key_store_that_does_not_answer_degrades_to_the_base_model(ray_cluster, tight, model_id):
    """The key-store process stopped (SIGSTOP): chats still answer 200 from the base model within about
    runtime.search_timeout_s, marked degraded; /healthz stays up, /readyz says the key store is not
    ready; once it runs again, routing and readiness come back."""
    import os
    import signal

    from srmoa_dist.runtime.bootstrap import ensure_actors

    cfg = tight_cfg[0]
    ks = ensure_actors(cfg, trainer=False).keystore
    pid = ray_cluster.get(ks.info.remote())["pid"]
    ask = {"model": model_id, "max_tokens": 3, "messages": Q}
    with httpx.Client(base_url=tight, timeout=120) as c:
        assert c.get("/readyz").status_code == 200
        assert not c.post("/v1/chat/completions", json=ask).json()["routing"]["degraded"]
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json=ask)
            took = time.monotonic() - t0
            assert r.status_code == 200, r.text
            routing = r.json()["routing"]
            assert routing["degraded"] and "did not answer" in routing["degraded_reason"], routing
            assert routing["expert_ids"] == [] and took < 20
            assert c.get("/healthz").status_code == 200                  # liveness never asks the store
            e = _error(c.get("/readyz"), 503, "not_ready")
            assert "key store" in e["message"]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert c.get("/readyz").json()["status"] == "ready"
        assert not c.post("/v1/chat/completions", json=ask).json()["routing"]["degraded"]


def test_application_errors_are_500_without_retry_after_and_ray_failures_503():
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayTaskError

    from srmoa_dist.serve.app import _generation_error
    from srmoa_dist.serve.errors import APIError

    app_err = RayTaskError("generate", "Traceback ...", KeyError("boom")).as_instanceof_cause()
    e = _generation_error(app_err)
    assert e.status == 500 and "Retry-After" not in e.headers
    nested = RayTaskError("generate", "Traceback ...", GetTimeoutError("shard")).as_instanceof_cause()
    assert _generation_error(nested).status == 503 and _generation_error(nested).headers["Retry-After"]
    assert _generation_error(ActorDiedError()).status == 503
    assert "Retry-After" not in APIError(400, "bad", headers={"Retry-After": "1"}).headers
    assert APIError(503, "busy", headers={"Retry-After": "1"}).headers == {"Retry-After": "1"}


def test_admin_key_guards_learning_and_writing_routes(ray_cluster, serve_port, tmp_path_factory,
                                                      e2e_tiny_model_dir, model_id):
    """User key + admin key: the user key chats and reads; teaching and rolling back need the admin key
    (403 with the user key, 401 without a key), and the answer says what to send."""
    from e2e_support import API_KEY, tiny_app_config
    from ray import serve

    from srmoa_dist.serve.app import build_app
    from srmoa_dist.serve.local import build_args, wait_ready

    admin = "test-admin-key"
    cfg = tiny_app_config(tmp_path_factory.mktemp("roles") / "data", e2e_tiny_model_dir,
                          serve={"api_key": API_KEY, "admin_key": admin})
    serve.run(build_app(build_args(cfg)), name="srmoa-roles", route_prefix="/roles", blocking=False)
    base = f"http://127.0.0.1:{serve_port}/roles"
    user_h, admin_h = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {admin}"}
    fb = {"prompt": "2+2?", "response": "4", "verdict": "correct"}
    try:
        wait_ready(base, cfg, 120)                                        # probes need no key
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.get("/healthz").status_code == 200
            for h in (user_h, admin_h):                                   # both keys chat and read
                ok = c.post("/v1/chat/completions", headers=h,
                            json={"model": model_id, "messages": Q, "max_tokens": 2})
                assert ok.status_code == 200, ok.text
                assert c.get("/v1/edits", headers=h).status_code == 200
            e = _error(c.post("/v1/feedback", json=fb, headers=user_h), 403, "admin_key_required")
            assert e["type"] == "permission_error" and "admin key" in e["message"]
            e = _error(c.post("/v1/feedback", json=fb), 401, "admin_key_required")
            assert "Authorization: Bearer <admin key>" in e["message"]
            _error(c.post("/v1/feedback", json=fb, headers={"Authorization": "Bearer nope"}), 401,
                   "invalid_api_key")
            _error(c.delete("/v1/edits/edit-nope", headers=user_h), 403, "admin_key_required")
            _error(c.get("/v1/models"), 401, "invalid_api_key")
            r = c.post("/v1/feedback", json=fb, headers=admin_h)
            assert r.status_code == 202 and r.json()["status"] == "skipped"
            _error(c.delete("/v1/edits/edit-nope", headers=admin_h), 404, "edit_not_found")
    finally:
        serve.delete("srmoa-roles")


def test_keys_are_never_saved_and_can_come_from_secret_files(tmp_path, monkeypatch):
    from srmoa_dist.config import SrmoaConfig
    from srmoa_dist.runtime.store_init import CONFIG_FILE, save_config
    from srmoa_dist.serve.app import resolve_admin_key, resolve_api_key
    from srmoa_dist.serve.local import without_keys

    cfg = SrmoaConfig(data_dir=str(tmp_path)).replace(data_dir=str(tmp_path))
    cfg = cfg.replace(serve=cfg.serve.__class__(api_key="user-secret", admin_key="admin-secret"))
    save_config(without_keys(cfg))                    # what `srmoa serve` (local.start) writes
    text = (tmp_path / CONFIG_FILE).read_text()
    assert "user-secret" not in text and "admin-secret" not in text
    assert SrmoaConfig.load_yaml(tmp_path / CONFIG_FILE).serve.api_key is None

    for var in ("SRMOA_API_KEY", "SRMOA_ADMIN_KEY", "SRMOA_API_KEY_FILE", "SRMOA_ADMIN_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    bare = SrmoaConfig(data_dir=str(tmp_path))
    assert resolve_api_key(bare) is None and resolve_admin_key(bare) is None
    (tmp_path / "api.key").write_text("from-file\n")
    (tmp_path / "admin.key").write_text("admin-from-file")
    monkeypatch.setenv("SRMOA_API_KEY_FILE", str(tmp_path / "api.key"))
    monkeypatch.setenv("SRMOA_ADMIN_KEY_FILE", str(tmp_path / "admin.key"))
    assert resolve_api_key(bare) == "from-file" and resolve_admin_key(bare) == "admin-from-file"
    monkeypatch.setenv("SRMOA_API_KEY", "from-env")
    assert resolve_api_key(bare) == "from-env"         # the variable wins over the file
    monkeypatch.setenv("SRMOA_ADMIN_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(ValueError, match="SRMOA_ADMIN_KEY_FILE"):
        resolve_admin_key(bare)
    with pytest.raises(ValueError, match="serve.admin_key must differ"):
        cfg.serve.__class__(api_key="same", admin_key="same")
