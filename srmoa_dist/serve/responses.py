"""Response models of the routes beyond chat and completions (probes, feedback jobs, rollback,
experts, stats): every route answers a validated model, so /openapi.json documents each body.
Models marked open (`schemas.OpenModel`) validate their documented fields and pass later ones through."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from srmoa_dist.serve.schemas import CatalogExpert, FeedbackJob, OpenModel


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ModelReady(OpenModel):
    model: str
    load_seconds: float
    pid: int


class ReadyChecks(BaseModel):
    model: ModelReady
    keystore: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    checks: ReadyChecks


class FeedbackJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackJob]


class EditRollback(OpenModel):
    object: Literal["edit.rollback"] = "edit.rollback"
    edit_id: str
    status: Literal["rolled_back"] = "rolled_back"
    expert_id: int
    created: bool                 # the edit had made the expert: its slot is freed


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CatalogExpert]
    has_more: bool = False
    last_id: int | None = None


class ImportedExpert(CatalogExpert):
    rank: int
    targets: int                  # adapted modules


class ExportAgreement(BaseModel):
    prompts: int
    exact: float = Field(description="share of prompts whose greedy tokens are identical")
    tokens: float = Field(description="mean share of greedy tokens before the first difference")


class ExportReport(BaseModel):
    """How the files were made (experts/peft_distill.py `DistillReport` for a parallel MLP expert)."""

    form: Literal["lora", "parallel_mlp"]
    method: str = Field(description="exact (a LoRA-form expert) or ridge_down_proj (a fitted LoRA)")
    exact: bool
    rank: int
    alpha: float
    ridge: float | None = None
    fit_tokens: int | None = None
    max_new_tokens: int | None = None
    residual: dict[str, float] = Field(default_factory=dict, description="relative residual per layer")
    own: ExportAgreement | None = Field(None, description="PeftModel vs the served expert (gate 1), "
                                                          "on the expert's own prompts")
    held_out: ExportAgreement | None = Field(None, description="the same on generic prompts not fitted")
    base_own: ExportAgreement | None = None
    base_held_out: ExportAgreement | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class ExpertAdapter(BaseModel):
    id: int
    object: Literal["expert.adapter"] = "expert.adapter"
    version: int
    files: dict[str, str] = Field(description="adapter_config.json (JSON text) and "
                                              "adapter_model.safetensors (base64); for a parallel MLP "
                                              "expert also srmoa_export.json")
    export: ExportReport | None = None


class ExpertDeleted(BaseModel):
    id: int
    object: Literal["expert.deleted"] = "expert.deleted"
    deleted: bool = True


class KeyStoreStats(OpenModel):
    n_active: int
    n_free: int
    n_pinned: int
    capacity: int
    index_kind: str
    energy: float
    searches: int = 0
    consolidations: int = 0
    pending_activations: int = 0


class ShardStats(OpenModel):
    entries: int = 0


class ServerStats(OpenModel):
    """The answering model server's counters, or `error` when it did not answer."""

    requests: int | None = None
    routed: int | None = None
    deferred: int | None = None
    cache: dict[str, Any] | None = None
    edited_relations: dict[str, int] | None = Field(
        default=None, description="the relation gate's mirror of the store's edited relations: experts, "
        "rows, syncs (routing/relation_bank.py); null without one")
    error: str | None = None


class TrainerStats(OpenModel):
    queued: int | None = None
    jobs: dict[str, int] = Field(default_factory=dict)
    edit_phase_seconds: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="p50 / p90 seconds per edit phase over the recent edits")
    error: str | None = None


class IngressStats(BaseModel):
    inflight: int
    rejected: int
    limit: int


class NamespaceStats(OpenModel):
    keys: dict[str, int] = Field(default_factory=dict)
    experts: dict[str, dict[str, int]] = Field(default_factory=dict)
    requests: dict[str, dict[str, int]] = Field(default_factory=dict)


class Stats(OpenModel):
    object: Literal["stats"] = "stats"
    model: str
    keystore: KeyStoreStats
    shards: list[ShardStats]
    experts: int
    server: ServerStats
    cache_hit_rate: float | None = None
    trainer: TrainerStats | None = None
    ingress: IngressStats
    namespaces: NamespaceStats | None = None


__all__ = ["Health", "Ready", "ReadyChecks", "ModelReady", "FeedbackJobList", "EditRollback", "ExpertList",
           "ImportedExpert", "ExpertAdapter", "ExpertDeleted", "Stats", "KeyStoreStats", "ShardStats",
           "ServerStats", "TrainerStats", "IngressStats", "NamespaceStats"]
