"""model: the frozen base model, routed LoRA fusion, routed generation."""

from srmoa_dist.model.fusion import ExpertFusion, PreparedRouting, TrainableExpert
from srmoa_dist.model.generation import (
    BatchRouting,
    Fetch,
    Generation,
    GenerationParams,
    Router,
    RouteStep,
    generate,
    generate_stream,
    prefill_lower,
    prefill_upper,
    queries,
    routed_logits,
)
from srmoa_dist.model.loading import BaseModel, load_base_model

__all__ = [
    "BaseModel",
    "ExpertFusion",
    "Fetch",
    "Generation",
    "GenerationParams",
    "PreparedRouting",
    "RouteStep",
    "Router",
    "BatchRouting",
    "TrainableExpert",
    "generate",
    "generate_stream",
    "load_base_model",
    "prefill_lower",
    "prefill_upper",
    "queries",
    "routed_logits",
]
