"""The app over HTTP on 127.0.0.1 (a free port), on the session's local Ray cluster.

One app for the session ("srmoa-e2e" at /), serving the tiny random Llama of tests/conftest.py from a
fresh store; tests talk to it with the real `openai` client and with httpx.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from e2e_support import tiny_app_config  # noqa: E402
from itest_support import start_session_ray, stop_session_ray  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.*")
    config.addinivalue_line("filterwarnings", "ignore:Using extra keyword arguments on `Field`")


@pytest.fixture(scope="session")
def ray_cluster():
    ray, started = start_session_ray()
    yield ray
    stop_session_ray(started)


@pytest.fixture(scope="session")
def e2e_tiny_model_dir(tmp_path_factory, make_tiny_model):
    d = tmp_path_factory.mktemp("tiny-llama-e2e")
    model, tok = make_tiny_model()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def serve_port(ray_cluster):
    from srmoa_dist.serve.local import free_port, start_http

    _, port = start_http("127.0.0.1", free_port(), True, print)
    return port


@pytest.fixture(scope="session")
def app(ray_cluster, serve_port, tmp_path_factory, e2e_tiny_model_dir):
    """(base URL, config, runtime) of the session's app."""
    from ray import serve

    from srmoa_dist.runtime.bootstrap import ensure_actors
    from srmoa_dist.serve.app import build_app
    from srmoa_dist.serve.local import build_args, wait_ready

    cfg = tiny_app_config(tmp_path_factory.mktemp("e2e") / "data", e2e_tiny_model_dir)
    serve.run(build_app(build_args(cfg)), name="srmoa-e2e", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{serve_port}"
    wait_ready(url, cfg, 120)
    rt = ensure_actors(cfg, trainer=True)
    yield url, cfg, rt
    try:
        serve.delete("srmoa-e2e")
    except Exception:
        pass


@pytest.fixture(scope="session")
def url(app):
    return app[0]


@pytest.fixture
def http(url):
    import httpx

    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture
def oai(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_id(app):
    return app[1].serve.model_id
