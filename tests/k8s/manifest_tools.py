"""Helpers of the deployment tests: paths, YAML loading, strict CRD schemas, Ray group walking.

KubeRay's CRDs are read in place from ``$SRMOA_SHARED_DIR/kuberay`` (default ``../shared/kuberay``
next to the repository); tests that need them skip, saying so, where that folder is absent.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
CLUSTER_DIR = REPO / "cluster"
SERVE_CONFIG = REPO / "serve_config.yaml"
K8S_VERSION = "1.33.0"          # Kubernetes schemas kubernetes-validate checks core kinds against
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}
CRD_KINDS = frozenset(CRD_FILES) | {"PodMonitor"}   # kinds kubernetes-validate has no schema for


def kuberay_dir() -> Path:
    shared = os.environ.get("SRMOA_SHARED_DIR")
    return (Path(shared) if shared else REPO.parent / "shared") / "kuberay"


SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)    # libyaml: the CRDs are 18k lines each


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=SafeLoader) if d is not None]


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects unknown fields.

    Every object schema with ``properties`` and no ``additionalProperties`` gets
    ``additionalProperties: false`` (what the API server's pruning would silently drop), except where
    ``x-kubernetes-preserve-unknown-fields`` keeps unknown fields. Maps (``additionalProperties``
    given) and free-form objects stay as they are.
    """
    # "properties" maps field names to schemas: walk their values, never treat the map itself as a schema.
    def walk_schema(node: Any) -> Any:
        if isinstance(node, list):
            return [walk_schema(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k in ("properties", "patternProperties", "definitions"):
                out[k] = {name: walk_schema(sub) for name, sub in v.items()}
            elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
                out[k] = walk_schema(v)
            elif k in ("anyOf", "allOf", "oneOf", "items") and isinstance(v, list):
                out[k] = [walk_schema(x) for x in v]
            else:
                out[k] = copy.deepcopy(v)
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out

    return walk_schema(schema)


def errors_of(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def ray_groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, group spec) of a RayCluster or RayService, head first ("head")."""
    spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
