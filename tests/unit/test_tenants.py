"""Tenant keys -> namespaces: the keys file, and the auth middleware's caller on a real FastAPI app."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from srmoa_dist.serve.errors import APIError
from srmoa_dist.serve.experts_api import routing_key, split_model
from srmoa_dist.serve.tenants import Caller, Tenants, caller, read_keys_file, resolve_tenants


def test_keys_file(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("# comment\n\nk-a  team-a\nk-b team-b\n")
    assert read_keys_file(f) == {"k-a": "team-a", "k-b": "team-b"}
    monkeypatch.setenv("SRMOA_API_KEYS_FILE", str(f))
    t = resolve_tenants(None, "shared")
    assert t.namespace_of("k-b") == "team-b" and t.namespace_of("nope") is None and t.namespace_of("") is None
    assert t.caller("team-a").reach == ("team-a", "shared")
    assert Caller("shared").reach == ("shared",)
    for text, match in (("k-a\n", "expected"), ("k-a bad/ns\n", "namespace"), ("k a\nk b\n", "twice")):
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_keys_file(f)
    with pytest.raises(ValueError, match="cannot be read"):
        read_keys_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="shared_namespace"):
        Tenants({}, "bad name")


def _app(tenants: Tenants, user: str | None = None, admin: str | None = None) -> TestClient:
    from srmoa_dist.serve.app import _auth

    app = FastAPI()
    app.middleware("http")(_auth)
    app.state.api_key, app.state.admin_key, app.state.tenants = user, admin, tenants

    @app.get("/v1/whoami")
    async def whoami() -> dict:
        c = caller()
        return {"namespace": c.namespace, "reach": list(c.reach), "admin": c.admin}

    @app.post("/v1/feedback")
    async def feedback() -> dict:
        return {"namespace": caller().namespace}

    @app.post("/v1/experts")
    async def import_() -> dict:
        return {"admin": caller().admin}

    return TestClient(app)


def test_the_middleware_sets_the_callers_namespace():
    t = Tenants({"k-a": "a", "k-b": "b"}, "shared")
    c = _app(t, admin="adm")
    bearer = lambda k: {"Authorization": f"Bearer {k}"}   # noqa: E731
    assert c.get("/v1/whoami", headers=bearer("k-a")).json() == {"namespace": "a", "reach": ["a", "shared"],
                                                                 "admin": False}
    assert c.get("/v1/whoami", headers=bearer("k-b")).json()["namespace"] == "b"
    adm = c.get("/v1/whoami", headers=bearer("adm")).json()
    assert adm == {"namespace": "default", "reach": ["default", "shared"], "admin": True}
    assert c.get("/v1/whoami").status_code == 401
    assert c.get("/v1/whoami", headers=bearer("x")).status_code == 401
    assert c.post("/v1/feedback", headers=bearer("k-b")).json() == {"namespace": "b"}   # it teaches itself
    assert c.post("/v1/experts", headers=bearer("k-a")).status_code == 403             # imports: the admin's
    assert c.post("/v1/experts", headers=bearer("adm")).json() == {"admin": True}
    open_app = _app(Tenants())                                    # no key at all: the operator, default
    assert open_app.get("/v1/whoami").json() == {"namespace": "default", "reach": ["default", "shared"],
                                                 "admin": True}


def test_split_model_and_routing_key():
    assert split_model("m", "m") is None and split_model("m:brellin", "m") == "brellin"
    assert split_model("org/m:x:y", "org/m:x") == "y"
    for bad in ("other", "m:", "other:x"):
        with pytest.raises(APIError) as e:
            split_model(bad, "m")
        assert e.value.status == 404 and e.value.param == "model"
    import numpy as np

    q = np.array([[3.0, 0.0], [0.0, 1.0]], np.float32)
    k = routing_key(q)
    assert np.allclose(k, [2 ** -0.5, 2 ** -0.5])                # mean of the normalized queries, normalized
    with pytest.raises(ValueError):
        routing_key(np.zeros((0, 2)))
