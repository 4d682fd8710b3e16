"""Run the Serve application from a Python process (the CLI's serve, demo and bench use it).

`start(cfg, ...)` starts or joins Ray (`runtime.bootstrap.connect`), creates the store's actors (the
store itself is created on first use), starts Serve's HTTP proxy on host:port and deploys
`build_app`; `stop(handle)` deletes the app and, when this process started the local Ray cluster,
shuts Serve and Ray down so that no Ray process is left behind.
"""

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

APP_NAME = "srmoa"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalApp:
    cfg: SrmoaConfig
    runtime: Any
    url: str
    name: str = APP_NAME


def build_args(cfg: SrmoaConfig, **extra: Any) -> dict[str, Any]:
    """`build_app` args that reproduce `cfg` exactly (every section as an override)."""
    d = cfg.to_dict()
    data_dir = d.pop("data_dir")
    return {"data_dir": data_dir, "overrides": d, **{k: v for k, v in extra.items() if v is not None}}


def start(cfg: SrmoaConfig, *, host: str | None = None, port: int | None = None, num_replicas: int = 1,
          name: str = APP_NAME, route_prefix: str = "/", wait_s: float = 900.0,
          say: Callable[[str], None] | None = None, log_to_driver: bool = False) -> LocalApp:
    """Start or join Ray, deploy the app, wait until it answers. Returns the LocalApp."""
    from ray import serve

    from srmoa_dist.runtime.bootstrap import connect, resolve_config
    from srmoa_dist.runtime.store_init import CONFIG_FILE, save_config
    from srmoa_dist.serve.app import build_app

    say = say or (lambda s: log.info("%s", s))
    cfg = resolve_config(cfg)
    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else (port or free_port(host))
    addr = cfg.runtime.ray_address
    say(f"connecting to Ray at {addr} ..." if addr else "starting Ray ...")
    runtime = connect(cfg, log_to_driver=log_to_driver)
    try:
        from pathlib import Path

        if not (Path(cfg.data_dir) / CONFIG_FILE).exists():
            save_config(cfg)
        serve.start(http_options={"host": host, "port": port})
        host, port = _actual_http(host, port, say)
        say(f"deploying the model server ({cfg.model.name_or_path}; the first start converts and caches "
            "the model, which can take a minute) ...")
        serve.run(build_app(build_args(cfg, num_replicas=num_replicas)), name=name, route_prefix=route_prefix,
                  blocking=False)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        wait_ready(url, cfg, wait_s)
    except BaseException:
        runtime.shutdown()
        raise
    return LocalApp(cfg=cfg, runtime=runtime, url=url, name=name)


def _actual_http(host: str, port: int, say: Callable[[str], None]) -> tuple[str, int]:
    """Where Serve's proxy really listens (an already running Serve keeps its own http_options)."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        if (http.host, int(http.port)) != (host, int(port)):
            say(f"Serve already runs on this cluster with HTTP at {http.host}:{http.port}; using that")
        return str(http.host), int(http.port)
    except Exception:
        return host, port


def wait_ready(url: str, cfg: SrmoaConfig, timeout_s: float) -> None:
    """Poll GET /v1/models until it answers 200 (or 401 with auth on)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"the app at {url} did not become ready in {timeout_s:.0f} s (last: {last})")


def stop(app: LocalApp) -> None:
    """Delete the app; stop Serve and the local Ray cluster when this process started it."""
    from ray import serve

    try:
        if app.runtime.started_local:
            app.runtime.shutdown()
        else:
            serve.delete(app.name)
    except Exception:
        log.warning("shutdown was not clean", exc_info=True)


__all__ = ["start", "stop", "wait_ready", "free_port", "build_args", "LocalApp", "APP_NAME"]
