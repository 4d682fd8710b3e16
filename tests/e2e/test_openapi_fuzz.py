"""The OpenAPI document of the live app (/openapi.json, the offline /docs page) and a schemathesis fuzz
of every route in it against the session's app (the tiny random Llama): no 5xx, success bodies as the
spec says, every error an OpenAI-style JSON body naming its parameter.

POST /v1/feedback is fuzzed with invalid bodies only (a valid one would queue a training job on the
session's shared trainer for every example); each generated body is checked to be one FeedbackRequest
refuses before it is sent.
"""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.ray

ROUTES = [
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/feedback"),
    ("GET", "/v1/feedback/{job_id}"), ("GET", "/v1/edits"), ("DELETE", "/v1/edits/{edit_id}"),
    ("GET", "/v1/experts/{expert_id}"), ("GET", "/v1/stats"),
    ("GET", "/v1/feedback"), ("GET", "/v1/experts"), ("POST", "/v1/experts"),
    ("GET", "/v1/experts/{expert_id}/adapter"), ("DELETE", "/v1/experts/{expert_id}"),
    ("GET", "/v1/keyspace"),
]
EXAMPLES = 30          # per operation and generation mode: about a minute of requests on 2 cores
NO_PARAM_CODES = {"invalid_json", "invalid_api_key", "admin_key_required", "overloaded", "unavailable",
                  "not_ready"}
CASES: dict[str, int] = {}


@pytest.fixture(scope="module")
def spec(url):
    import httpx

    r = httpx.get(f"{url}/openapi.json", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    return r.json()


@pytest.fixture(scope="module")
def api_schema(url, spec):
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=url)
    return schema


def test_openapi_lists_every_route_with_openai_errors(spec):
    ops = {(m.upper(), p) for p, o in spec["paths"].items() for m in o}
    assert ops == set(ROUTES)
    for path, o in spec["paths"].items():
        for method, op in o.items():
            assert "422" not in op["responses"], (method, path)        # bad input is a 400
            if path not in ("/healthz", "/readyz"):
                err = op["responses"]["400"]["content"]["application/json"]["schema"]
                assert err == {"$ref": "#/components/schemas/ErrorResponse"}
    err = spec["components"]["schemas"]["ErrorDetail"]
    assert set(err["properties"]) == {"message", "type", "param", "code"}
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest")
    assert "ChatCompletion" in json.dumps(chat["responses"]["200"])


def test_docs_page_works_offline(http, spec):
    r = http.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for method, path in ROUTES:
        assert f"<code>{path}</code>" in page and f"<b>{method}</b>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page   # no CDN


@pytest.mark.parametrize("body", [[], 3, "text", None])
def test_a_body_that_is_not_an_object_names_the_body(http, body):
    """The case schemathesis found: a JSON array (or number, string, null) as the whole body."""
    for path in ("/v1/feedback", "/v1/chat/completions"):
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == "body" and err["code"] == "invalid_type", (path, err)
        assert "must be a JSON object" in err["message"]


def _check_error_body(response, case) -> None:
    """Every 4xx/5xx is {"error": {message, type, param, code}}; a 4xx about the request names the
    parameter (`param`), unless no single parameter is at fault (JSON syntax, auth, load)."""
    where = f"{case.method} {case.formatted_path} body={case.body!r:.300} -> {response.status_code}"
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), where
    body = json.loads(response.content)
    assert set(body) == {"error"}, (where, body)
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err) and err["message"], (where, body)
    assert "Traceback" not in response.text, where
    if response.status_code in (400, 404) and err["code"] not in NO_PARAM_CODES:
        assert err["param"], (where, body)


def _run(op, mode: GenerationMode, url: str, examples: int, accept=None) -> int:
    sent = {"n": 0}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        case = data.draw(op.as_strategy(generation_mode=mode))
        if accept is not None:
            assume(accept(case))
        response = case.call(base_url=url, timeout=120)
        sent["n"] += 1
        assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])
        _check_error_body(response, case)

    fuzz()
    return sent["n"]


def _invalid_feedback(case) -> bool:
    from pydantic import ValidationError

    from srmoa_dist.serve.schemas import FeedbackRequest

    if not isinstance(case.body, dict):
        return True
    try:
        FeedbackRequest.model_validate(case.body)
    except ValidationError:
        return True
    return False


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_fuzz_route(api_schema, url, method, path):
    op = api_schema[path][method]
    has_input = bool(op.definition.raw.get("parameters") or op.definition.raw.get("requestBody"))
    n = 0
    if (method, path) == ("POST", "/v1/feedback"):
        n += _run(op, GenerationMode.NEGATIVE, url, EXAMPLES * 2, accept=_invalid_feedback)
    else:
        n += _run(op, GenerationMode.POSITIVE, url, EXAMPLES if has_input else 3)
        if has_input:
            n += _run(op, GenerationMode.NEGATIVE, url, EXAMPLES)
    CASES[f"{method} {path}"] = n
    assert n > 0
    print(f"fuzzed {method} {path}: {n} requests")


def test_a_full_store_behind_an_actor_call_is_a_507_saying_what_to_do():
    from ray.exceptions import RayTaskError

    from srmoa_dist.experts.shard import DiskFullError, ShardFullError
    from srmoa_dist.serve.app import _store_full_error

    full = ShardFullError("shard /d/shard-000 is full: ...; raise store.max_map_size_mb in the config")
    disk = DiskFullError("free disk space")
    for err in (full, RayTaskError("put_raw", "Traceback ...", full).as_instanceof_cause(),
                RayTaskError("put_raw", "Traceback ...", disk).as_instanceof_cause()):
        e = _store_full_error(err)
        assert e is not None and e.status == 507 and e.code == "storage_full", err
        assert "Retry-After" not in e.headers and "Traceback" not in e.message
        assert ("store.max_map_size_mb" in e.message) or ("free disk space" in e.message)
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    assert _store_full_error(RayTaskError("get", "tb", KeyError("x")).as_instanceof_cause()) is None
