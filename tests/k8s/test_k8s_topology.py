"""k8s/: the pieces fit together (store volumes and resources, GPUs, shutdown, secrets, KubeRay's rules).

These are the checks KubeRay's operator or Kubernetes would only make at apply time, or never.
"""

from __future__ import annotations

import re
from typing import Any

from manifest_tools import cluster_spec, ray_groups

from srmoa_dist.config import ServeConfig, StoreConfig

GPU = "nvidia.com/gpu"
QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}


def _bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, q
    return int(m.group(1)) * QUANTITY[m.group(2) or ""]


def _ray_docs(all_docs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for _, d in all_docs if d["kind"] in ("RayService", "RayCluster")]


def _is_store_resource(name: str) -> bool:
    return name in ("srmoa_store", "srmoa_keystore") or name.startswith("srmoa_shard_")


def _store_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Groups holding a store volume: those advertising any srmoa store resource."""
    return [g for name, g in ray_groups(doc) if any(map(_is_store_resource, g.get("resources", {})))]


def _gpu_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for name, g in ray_groups(doc)
            if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]


def _deployment(serve_config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = serve_config["applications"]
    (dep,) = [d for d in app["deployments"] if d["name"] == name]
    return dep


def test_head_runs_no_replicas(all_docs):
    for d in _ray_docs(all_docs):
        head = cluster_spec(d)["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", d["metadata"]["name"]


def test_store_groups_own_one_single_writer_volume(all_docs):
    pvcs = {d["metadata"]["name"]: d for _, d in all_docs if d["kind"] == "PersistentVolumeClaim"}
    claims_by_doc = {}
    for d in _ray_docs(all_docs):
        groups = _store_groups(d)
        assert groups, f"{d['metadata']['name']} has no store group"
        claims = []
        for g in groups:
            assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 1, g["groupName"]
            pod = g["template"]["spec"]
            pvc_volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                           for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert len(pvc_volumes) == 1, g["groupName"]
            (vol, claim), = pvc_volumes.items()
            for c in pod["containers"] + pod.get("initContainers", []):
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert mounts.get("/data") == vol, f"{g['groupName']}/{c['name']} must mount {claim} at /data"
            assert claim in pvcs, f"PVC {claim} is not defined in k8s/"
            assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteOncePod"], claim
            claims.append(claim)
        assert len(claims) == len(set(claims))
        claims_by_doc[d["metadata"]["name"]] = set(claims)
    service, jobs = claims_by_doc["srmoa"], claims_by_doc["srmoa-jobs"]
    assert not service & jobs, "the jobs cluster must not mount the service's store volumes"


def test_store_resources_pin_every_shard_and_the_keystore_once(all_docs):
    n_shards = StoreConfig().n_shards
    for d in _ray_docs(all_docs):
        tokens: list[str] = []
        # srmoa_store marks the primary store node (trainer: ledger, job records; the layout check):
        # exactly one group, the key store's.
        (primary,) = [g for g in _store_groups(d) if "srmoa_store" in g["resources"]]
        assert float(primary["resources"]["srmoa_store"]) >= 1
        assert primary["resources"].get("srmoa_keystore") == "1"
        for g in _store_groups(d):
            res = g["resources"]
            tokens += [k for k in res if k.startswith("srmoa_shard_") or k == "srmoa_keystore"]
            for k, v in res.items():
                if k != "srmoa_store":
                    assert v == "1", f"{k} must be exclusive (capacity 1)"
            # KubeRay v1.7.0 refuses resources given both here and in rayStartParams.
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(g.get("rayStartParams", {}))
            pod = g["template"]["spec"]
            envs = [{e["name"]: e.get("value") for e in c.get("env", [])}
                    for c in pod["containers"] + pod.get("initContainers", [])]
            assert all(e.get("SRMOA_STORE_GROUP") == g["groupName"] for e in envs), g["groupName"]
        expected = sorted([f"srmoa_shard_{i}" for i in range(n_shards)] + ["srmoa_keystore"])
        assert sorted(tokens) == expected, d["metadata"]["name"]


def test_gpu_group_serves_every_model_replica(all_docs, rayservice, serve_config):
    model = _deployment(serve_config, "ModelServer")
    gpus_per_replica = model["ray_actor_options"]["num_gpus"]
    for d in _ray_docs(all_docs):
        groups = _gpu_groups(d)
        assert groups, d["metadata"]["name"]
        for g in groups:
            pod = g["template"]["spec"]
            res = pod["containers"][0]["resources"]
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert pod["nodeSelector"]
            assert g["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
               for g in _gpu_groups(rayservice))
    assert gpus >= model["autoscaling_config"]["max_replicas"] * gpus_per_replica
    assert cluster_spec(rayservice)["enableInTreeAutoscaling"] is True
    assert cluster_spec(rayservice)["autoscalerOptions"]


def test_dev_shm_is_a_sized_memory_volume_above_the_object_store(all_docs):
    for d in _ray_docs(all_docs):
        for name, g in ray_groups(d):
            pod = g["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            vols = {v["name"]: v for v in pod["volumes"]}
            shm = vols[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory", name
            limit = _bytes(shm["sizeLimit"])
            assert int(g["rayStartParams"]["object-store-memory"]) < limit, name
            assert limit < _bytes(pod["containers"][0]["resources"]["limits"]["memory"]), name


def test_graceful_shutdown_is_shorter_than_the_pods_grace_period(rayservice, serve_config):
    (app,) = serve_config["applications"]
    longest = max(d["graceful_shutdown_timeout_s"] + d.get("graceful_shutdown_wait_loop_s", 2)
                  for d in app["deployments"])
    for name, g in ray_groups(rayservice):
        assert g["template"]["spec"]["terminationGracePeriodSeconds"] > longest, name


def test_serve_limits_match_the_srmoa_config(serve_config):
    model = _deployment(serve_config, "ModelServer")
    assert model["max_ongoing_requests"] == ServeConfig().max_ongoing_requests
    assert model["max_queued_requests"] == ServeConfig().max_queued_requests


def test_upgrades_never_start_a_second_store_writer(rayservice):
    """RWOP store volumes and a blue/green cluster (NewCluster) cannot coexist: the upgrade would hang."""
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "None"


def test_gcs_fault_tolerance_points_at_the_redis_service(rayservice, manifests):
    spec = cluster_spec(rayservice)
    ft = spec["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].rsplit(":", 1)
    (svc,) = [d for d in manifests["redis.yaml"] if d["kind"] == "Service"]
    assert svc["metadata"]["name"] == host and int(port) in [p["port"] for p in svc["spec"]["ports"]]
    (dep,) = [d for d in manifests["redis.yaml"] if d["kind"] == "Deployment"]
    redis_env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    (pw,) = [e for e in redis_env if e["name"] == "REDIS_PASSWORD"]
    assert pw["valueFrom"]["secretKeyRef"] == ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    # KubeRay v1.7.0 refuses these next to gcsFaultToleranceOptions.
    head = spec["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"]
    names = {e["name"] for e in head["template"]["spec"]["containers"][0].get("env", [])}
    assert not names & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"}


def _secret_refs(node: Any) -> list[tuple[str, str | None, bool]]:
    """(secret name, key or None for envFrom, optional) of every reference in a document."""
    out: list[tuple[str, str | None, bool]] = []
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            ref = node["secretKeyRef"]
            out.append((ref["name"], ref["key"], bool(ref.get("optional"))))
        if "secretRef" in node:
            out.append((node["secretRef"]["name"], None, bool(node["secretRef"].get("optional"))))
        if "secretName" in node and isinstance(node["secretName"], str):
            out.append((node["secretName"], "auth_token", False))    # KubeRay authOptions.secretName
        for v in node.values():
            out += _secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            out += _secret_refs(v)
    return out


def test_every_secret_reference_resolves(all_docs):
    secrets = {d["metadata"]["name"]: d for _, d in all_docs if d["kind"] == "Secret"}
    refs = [r for _, d in all_docs for r in _secret_refs(d)]
    assert refs
    for name, key, _optional in refs:
        assert name in secrets, f"Secret {name} is referenced but not defined in k8s/secrets.yaml"
        if key is not None:
            assert key in secrets[name]["stringData"], f"Secret {name} has no key {key}"


def test_backup_job_talks_to_the_service_head_and_runs_the_image_tool(manifests, rayservice):
    (cron,) = manifests["backup.yaml"]
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RAY_DASHBOARD"] == f"http://{rayservice['metadata']['name']}-head-svc:8265"
    assert "/opt/srmoa/storetool.py backup-cluster" in " ".join(container["args"])
    assert cluster_spec(rayservice)["authOptions"]["secretName"] == next(
        e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN")


def test_worker_replica_bounds(all_docs):
    for d in _ray_docs(all_docs):
        for name, g in ray_groups(d):
            if name == "head":
                continue
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (d["metadata"]["name"], name)
            assert "labels" not in g.get("rayStartParams", {})


def _claims(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["persistentVolumeClaim"]["claimName"]] if "persistentVolumeClaim" in node else []
        return own + [c for v in node.values() for c in _claims(v)]
    if isinstance(node, list):
        return [c for v in node for c in _claims(v)]
    return []


def test_every_claim_is_defined_and_the_offline_backup_matches_its_group(all_docs, manifests, rayservice):
    pvcs = {d["metadata"]["name"] for _, d in all_docs if d["kind"] == "PersistentVolumeClaim"}
    for name, d in all_docs:
        for claim in _claims(d):
            assert claim in pvcs, f"{name}: claim {claim} is not defined in k8s/"
    (job,) = manifests["jobs/offline-backup.yaml"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    group = container["command"][container["command"].index("--group") + 1]
    (store,) = [g for name, g in ray_groups(rayservice) if name == group]
    assert _claims(job) == _claims(store["template"])
    assert {"name": "SRMOA_STORE_GROUP", "value": group} in container["env"]
