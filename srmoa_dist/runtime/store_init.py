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
SEED_QUESTIONS_FILE = "seed_questions.json"   # the questions whose queries the "real" seed keys jitter
SEED_KEY_NORM = 1.0
SEED_KINDS = ("blank", "real")
REAL_SEED_QUESTIONS = 2048     # distinct generated questions behind the keys of "real" seeds
REAL_SEED_NOISE = 0.3          # noise norm on a question's unit query (cos to it ~0.96)
REAL_SEED_B_STD = 1e-3         # B of a "real" seed: non-zero, small (outputs stay near the base model's)
SEED_BATCH = 2048              # experts per LMDB transaction / key-store add when seeding in bulk


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
    from srmoa_dist.routing.relation_gate import gated

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
    # with the relation gate when model.relation_layer is set
    return gated(base, enc, Path(cfg.model_cache_dir) / "encoders")


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


def real_seed_keys(base: Any, enc: Any, n: int, seed: int = 0, *, n_questions: int = REAL_SEED_QUESTIONS,
                   noise: float = REAL_SEED_NOISE) -> tuple[np.ndarray, list[str]]:
    """n unit keys (n, d_key) in the real query distribution, and the questions behind them: key i is
    the routing query of question i % n_questions (`routing.relation_corpus`, no benchmark's) plus noise
    of norm ~`noise`, renormalised; asking one of those questions retrieves its seeds."""
    from srmoa_dist.routing.prompt_pool import pooled_prompts
    from srmoa_dist.routing.relation_corpus import corpus_questions

    m = max(1, min(n, n_questions))
    questions = corpus_questions(m, seed)
    q = enc.encode_pooled(pooled_prompts(base, questions, progress=True, desc="seed questions"))
    rng = np.random.default_rng(seed)
    d = q.shape[1]
    keys = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        k = q[np.arange(s, min(n, s + 65536)) % m]
        k = k + rng.standard_normal(k.shape, dtype=np.float32) * np.float32(noise / np.sqrt(d))
        keys[s : s + k.shape[0]] = k / np.linalg.norm(k, axis=1, keepdims=True)
    return keys, questions


_POOLS: dict[tuple[int, int], np.ndarray] = {}


def _normal_pool(seed: int, width: int) -> np.ndarray:
    """A fixed N(0, 1) float32 vector of max(4M, 64 * width) values for `real_seed_batch`."""
    key = (seed, width)
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = np.random.default_rng([seed, 7]).standard_normal(max(1 << 22, 64 * width),
                                                                       dtype=np.float32)
    return _POOLS[key]


def real_seed_batch(ids: np.ndarray, shapes: dict[str, tuple[int, int]], cfg: SrmoaConfig, seed: int = 0,
                    b_std: float = REAL_SEED_B_STD) -> dict[int, Any]:
    """Experts of `ids` (A ~ N(0, 1/d_in), B ~ N(0, b_std^2), the config's rank, alpha and dtype), drawn
    for the whole batch at once (one RNG call) and deterministic in (seed, first id)."""
    from srmoa_dist.experts.expert import LoRAExpert, to_storage

    e = cfg.expert
    r = e.rank
    names = list(shapes)
    sizes = [(r * shapes[n][0], shapes[n][1] * r) for n in names]
    width = sum(a + b for a, b in sizes)
    rng = np.random.default_rng([seed, int(ids[0]) if len(ids) else 0])
    # Row j is a window at a random offset of one normal pool, with a random sign: distinct experts at a
    # fraction of the cost of drawing n * params normals (the bulk seeding of 1M experts is RNG-bound).
    pool = _normal_pool(seed, width)
    offs = rng.integers(0, pool.size - width, len(ids))
    sign = np.where(rng.random(len(ids)) < 0.5, -1.0, 1.0).astype(np.float32)[:, None]
    flat = np.lib.stride_tricks.sliding_window_view(pool, width)[offs]         # (n, params), a copy
    pos, scale = 0, np.empty(width, np.float32)
    for n, (na, nb) in zip(names, sizes, strict=True):
        scale[pos : pos + na] = 1.0 / np.sqrt(shapes[n][0])
        scale[pos + na : pos + na + nb] = b_std
        pos += na + nb
    np.multiply(flat, sign * scale, out=flat)
    if e.dtype == "float16":                        # torch's vectorised cast: 5-10x numpy's astype
        import torch

        flat = torch.from_numpy(flat).half().numpy()
    else:
        flat = to_storage(flat, e.dtype)
    out = {}
    for row, i in zip(flat, ids.tolist(), strict=True):
        targets, pos = {}, 0
        for n, (na, nb) in zip(names, sizes, strict=True):
            d_in, d_out = shapes[n]
            a, b = row[pos : pos + na], row[pos + na : pos + na + nb]
            targets[n] = (a.reshape(r, d_in), b.reshape(d_out, r))
            pos += na + nb
        out[int(i)] = LoRAExpert(targets, e.alpha)
    return out


