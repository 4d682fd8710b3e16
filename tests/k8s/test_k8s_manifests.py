"""k8s/: every manifest parses and validates (KubeRay CRDs, core kinds), with negative cases."""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
from manifest_tools import CRD_KINDS, K8S_DIR, errors_of, load_docs, strict_schema

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayCluster": 53, "RayService": 47}      # KubeRay v1.7.0 MaxRay{Cluster,Service}NameLength


def test_every_manifest_parses(manifests):
    assert set(manifests) >= {"rayservice.yaml", "raycluster.yaml", "redis.yaml", "storage.yaml",
                              "secrets.yaml", "podmonitor.yaml", "backup.yaml"}
    kinds = set()
    for name, docs in manifests.items():
        assert docs, f"{name} holds no document"
        for d in docs:
            assert isinstance(d, dict) and {"apiVersion", "kind", "metadata"} <= set(d), f"{name}: {d!r:.80}"
            assert DNS1123.match(d["metadata"]["name"]), f"{name}: bad name {d['metadata']['name']!r}"
            kinds.add(d["kind"])
    assert kinds >= {"RayService", "RayCluster", "PodMonitor", "Deployment", "Service",
                     "PersistentVolumeClaim", "Secret", "CronJob"}


def test_no_duplicate_objects(all_docs):
    keys = [(d["kind"], d["metadata"]["name"]) for _, d in all_docs]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


@pytest.mark.parametrize("kind", ["RayService", "RayCluster"])
def test_ray_documents_validate_against_kuberay_crds(kind, all_docs, crd_validate):
    docs = [d for _, d in all_docs if d["kind"] == kind]
    assert docs
    for d in docs:
        assert crd_validate(d) == [], d["metadata"]["name"]
        assert DNS1035.match(d["metadata"]["name"]) and len(d["metadata"]["name"]) <= MAX_NAME[kind]


def test_ray_metadata_and_pod_templates_validate_as_core_objects(all_docs, core_validate, groups_of):
    """The CRDs leave metadata untyped and pod templates' metadata loose: check both with k8s schemas."""
    for _, d in all_docs:
        if d["kind"] not in ("RayService", "RayCluster"):
            continue
        assert core_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": d["metadata"]}) == []
        for group, spec in groups_of(d):
            tmpl = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                    "template": spec["template"]}
            assert core_validate(tmpl) == [], f"{d['metadata']['name']}/{group}"


def test_core_kinds_validate_strictly(all_docs, core_validate):
    checked = 0
    for name, d in all_docs:
        if d["kind"] in CRD_KINDS:
            continue
        assert core_validate(d) == [], f"{name}: {d['kind']}/{d['metadata']['name']}"
        checked += 1
    assert checked >= 7


PODMONITOR_SCHEMA = {   # the fields used here, from monitoring.coreos.com/v1 PodMonitor
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {
                        "port": {"type": "string"}, "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                        "path": {"type": "string"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"action": {"enum": ["replace", "keep", "drop", "labelmap"]},
                                           "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                           "targetLabel": {"type": "string"},
                                           "regex": {"type": "string"}}}},
                    }}},
            }},
    },
}


def test_podmonitor_scrapes_the_ray_metrics_port(manifests, all_docs, groups_of):
    (pm,) = manifests["podmonitor.yaml"]
    assert errors_of(jsonschema.Draft7Validator(PODMONITOR_SCHEMA), pm) == []
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert "metrics" in ports
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.get("ray.io/is-ray-node") == "yes"        # set by KubeRay on every Ray pod
    own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
    named: dict[str, int] = {}
    for _, d in all_docs:
        if d["kind"] not in ("RayService", "RayCluster"):
            continue
        for group, spec in groups_of(d):
            labels = spec["template"]["metadata"]["labels"]
            assert own.items() <= labels.items(), f"{d['metadata']['name']}/{group} not selected"
            for p in spec["template"]["spec"]["containers"][0].get("ports", []):
                named[p["name"]] = p["containerPort"]
    assert named["metrics"] == 8080
    assert ports <= set(named), f"endpoints without a named container port: {ports - set(named)}"


# -- negative cases: each validator catches a broken document -------------------------------------------


