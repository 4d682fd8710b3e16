"""OpenAI-style error bodies and the FastAPI handlers that produce them.

Every error the HTTP API returns has the shape OpenAI clients parse::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": "..."}}

No handler ever returns a stack trace: unexpected exceptions become a 500 with a generic message
(the trace goes to the log, with the request id). `Retry-After` is for transient conditions only
(503 busy or unavailable, 429): an error that the same request would meet again (bad input, any other
4xx) never carries it, whoever builds it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# OpenAI's error types by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style body; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        fallback = "invalid_request_error" if status < 500 else "server_error"
        self.type = type or _TYPES.get(self.status, fallback)
        self.headers = dict(headers or {})
        if not retryable(self.status):
            for h in [h for h in self.headers if h.lower() == "retry-after"]:
                del self.headers[h]             # a deterministic error: retrying cannot help

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def retryable(status: int) -> bool:
    """Whether an error of this status may carry Retry-After (the condition is transient)."""
    return status in (429, 503)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def overloaded(message: str = "the server is overloaded; retry later", retry_after_s: int = 1) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(max(1, int(retry_after_s)))})


def unauthorized(message: str, code: str = "invalid_api_key") -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def forbidden(message: str, code: str = "admin_key_required") -> APIError:
    return APIError(403, message, code=code)


# pydantic puts the tried union member in the location ('prompt', 'str'): not a field name.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|tuple|.*\[.*\]|function-.*|json-or-python.*)$")


def _loc_to_param(loc: tuple | list) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and _TYPE_TAG.match(p))]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """A pydantic/FastAPI validation error -> 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    if kind in ("json_invalid", "value_error.jsondecode"):
        return bad_request(f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    cause = (first.get("ctx") or {}).get("error")      # a FieldError of a model validator names its field
    param = _loc_to_param(first.get("loc", ())) or getattr(cause, "param", None)
    if param is None and tuple(first.get("loc", ())) == ("body",):     # the body itself (a list, a number)
        return bad_request(f"the request body must be a JSON object: {first.get('msg', '')}",
                           param="body", code="invalid_type")
    if kind == "missing":
        msg = f"missing required parameter '{param}'"
        code = "missing_required_parameter"
    else:
        what = first.get("msg", "invalid").removeprefix("Value error, ")
        msg = f"invalid value for '{param}': {what}" if param else what
        code = "invalid_value" if kind != "model_attributes_type" else "invalid_type"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error(s))"
    return bad_request(msg, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error leaves the app as an OpenAI-style JSON body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            msg = f"unknown route {request.method} {request.url.path}"
            code = "unknown_route"
        elif status == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
            code = "method_not_allowed"
        elif status == 400 and "parsing the body" in str(exc.detail):   # FastAPI: undecodable bytes
            msg = "the request body could not be read: send UTF-8 JSON with 'Content-Type: application/json'"
            code = "invalid_json"
        else:
            msg = str(exc.detail)
            code = None
        return APIError(status, msg, code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return bad_request(f"the request body is not valid JSON: {exc.msg}", code="invalid_json").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        log.exception("unhandled error on %s %s (error id %s)", request.method, request.url.path, rid)
        return APIError(500, f"internal server error (error id {rid})", code="internal_error").response()


__all__ = [
    "APIError", "error_body", "retryable", "bad_request", "not_found", "overloaded", "unauthorized",
    "forbidden", "validation_error", "install_error_handlers",
]
