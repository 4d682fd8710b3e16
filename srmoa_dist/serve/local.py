"""Run the Serve application from a Python process (the CLI's serve, demo and bench use it).

`start(cfg, ...)` starts or joins Ray (`runtime.bootstrap.connect`), creates the store's actors (the
store itself is created on first use), starts Serve's HTTP proxy on host:port and deploys
`build_app`; `stop(handle)` deletes the app and, when this process started the local Ray cluster,
shuts Serve and Ray down so that no Ray process is left behind.

When `start` runs in the main thread and starts the local cluster, SIGTERM is turned into a
KeyboardInterrupt (as Ctrl-C): Ray's own handler ends the process in the middle of its shutdown and
leaves Ray's agent processes running, while an interrupt lets the caller's `finally: stop(app)` run.
"""

import logging
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

APP_NAME = "srmoa"


BIND_TRIES = 5


class PortInUseError(RuntimeError):
    """Serve's HTTP proxy could not bind host:port."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, chosen below the kernel's ephemeral range.

    A port from `bind(0)` is an ephemeral one, which any outgoing connection (Ray opens many)
    may take before Serve binds it; ports between Ray's worker range (10002-19999) and the
    ephemeral range are only ever taken by a listener asking for them by number.
    """
    lo, hi = 20000, _ephemeral_low() - 1
    for _ in range(100 if hi > lo else 0):
        port = random.randint(lo, hi)
        if _bindable(host, port):
            return port
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
    auto_port = port == 0
    port = cfg.serve.port if port is None else (port or free_port(host))
    addr = cfg.runtime.ray_address
    say(f"connecting to Ray at {addr} ..." if addr else "starting Ray ...")
    runtime = connect(cfg, log_to_driver=log_to_driver)
    if runtime.started_local and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)        # after ray.init, which installs its own
    try:
        if not (Path(cfg.data_dir) / CONFIG_FILE).exists():
            save_config(without_keys(cfg))
        host, port = start_http(host, port, auto_port, say)
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


def without_keys(cfg: SrmoaConfig) -> SrmoaConfig:
    """The config with its API keys cleared: what may be written to disk (data_dir/config.yaml).
    Keys come from the environment or secret files at serve time (see serve.app.resolve_api_key)."""
    import dataclasses

    return cfg.replace(serve=dataclasses.replace(cfg.serve, api_key=None, admin_key=None))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def start_http(host: str, port: int, auto_port: bool, say: Callable[[str], None]) -> tuple[str, int]:
    """Start Serve's HTTP proxy; returns the (host, port) it listens on. With `auto_port` (the port
    was picked by `free_port`) a port taken before Serve bound it is replaced by another; a port the
    user named that is taken raises PortInUseError."""
    from ray import serve
    from ray.exceptions import RayTaskError

    for _ in range(BIND_TRIES):
        try:
            # one HTTP proxy, on the head: several nodes of one machine would all bind host:port
            serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
            return _actual_http(host, port, say)
        except RayTaskError as e:
            if "Failed to bind" not in str(e):
                raise
            serve.shutdown()        # only a Serve this call just started fails this way
        if not auto_port:
            raise PortInUseError(f"port {port} on {host} is in use; pass another --port "
                                 "(or --port 0 for a free one)")
        say(f"port {port} was taken before Serve could bind it; trying another")
        port = free_port(host)
    raise PortInUseError(f"no free port on {host} after {BIND_TRIES} tries")


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
    """Poll GET /readyz until it answers 200 (the model is loaded and the key store answers)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=max(5.0, cfg.runtime.call_timeout_s + 1))
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


__all__ = ["start", "stop", "wait_ready", "start_http", "free_port", "build_args", "without_keys", "LocalApp",
           "PortInUseError", "APP_NAME"]