def _seed_real(cfg: SrmoaConfig, base: Any, enc: Any, shapes: dict[str, tuple[int, int]], n: int, seed: int,
               add_keys: Callable[[np.ndarray], np.ndarray], put: Callable[[dict[int, Any]], Any]) -> None:
    """Keys first (one bulk add: one index build), then the experts in batches, with progress bars."""
    import json

    from tqdm import tqdm

    keys, questions = real_seed_keys(base, enc, n, seed)
    (Path(cfg.data_dir) / SEED_QUESTIONS_FILE).write_text(json.dumps(questions))
    ids = np.asarray(add_keys(keys), dtype=np.int64)
    del keys
    with tqdm(total=n, desc="seed experts", unit="expert", unit_scale=True) as bar:
        for s in range(0, n, SEED_BATCH):
            chunk = ids[s : s + SEED_BATCH]
            put(real_seed_batch(chunk, shapes, cfg, seed))
            bar.update(len(chunk))


def init_store(cfg: SrmoaConfig, *, n_experts: int = 0, base: Any | None = None, runtime: Any | None = None,
               seed: int = 0, progress: Callable[[str], None] | None = None,
               seed_kind: str = "blank") -> dict[str, Any]:
    """Create (or complete) the store under cfg.data_dir: config.yaml, the query encoder and, when the
    key store is empty, `n_experts` seed experts. Through the actors of `runtime` when given (a
    running store), else in this process (no Ray). Returns a summary.

    seed_kind "blank": B = 0 (no-op until refined) under random unit keys. "real": non-zero B under
    keys in the real query distribution (`real_seed_keys`), written in bulk (SEED_BATCH experts per
    transaction, the keys in one add), for stores of up to millions of experts."""
    if seed_kind not in SEED_KINDS:
        raise ValueError(f"seed_kind must be one of {SEED_KINDS}, got {seed_kind!r}")
    import time

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
    t0 = time.perf_counter()
    with data_dir_lock(cfg, "seed"):
        if runtime is not None:
            import ray

            n_keys = int(ray.get(runtime.keystore.size.remote()))
            if n_keys == 0 and n_experts > 0 and seed_kind == "real":
                say(f"creating {n_experts} real seed experts ...")
                _seed_real(cfg, base, enc, shapes, n_experts, seed,
                           lambda k: ray.get(runtime.keystore.add.remote(k)), runtime.client().put_many)
                ray.get(runtime.keystore.snapshot.remote())
                added = n_experts
            elif n_keys == 0 and n_experts > 0:
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
                if len(ks) == 0 and n_experts > 0 and seed_kind == "real":
                    say(f"creating {n_experts} real seed experts ...")
                    store = ShardedExpertStore(cfg.shards_dir, cfg.store)
                    try:
                        _seed_real(cfg, base, enc, shapes, n_experts, seed, ks.add, store.put_many)
                        store.sync()
                    finally:
                        store.close()
                    ks.snapshot()
                    added = n_experts
                elif len(ks) == 0 and n_experts > 0:
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
            "seed_kind": seed_kind, "seed_s": round(time.perf_counter() - t0, 2),
            "encoder": str(encoder_path(cfg)), "d_key": enc.d_key, "model": base.name}


__all__ = ["init_store", "ensure_encoder", "load_config", "save_config", "encoder_path", "jobs_dir",
           "data_dir_lock", "seed_experts", "real_seed_keys", "real_seed_batch", "CONFIG_FILE",
           "ENCODER_FILE", "SEED_QUESTIONS_FILE", "SEED_KINDS"]
