"""Fixtures of the deployment tests: the manifests in k8s/, their validators, the Serve config.

KubeRay's CRDs are read in place from ``$SRMOA_SHARED_DIR/kuberay`` (default ``../shared/kuberay``
next to the repository); tests that need them skip, saying so, where that folder is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import yaml
from manifest_tools import (
    CRD_FILES,
    K8S_DIR,
    K8S_VERSION,
    SERVE_CONFIG,
    cluster_spec,
    errors_of,
    kuberay_dir,
    load_docs,
    ray_groups,
    strict_schema,
)


@pytest.fixture(scope="session")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """k8s/*.yaml and k8s/jobs/*.yaml by path relative to k8s/ -> its documents."""
    paths = sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("jobs/*.yaml"))
    return {p.relative_to(K8S_DIR).as_posix(): load_docs(p) for p in paths}


@pytest.fixture(scope="session")
def all_docs(manifests: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, d) for name, docs in manifests.items() for d in docs]


def _one(all_docs: list[tuple[str, dict[str, Any]]], kind: str) -> dict[str, Any]:
    found = [d for _, d in all_docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in k8s/, found {len(found)}"
    return found[0]


@pytest.fixture(scope="session")
def rayservice(all_docs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return _one(all_docs, "RayService")


@pytest.fixture(scope="session")
def raycluster(all_docs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return _one(all_docs, "RayCluster")


@pytest.fixture(scope="session")
def serve_config() -> dict[str, Any]:
    with open(SERVE_CONFIG) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def crd_openapi_schemas() -> dict[str, dict[str, Any]]:
    """openAPIV3Schema (version v1) of each KubeRay CRD as shipped, by kind."""
    root = kuberay_dir()
    if not root.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {root}: set SRMOA_SHARED_DIR to the folder holding kuberay/")
    out = {}
    for kind, fname in CRD_FILES.items():
        crd = load_docs(root / fname)[0]
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = version["schema"]["openAPIV3Schema"]
    return out


@pytest.fixture(scope="session")
def crd_schemas(crd_openapi_schemas: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The same, strict: unknown fields rejected where the schema does not preserve them."""
    return {kind: strict_schema(s) for kind, s in crd_openapi_schemas.items()}


@pytest.fixture(scope="session")
def crd_validate(crd_schemas: dict[str, dict[str, Any]]) -> Callable[[dict[str, Any]], list[str]]:
    """doc -> errors against its kind's strict CRD schema (Draft 4, as OpenAPI v3 schemas are)."""
    validators = {k: jsonschema.Draft4Validator(s) for k, s in crd_schemas.items()}

    def validate(doc: dict[str, Any]) -> list[str]:
        assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
        return errors_of(validators[doc["kind"]], doc)

    return validate


@pytest.fixture(scope="session")
def core_validate() -> Callable[[dict[str, Any]], list[str]]:
    """doc -> errors from kubernetes-validate (strict: unknown fields rejected), offline; the first only."""
    import kubernetes_validate

    def validate(doc: dict[str, Any]) -> list[str]:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"]
        return []

    return validate


@pytest.fixture(scope="session")
def groups_of() -> Callable[[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    return lambda doc: list(ray_groups(doc))


@pytest.fixture(scope="session")
def spec_of() -> Callable[[dict[str, Any]], dict[str, Any]]:
    return cluster_spec