EXPECTED = {   # how the RayService is broken -> text the validator's error must contain
    "typo": "'rayStartParam' was unexpected",
    "wrong type": "'8' is not of type 'integer'",
    "missing required": "'groupName' is a required property",
    "bad enum": "'Eager' is not one of",
    "typo in pod template": "'imagePullPolicyy' was unexpected",
    "wrong type in pod template": "'90s' is not of type 'integer'",
    "typo at the top": "'serveConfig' was unexpected",
}


def _broken(rayservice: dict[str, Any], how: str) -> dict[str, Any]:
    d = copy.deepcopy(rayservice)
    spec = d["spec"]["rayClusterConfig"]
    worker = spec["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]
    if how == "typo":                      # an optional field: only the strict schema notices
        worker["rayStartParam"] = worker.pop("rayStartParams")
    elif how == "wrong type":
        worker["maxReplicas"] = "8"
    elif how == "missing required":
        del worker["groupName"]
    elif how == "bad enum":
        spec["autoscalerOptions"]["upscalingMode"] = "Eager"
    elif how == "typo in pod template":
        pod["containers"][0]["imagePullPolicyy"] = "Always"
    elif how == "wrong type in pod template":
        pod["terminationGracePeriodSeconds"] = "90s"
    elif how == "typo at the top":
        d["spec"]["serveConfig"] = d["spec"].pop("serveConfigV2")
    else:
        raise AssertionError(how)
    return d


@pytest.mark.parametrize("how", sorted(EXPECTED))
def test_crd_validator_catches(how, rayservice, crd_validate):
    errors = crd_validate(_broken(rayservice, how))
    assert any(EXPECTED[how] in e for e in errors), f"{how}: not caught as expected: {errors}"


def test_unknown_fields_need_the_strict_schema(rayservice, crd_openapi_schemas):
    """The CRD as shipped accepts a typo'd optional field (the API server would drop it silently)."""
    loose = jsonschema.Draft4Validator(crd_openapi_schemas["RayService"])
    assert errors_of(loose, _broken(rayservice, "typo")) == []


def test_crd_validator_keeps_maps_open(rayservice, crd_validate):
    """Maps (labels, rayStartParams, group resources) take any key: strictness must not close them."""
    d = copy.deepcopy(rayservice)
    worker = d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    worker["rayStartParams"]["any-flag"] = "1"
    worker["template"]["metadata"]["labels"]["example.com/anything"] = "x"
    worker.setdefault("resources", {})["my_resource"] = "3"
    assert crd_validate(d) == []


def test_strict_schema_respects_preserve_unknown_fields():
    schema = {"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "integer"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "string"}}}},
    }}
    v = jsonschema.Draft4Validator(strict_schema(schema))
    assert v.is_valid({"open": {"a": 1, "zzz": 2}, "map": {"k": "v"}, "list": [{"b": "x"}]})
    assert not v.is_valid({"closed": {"a": 1, "zzz": 2}})
    assert not v.is_valid({"list": [{"bb": "x"}]})
    assert not v.is_valid({"zzz": 1})
    assert "additionalProperties" not in schema            # the input is left alone


@pytest.mark.parametrize("how", ["typo", "wrong type", "missing required"])
def test_core_validator_catches(how, manifests, core_validate):
    deployment = next(d for d in manifests["redis.yaml"] if d["kind"] == "Deployment")
    d = copy.deepcopy(deployment)
    container = d["spec"]["template"]["spec"]["containers"][0]
    if how == "typo":
        d["spec"]["replica"] = d["spec"].pop("replicas")
    elif how == "wrong type":
        container["ports"][0]["containerPort"] = "6379"
    else:
        del container["name"]
    assert core_validate(d), f"{how}: not caught"


def test_core_validator_catches_broken_claim_and_cronjob(manifests, core_validate):
    (pvc,) = manifests["storage.yaml"]
    bad = copy.deepcopy(pvc)
    bad["spec"]["accessMode"] = bad["spec"].pop("accessModes")
    assert core_validate(bad)
    (cron,) = manifests["backup.yaml"]
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = 0
    assert core_validate(bad)


def test_files_are_read_as_yaml_streams(tmp_path):
    p = tmp_path / "two.yaml"
    p.write_text("a: 1\n---\n# only a comment\n---\nb: 2\n")
    assert load_docs(p) == [{"a": 1}, {"b": 2}]
    assert sorted(p.name for p in K8S_DIR.glob("*.yml")) == [], "use the .yaml extension"
