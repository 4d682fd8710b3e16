"""Creating a store under a data directory: config, query encoder, seed experts.

    data_dir/
      config.yaml          the SrmoaConfig the store was made with (serve/CLI read it back)
      query_encoder.npz    the frozen query encoder (calibrated once on the base model)
      shards/              LMDB shards (experts/)
      keystore/            routing keys: snapshot + WAL (routing/keystore.py)
      ledger/              the edit ledger (ttt/ledger.py)
      jobs/                feedback jobs of the trainer actor
      model_cache/         converted base-model weights

Everything here is idempotent and safe to race: a file lock in data_dir serialises creation, and the
encoder is deterministic for a given model (so two processes that both calibrate agree bit for bit).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from srmoa_dist.config import CONFIG_FILE, SrmoaConfig, resolve

log = logging.getLogger(__name__)

ENCODER_FILE = "query_encoder.npz"
SEED_KEY_NORM = 1.0


def encoder_path(cfg: SrmoaConfig) -> Path:
    return Path(cfg.data_dir) / ENCODER_FILE


def jobs_dir(cfg: SrmoaConfig) -> Path:
    return Path(cfg.data_dir) / "jobs"


@contextlib.contextmanager
def data_dir_lock(cfg: SrmoaConfig, name: str = "init") -> Iterator[None]:
    """An exclusive lock on data_dir/.{name}.lock (processes on one host or one shared filesystem)."""
    d = Path(cfg.data_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def load_config(data_dir: str | os.PathLike, default: SrmoaConfig | None = None) -> SrmoaConfig:
    """data_dir/config.yaml when present (with data_dir set to this directory), else `default`
    (`config.resolve`)."""
    return resolve(data_dir, default=default)


def save_config(cfg: SrmoaConfig) -> Path:
    p = Path(cfg.data_dir) / CONFIG_FILE
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    cfg.save_yaml(tmp)
    os.replace(tmp, p)
    return p


def ensure_encoder(cfg: SrmoaConfig, base: Any, keystore: Any | None = None) -> Any:
    """The store's query encoder, calibrated on `base` and saved when the store has none yet.

    With `keystore` (the key-store actor handle) the file is read and written through that actor, so
    every node (replicas on GPU nodes, the trainer on the store node) uses the same encoder; without it,
    data_dir/query_encoder.npz is used directly. Checks that the encoder fits `base`.
    """
    from srmoa_dist.routing.encoder_cache import calibrated
    from srmoa_dist.routing.query_encoder import QueryEncoder

    if keystore is not None:
        import ray

        data = ray.get(keystore.get_file.remote(ENCODER_FILE), timeout=cfg.runtime.call_timeout_s)
        if data is None:
            log.info("calibrating the query encoder on %s (d_key %d)", base.name, cfg.keystore.d_key)
            tmp = Path(cfg.model_cache_dir) / f".encoder-{os.getpid()}.npz"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            calibrated(base, cfg.keystore.d_key, Path(cfg.model_cache_dir) / "encoders").save(tmp)
            mine = tmp.read_bytes()
            tmp.unlink()
            data = ray.get(keystore.put_file_if_absent.remote(ENCODER_FILE, mine),
                           timeout=cfg.runtime.call_timeout_s)
        enc = _load_encoder_bytes(data)
        where = f"{ENCODER_FILE} of the store"
    else:
        path = encoder_path(cfg)
        if not path.is_file():
            with data_dir_lock(cfg):
                if not path.is_file():
                    log.info("calibrating the query encoder on %s (d_key %d)", base.name, cfg.keystore.d_key)
                    calibrated(base, cfg.keystore.d_key, Path(cfg.model_cache_dir) / "encoders").save(path)
        enc = QueryEncoder.load(path)
        where = str(path)
    try:
        enc.check_model(base)
    except ValueError as e:
        raise ValueError(f"{where}: {e}; this data directory was made for another model") from None
    if enc.d_key != cfg.keystore.d_key:
        raise ValueError(f"{where} makes {enc.d_key}-dim queries but keystore.d_key is {cfg.keystore.d_key}")
    return enc


def _load_encoder_bytes(data: bytes) -> Any:
    import tempfile

    from srmoa_dist.routing.query_encoder import QueryEncoder

    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        f.write(data)
        f.flush()
        return QueryEncoder.load(f.name)


def seed_experts(n: int, shapes: dict[str, tuple[int, int]], cfg: SrmoaConfig, seed: int = 0
                 ) -> tuple[np.ndarray, list[Any]]:
    """n seed experts (B = 0: no-op until refined) and their random unit keys (n, d_key)."""
    from srmoa_dist.experts.expert import LoRAExpert

    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, cfg.keystore.d_key)).astype(np.float32)
    keys *= SEED_KEY_NORM / np.linalg.norm(keys, axis=1, keepdims=True)
    e = cfg.expert
    experts = [LoRAExpert.random(shapes, e.rank, e.alpha, e.dtype, seed + i, b_std=0.0) for i in range(n)]
    return keys, experts


def init_store(cfg: SrmoaConfig, *, n_experts: int = 0, base: Any | None = None, runtime: Any | None = None,
               seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Create (or complete) the store under cfg.data_dir: config.yaml, the query encoder and, when the
    key store is empty, `n_experts` seed experts. Through the actors of `runtime` when given (a
    running store), else in this process (no Ray). Returns a summary."""
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.loading import load_base_model

    say = progress or (lambda s: log.info("%s", s))
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.data_dir) / CONFIG_FILE).is_file():
        save_config(cfg)
    if base is None:
        say(f"loading the base model {cfg.model.name_or_path} ...")
        base = load_base_model(cfg.model, cfg.model_cache_dir)
    say("query encoder ...")
    enc = ensure_encoder(cfg, base, runtime.keystore if runtime is not None else None)
    fusion = ExpertFusion(base.model, cfg.expert, cfg.model.query_layer)
    shapes = fusion.target_shapes()
    fusion.remove()
    added = 0
    with data_dir_lock(cfg, "seed"):
        if runtime is not None:
            import ray

            n_keys = int(ray.get(runtime.keystore.size.remote()))
            if n_keys == 0 and n_experts > 0:
                say(f"creating {n_experts} seed experts ...")
                keys, experts = seed_experts(n_experts, shapes, cfg, seed)
                ids = np.asarray(ray.get(runtime.keystore.add.remote(keys)), dtype=np.int64)
                runtime.client().put_many(dict(zip(ids.tolist(), experts)))
                ray.get(runtime.keystore.snapshot.remote())
                added = n_experts
            n_keys = int(ray.get(runtime.keystore.size.remote()))
        else:
            from srmoa_dist.experts.store import ShardedExpertStore
            from srmoa_dist.routing.keystore import KeyStore

            ks = KeyStore.open(cfg.keystore_dir, cfg.keystore, cfg.gravity)
            try:
                if len(ks) == 0 and n_experts > 0:
                    say(f"creating {n_experts} seed experts ...")
                    keys, experts = seed_experts(n_experts, shapes, cfg, seed)
                    ids = np.asarray(ks.add(keys), dtype=np.int64)
                    store = ShardedExpertStore(cfg.shards_dir, cfg.store)
                    try:
                        store.put_many(dict(zip(ids.tolist(), experts)))
                    finally:
                        store.close()
                    ks.snapshot()
                    added = n_experts
                n_keys = len(ks)
            finally:
                ks.close()
    return {"data_dir": str(cfg.data_dir), "keys": n_keys, "seed_experts_added": added,
            "encoder": str(encoder_path(cfg)), "d_key": enc.d_key, "model": base.name}


__all__ = ["init_store", "ensure_encoder", "load_config", "save_config", "encoder_path", "jobs_dir",
           "data_dir_lock", "seed_experts", "CONFIG_FILE", "ENCODER_FILE"]
