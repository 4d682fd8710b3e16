"""Start or connect to Ray, and create or find the store's named actors.

`connect(cfg)` is the one entry point: it joins the cluster at `runtime.ray_address` / `$RAY_ADDRESS`
or starts a local one (explicit `num_cpus`, `object_store_memory`, no dashboard, token auth off), then
gets-or-creates the detached, named actors of one store in `runtime.namespace`:

    {namespace}: srmoa-shard-0 .. srmoa-shard-{n-1}, srmoa-keystore, srmoa-trainer

so that a second process (the CLI, a test, a benchmark, a Serve replica) reaches the same store.
Actors are `lifetime="detached"`: they outlive the process that created them and go when the cluster
does (`Runtime.shutdown()` stops a local cluster this process started).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

SHARD_NAME = "srmoa-shard-{i}"
KEYSTORE_NAME = "srmoa-keystore"
TRAINER_NAME = "srmoa-trainer"


def resolve_config(cfg: SrmoaConfig) -> SrmoaConfig:
    """The same config with an absolute data_dir (actors run in other working directories)."""
    return cfg.replace(data_dir=str(Path(cfg.data_dir).expanduser().resolve()))


def init_ray(cfg: SrmoaConfig, *, log_to_driver: bool = True) -> bool:
    """Connect to Ray or start a local cluster. True when this call started a local cluster."""
    rt = cfg.runtime
    if ray.is_initialized():
        return False
    address = rt.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s (namespace %s)", address, rt.namespace)
        ray.init(address=address, namespace=rt.namespace, log_to_driver=log_to_driver)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # Ray 2.60 enables token auth by default
    log.info("starting a local Ray cluster: %d CPUs, %d MB object store", rt.num_cpus,
             rt.object_store_memory_mb)
    ray.init(
        num_cpus=rt.num_cpus,
        object_store_memory=rt.object_store_memory_mb * 2**20,
        include_dashboard=False,
        namespace=rt.namespace,
        log_to_driver=log_to_driver,
    )
    return True


def _get_or_create(cls: Any, name: str, namespace: str, options: dict[str, Any], *args: Any) -> Any:
    return cls.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                       **options).remote(*args)


@dataclass
class Runtime:
    """Handles of one store's actors, and whether this process owns the local Ray cluster."""

    cfg: SrmoaConfig
    shards: list[Any]
    keystore: Any
    trainer: Any | None
    started_local: bool = False
    _client: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """The process-wide `ExpertStoreClient` over this store's shard actors."""
        if self._client is None:
            from srmoa_dist.runtime.client import ExpertStoreClient

            self._client = ExpertStoreClient(self.shards, keystore=self.keystore,
                                             cache_size=self.cfg.runtime.cache_experts,
                                             timeout_s=self.cfg.runtime.call_timeout_s)
        return self._client

    def kill_actors(self) -> None:
        """Kill this store's actors for good (their data stays on disk)."""

        for h in [*self.shards, self.keystore, self.trainer]:
            if h is not None:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:   # already gone
                    log.debug("actor already gone", exc_info=True)

    def shutdown(self) -> None:
        """Stop the local Ray cluster if this process started it (actors and Serve go with it)."""

        if self.started_local and ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                log.debug("serve.shutdown failed", exc_info=True)
            ray.shutdown()
            log.info("local Ray cluster stopped")


