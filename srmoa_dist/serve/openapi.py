"""The HTTP API's OpenAPI document (GET /openapi.json) and an offline docs page (GET /docs).

FastAPI generates the paths and request schemas from the routes; :func:`openapi_spec` then writes
down what the handlers of serve/errors.py really send: no route answers 422 (bad input is a 400),
every error is an OpenAI-style body (``ErrorResponse``), and the routes that return plain dicts get
their response model. The docs page is plain HTML rendered from the spec on the server: no
JavaScript, no CDN, so it works on a cluster without internet access.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from srmoa_dist.serve.schemas import (
    ChatCompletion,
    Completion,
    EditList,
    ExpertInfo,
    FeedbackJob,
    ModelList,
)

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
UI_PAGE = "/ui"                  # the key-space page (static; the data it polls needs the key)
PUBLIC_PATHS = ("/healthz", "/readyz", OPENAPI_PATH, DOCS_PATH, UI_PAGE)   # no key needed


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the API returns: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


# (method, path) -> (success status, response model, also streams server-sent events)
_SUCCESS: dict[tuple[str, str], tuple[str, type[BaseModel] | None, bool]] = {
    ("post", "/v1/chat/completions"): ("200", ChatCompletion, True),
    ("post", "/v1/completions"): ("200", Completion, True),
    ("get", "/v1/models"): ("200", ModelList, False),
    ("post", "/v1/feedback"): ("202", FeedbackJob, False),
    ("get", "/v1/feedback/{job_id}"): ("200", FeedbackJob, False),
    ("get", "/v1/edits"): ("200", EditList, False),
    ("get", "/v1/experts/{expert_id}"): ("200", ExpertInfo, False),
}

_ERRORS = {
    "400": "Bad input: the body, a parameter or a limit; `error.param` names the field",
    "401": "Missing or invalid API key (send 'Authorization: Bearer <key>')",
    "403": "The user key may not use this route (send the admin key)",
    "404": "Unknown model, job, edit, expert or route",
    "409": "The edit cannot be rolled back",
    "500": "An application error (retrying the same request meets it again)",
    "503": "Transient: busy, restarting or not ready (Retry-After says when to retry)",
    "507": "The expert store is full (a shard's map or its disk): the message says what to raise or free",
}
_PROBE_ERRORS = ("503",)


def openapi_spec(app: FastAPI, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes, as the error handlers answer them."""
    spec = get_openapi(title=app.title, version=version, routes=app.routes,
                       description=(app.description or None))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorDetail, ErrorResponse, *{m for _, m, _ in _SUCCESS.values() if m is not None}):
        _add_schema(schemas, model)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            status, model, streams = _SUCCESS.get((method, path), (None, None, False))
            if model is not None:
                content: dict[str, Any] = {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
                if streams:
                    content["text/event-stream"] = {"schema": {"type": "string"}}
                responses.pop("200", None)
                responses[status] = {"description": "Success", "content": content}
            public = path in PUBLIC_PATHS
            for code, desc in _ERRORS.items():
                if public and code not in _PROBE_ERRORS:
                    continue
                responses[code] = {"description": desc,
                                   "content": {"application/json": {"schema": error_ref}}}
            if not public:
                op["security"] = [{"bearer": []}]
    return spec


def _add_schema(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in js.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = js


def install_openapi(app: FastAPI, version: str) -> None:
    """Make `app.openapi()` (what FastAPI serves at openapi_url) return :func:`openapi_spec`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_spec(app, version)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def docs_html(spec: dict[str, Any]) -> str:
    """A self-contained HTML page listing every operation of `spec`: method, path, summary,
    parameters, request body and responses (no scripts, no external assets)."""
    e = html.escape
    rows = []
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(f"{p['name']} ({p.get('in')})" for p in op.get("parameters", []))
            body = _ref_names(op.get("requestBody", {}).get("content", {}))
            responses = "; ".join(
                f"{code} {_ref_names(r.get('content', {})) or ''}".strip()
                for code, r in op.get("responses", {}).items())
            auth = "key" if op.get("security") else "none"
            rows.append(
                f"<tr><td><b>{e(method.upper())}</b></td><td><code>{e(path)}</code></td>"
                f"<td>{e(op.get('summary', ''))}</td><td>{e(params)}</td><td>{e(body)}</td>"
                f"<td>{e(responses)}</td><td>{auth}</td></tr>")
    info = spec.get("info", {})
    title = e(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "</style></head><body>"
        f"<h1>{title}</h1><p>The full OpenAPI document: <a href='{OPENAPI_PATH}'>{OPENAPI_PATH}</a>. "
        "Errors are OpenAI-style bodies <code>{\"error\": {\"message\", \"type\", \"param\", \"code\"}}"
        "</code>.</p><table><tr><th>Method</th><th>Path</th><th>Summary</th><th>Parameters</th>"
        "<th>Body</th><th>Responses</th><th>Auth</th></tr>" + "".join(rows) + "</table></body></html>")


def _ref_names(content: dict[str, Any]) -> str:
    names = []
    for media, c in content.items():
        ref = c.get("schema", {}).get("$ref", "")
        names.append(ref.rsplit("/", 1)[-1] if ref else media)
    return ", ".join(names)


__all__ = ["ErrorResponse", "ErrorDetail", "openapi_spec", "install_openapi", "docs_html",
           "OPENAPI_PATH", "DOCS_PATH", "PUBLIC_PATHS"]
