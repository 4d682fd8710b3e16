"""The Ingress's request metrics (see runtime/metrics.py): every HTTP request counted by route
template (``/v1/feedback/{job_id}``, not the id: a bounded label set), status code and namespace,
and timed to the start of its response. Installed as the outermost middleware, so a 401 of the
auth middleware is counted too."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request

from srmoa_dist.runtime import metrics

UNMATCHED = "unmatched"          # the route label of a path no route serves (a 404)


def route_label(request: Request) -> str:
    """The template of the route that served `request`, else "unmatched"."""
    route = request.scope.get("route")
    return str(getattr(route, "path", None) or UNMATCHED)


def request_namespace(request: Request) -> str | None:
    """The namespace a request is counted under: `request.state.namespace` when a middleware set it,
    else the tenant of its bearer key (serve/tenants.py, `app.state.tenants`), else None (default)."""
    ns = getattr(request.state, "namespace", None)
    if ns:
        return str(ns)
    tenants = getattr(request.app.state, "tenants", None)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if tenants is None or scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return tenants.namespace_of(token.strip())
    except Exception:               # a metric label never fails a request
        return None


def install_http_metrics(app: FastAPI) -> None:
    """Count and time every request of `app` (add it after the other middlewares: it wraps them)."""

    @app.middleware("http")
    async def _http_metrics(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = route_label(request)
            ns = request_namespace(request)
            metrics.inc("srmoa_requests", route=route, status=str(status),
                        namespace=metrics.namespace_label(ns))
            metrics.observe("srmoa_request_seconds", time.perf_counter() - t0, route=route)


__all__ = ["install_http_metrics", "request_namespace", "route_label", "UNMATCHED"]