def ensure_actors(cfg: SrmoaConfig, *, trainer: bool = True, wait: bool = True) -> Runtime:
    """Get or create the named actors of the store under `cfg.data_dir` (Ray must be initialised).

    Raises RuntimeError when an actor of the same name already serves another data directory.
    """

    from srmoa_dist.runtime.keystore_actor import KeyStoreActor
    from srmoa_dist.runtime.shard_actor import ShardActor

    cfg = resolve_config(cfg)
    rt, ns = cfg.runtime, cfg.runtime.namespace
    place = placement(cfg)
    ray.get(_check_store_layout.options(num_cpus=0, **place["store"]).remote(cfg),
            timeout=rt.call_timeout_s * 4)
    # Calls in flight when an actor dies are resubmitted to its restart: the methods are idempotent
    # (KeyStoreActor.free skips free slots), and those that are not opt out per method
    # (KeyStoreActor.add: `@ray.method(max_task_retries=0)`, which wins over this default).
    common = {"max_restarts": rt.max_restarts, "max_task_retries": rt.max_task_retries}
    shards = [
        _get_or_create(ShardActor, SHARD_NAME.format(i=i), ns,
                       {**common, "num_cpus": rt.actor_cpus, "max_concurrency": 8, **place[f"shard_{i}"]},
                       str(cfg.shards_dir / f"shard-{i:03d}"), cfg.store, i)
        for i in range(cfg.store.n_shards)
    ]
    keystore = _get_or_create(KeyStoreActor, KEYSTORE_NAME, ns,
                              {**common, "num_cpus": rt.actor_cpus, "max_concurrency": 16,
                               **place["keystore"]},
                              str(cfg.keystore_dir), cfg.keystore, cfg.gravity, cfg.runtime)
    trainer_h = None
    if trainer:
        from srmoa_dist.runtime.torch_env import torch_runtime_env
        from srmoa_dist.runtime.trainer_actor import TrainerActor

        trainer_h = _get_or_create(TrainerActor, TRAINER_NAME, ns,
                                   {"max_restarts": rt.max_restarts, "max_task_retries": 0,
                                    "num_cpus": rt.trainer_cpus, "max_concurrency": 8,
                                    "runtime_env": torch_runtime_env(cfg), **place["store"]},
                                   cfg, shards, keystore)
    if wait:
        infos = ray.get([h.info.remote() for h in [*shards, keystore]], timeout=rt.call_timeout_s * 4)
        for info, want in zip(infos, [*(cfg.shards_dir / f"shard-{i:03d}" for i in range(len(shards))),
                                      cfg.keystore_dir]):
            if Path(info["path"]) != Path(want):
                raise RuntimeError(
                    f"actor {info['name']} in namespace {ns!r} serves {info['path']}, not {want}: "
                    f"another store runs in this namespace (set runtime.namespace)")
    return Runtime(cfg=cfg, shards=shards, keystore=keystore, trainer=trainer_h)


def placement(cfg: SrmoaConfig) -> dict[str, dict[str, Any]]:
    """Custom-resource requests that pin the store actors to the node holding the store volume.

    The store group of k8s/rayservice.yaml advertises `srmoa_shard_<i>` for shard i, `srmoa_keystore`
    for the key store, and `srmoa_store` for the trainer (it writes the ledger and job records under
    data_dir) and store-side tasks. With `runtime.store_placement: auto` only the advertised ones are
    requested (a local cluster advertises none, and everything runs anywhere); with `pinned` all are
    required, and this waits up to `runtime.store_wait_s` for the store node to join, so that named
    detached actors are never created on a node without the store volume.
    """
    names = ["srmoa_store", "srmoa_keystore", *(f"srmoa_shard_{i}" for i in range(cfg.store.n_shards))]
    have = ray.cluster_resources()
    if cfg.runtime.store_placement == "pinned":
        deadline = time.monotonic() + cfg.runtime.store_wait_s
        while missing := [n for n in names if n not in have]:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"runtime.store_placement is 'pinned' but the cluster advertises no {missing} after "
                    f"{cfg.runtime.store_wait_s:.0f} s: start the store node (k8s: the store worker group) "
                    "or set runtime.store_placement to 'auto'")
            log.info("waiting for the store node's resources %s", missing)
            time.sleep(2.0)
            have = ray.cluster_resources()

    def req(name: str) -> dict[str, Any]:
        return {"resources": {name: 1}} if name in have else {}

    out = {"store": req("srmoa_store"), "keystore": req("srmoa_keystore")}
    for i in range(cfg.store.n_shards):
        out[f"shard_{i}"] = req(f"srmoa_shard_{i}")
    return out


@ray.remote
def _check_store_layout(cfg: SrmoaConfig) -> None:
    """Refuse a data dir whose shard count differs from store.n_shards (records it when new)."""
    from srmoa_dist.experts.store import ensure_store_meta

    ensure_store_meta(Path(cfg.shards_dir), cfg.store, False)


def find_actors(cfg: SrmoaConfig) -> Runtime:
    """Handles of an existing store's actors (ValueError when one is missing)."""

    ns = cfg.runtime.namespace
    shards = [ray.get_actor(SHARD_NAME.format(i=i), namespace=ns) for i in range(cfg.store.n_shards)]
    keystore = ray.get_actor(KEYSTORE_NAME, namespace=ns)
    try:
        trainer = ray.get_actor(TRAINER_NAME, namespace=ns)
    except ValueError:
        trainer = None
    return Runtime(cfg=resolve_config(cfg), shards=shards, keystore=keystore, trainer=trainer)


def connect(cfg: SrmoaConfig, *, trainer: bool = True, log_to_driver: bool = True) -> Runtime:
    """Start or join Ray, then get or create the store's actors. See the module docstring."""
    started = init_ray(cfg, log_to_driver=log_to_driver)
    try:
        runtime = ensure_actors(cfg, trainer=trainer)
    except BaseException:
        if started:

            ray.shutdown()
        raise
    runtime.started_local = started
    return runtime


__all__ = ["connect", "init_ray", "ensure_actors", "find_actors", "resolve_config", "placement", "Runtime",
           "SHARD_NAME", "KEYSTORE_NAME", "TRAINER_NAME"]
