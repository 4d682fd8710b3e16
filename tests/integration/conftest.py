"""One local Ray cluster for the whole test session (integration and e2e share it).

`ray.init(num_cpus=4, object_store_memory=256 MB, include_dashboard=False)` with token auth off;
the actors ask for fractional CPUs so that shards, key store, trainer and Serve replicas all fit.
Whichever conftest's fixture runs first starts the cluster; it is stopped at the end of the session.
"""

from __future__ import annotations

import pytest
from itest_support import small_config, start_session_ray, stop_session_ray


def pytest_configure(config):
    # Ray Serve's own pydantic models warn on import; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.*")
    config.addinivalue_line("filterwarnings", "ignore:Using extra keyword arguments on `Field`")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, make_tiny_model):
    """The tiny random Llama + tokenizer of tests/conftest.py saved as an HF directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model, tok = make_tiny_model()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def ray_cluster():
    ray, started = start_session_ray()
    yield ray
    stop_session_ray(started)


@pytest.fixture
def store_runtime(ray_cluster, tmp_path):
    """Shard + key-store actors (no trainer) of a fresh 2-shard store; killed afterwards."""
    from srmoa_dist.runtime.bootstrap import ensure_actors

    cfg = small_config(tmp_path / "data")
    rt = ensure_actors(cfg, trainer=False)
    yield rt
    rt.kill_actors()
