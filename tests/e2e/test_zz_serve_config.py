"""The repository's serve_config.yaml (what `serve run`/`serve deploy` and the KubeRay RayService use)
deploys on the local Ray cluster through the declarative config path and answers a chat request.

Runs last in tests/e2e: it restarts Serve (a config deploy replaces imperatively deployed apps).
Local adaptations only: the tiny model and a temp data dir in `args`, no GPU in ray_actor_options.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def test_repo_serve_config_deploys_and_answers(ray_cluster, tmp_path, e2e_tiny_model_dir):
    import openai
    from e2e_support import tiny_app_config
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from srmoa_dist.serve.local import build_args, free_port, start_http

    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(doc)                      # valid as committed
    [app] = doc["applications"]
    assert app["import_path"] == "srmoa_dist.serve.app:build_app"
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "ModelServer"}
    cfg = tiny_app_config(tmp_path / "data", e2e_tiny_model_dir)
    app["args"] = {**app.get("args", {}), **build_args(cfg)}
    for d in app["deployments"]:
        opts = d.setdefault("ray_actor_options", {})
        opts["num_gpus"] = 0
        opts["num_cpus"] = 0.1
    serve.shutdown()
    _, port = start_http("127.0.0.1", free_port(), True, print)
    doc["http_options"] = {**doc.get("http_options", {}), "host": "127.0.0.1", "port": port}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc))
    try:
        t0 = time.monotonic()
        while True:
            st = serve.status().applications.get(app["name"])
            if st is not None and st.status == "RUNNING":
                break
            assert st is None or st.status not in ("DEPLOY_FAILED", "UNHEALTHY"), st
            assert time.monotonic() - t0 < 180, st
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=cfg.serve.model_id, max_tokens=4,
                                           messages=[{"role": "user", "content": "Hello there!"}])
        assert r.choices[0].message.content is not None and "routing" in r.model_extra
    finally:
        serve.delete(app["name"])
