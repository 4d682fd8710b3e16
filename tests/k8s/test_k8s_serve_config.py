"""serve_config.yaml: Ray Serve's own schema accepts it, no key is unknown, and the RayService carries it.

Deploying it on a local Ray cluster and answering a chat request through it is a test of the Serve
application (tests/integration), which needs the app this config imports.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

import pytest
import yaml

pytest.importorskip("ray.serve")
from ray.serve.config import AutoscalingConfig  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402


def validate(config: dict[str, Any]) -> ServeDeploySchema:
    """Ray Serve's checks of a config: the schema, and the autoscaling configs it keeps as dicts."""
    parsed = ServeDeploySchema.model_validate(config)
    for app in parsed.applications:
        for d in app.deployments:
            if isinstance(d.autoscaling_config, dict):
                AutoscalingConfig.model_validate(d.autoscaling_config)
    return parsed


def _models(annotation: Any) -> list[type]:
    """Pydantic model classes inside an annotation (Optional[M], list[M], Union[dict, M], ...)."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None and not isinstance(annotation, types.UnionType):
        return []
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def unknown_keys(data: Any, model: type = ServeDeploySchema, path: str = "") -> list[str]:
    """Keys of a Serve config that no field of Serve's schema declares.

    Ray Serve's schema ignores unknown keys, so a typo such as ``max_ongoing_request`` would deploy
    with the default silently; this walks the models (and their aliases) to find such keys.
    """
    if isinstance(data, list):
        return [u for i, item in enumerate(data) for u in unknown_keys(item, model, f"{path}[{i}]")]
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {n: f for n, f in fields.items()} | {f.alias: f for f in fields.values() if f.alias}
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(f"{path}.{key}".lstrip("."))
            continue
        for sub in _models(names[key].annotation)[:1]:
            out += unknown_keys(value, sub, f"{path}.{key}")
    return out


def test_serve_config_parses_with_rays_schema(serve_config):
    parsed = validate(serve_config)
    (app,) = parsed.applications
    assert app.name == "srmoa" and app.route_prefix == "/"
    assert app.import_path == "srmoa_dist.serve.app:build_app"
    assert app.args["data_dir"] == "/data"
    # The args build a valid root config; store actors wait for the store pod instead of landing elsewhere.
    from srmoa_dist.serve.app import config_from_args

    cfg = config_from_args(app.args)
    assert cfg.data_dir == "/data" and cfg.runtime.store_placement == "pinned"
    assert parsed.http_options.host == "0.0.0.0" and parsed.http_options.port == 8000
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Ingress", "ModelServer"}
    for d in deps.values():
        assert d.max_ongoing_requests > 0 and d.max_queued_requests > 0
        assert d.graceful_shutdown_timeout_s > 0
        auto = d.autoscaling_config
        assert auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"]
        assert auto["target_ongoing_requests"] <= d.max_ongoing_requests
    assert deps["ModelServer"].ray_actor_options.num_gpus == 1


def test_serve_config_has_no_unknown_keys(serve_config):
    assert unknown_keys(serve_config) == []


def test_rayservice_carries_the_serve_config(rayservice, serve_config):
    carried = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert carried == serve_config, "k8s/rayservice.yaml serveConfigV2 and serve_config.yaml drifted apart"


# -- negative cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrong type", "missing required", "bad value"])
def test_rays_schema_catches(how, serve_config):
    d = copy.deepcopy(serve_config)
    app = d["applications"][0]
    if how == "wrong type":
        app["deployments"][1]["max_ongoing_requests"] = "lots"
    elif how == "missing required":
        del app["import_path"]
    else:
        app["deployments"][1]["autoscaling_config"]["min_replicas"] = 99   # > max_replicas
    with pytest.raises(ValueError):
        validate(d)


@pytest.mark.parametrize("where", ["top", "application", "deployment", "autoscaling", "actor options"])
def test_typos_pass_rays_schema_but_not_ours(where, serve_config):
    d = copy.deepcopy(serve_config)
    app = d["applications"][0]
    model = app["deployments"][1]
    target = {"top": d, "application": app, "deployment": model,
              "autoscaling": model["autoscaling_config"], "actor options": model["ray_actor_options"]}[where]
    target["max_ongoing_request"] = 3
    validate(d)                                          # Ray takes it and ignores the key
    (found,) = unknown_keys(d)
    assert found.endswith("max_ongoing_request")
