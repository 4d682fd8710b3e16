"""The ingress's request labels (serve/http_metrics.py): the route template, not the path, and the
namespace of the caller's tenant key; on a real FastAPI app (no Ray: recording is then a no-op)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from srmoa_dist.serve.http_metrics import install_http_metrics, request_namespace, route_label
from srmoa_dist.serve.tenants import Tenants


def _client() -> TestClient:
    app = FastAPI()
    app.state.tenants = Tenants(keys={"key-a": "team-a"})
    install_http_metrics(app)

    @app.get("/v1/feedback/{job_id}")
    async def job(job_id: str, request: Request) -> dict:
        return {"route": route_label(request), "namespace": request_namespace(request)}

    return TestClient(app)


def test_labels_are_the_route_template_and_the_tenant():
    c = _client()
    assert c.get("/v1/feedback/job-123").json() == {"route": "/v1/feedback/{job_id}", "namespace": None}
    got = c.get("/v1/feedback/x", headers={"Authorization": "Bearer key-a"}).json()
    assert got["namespace"] == "team-a"
    assert c.get("/v1/feedback/x", headers={"Authorization": "Bearer other"}).json()["namespace"] is None
    assert c.get("/no/such/route").status_code == 404         # counted as route "unmatched", not failed
