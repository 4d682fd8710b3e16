"""model: the frozen base model, routed LoRA fusion, routed generation."""

from srmoa_dist.model.fusion import ExpertFusion, PreparedRouting, TrainableExpert
from srmoa_dist.model.generation import (
    Fetch,
    Generation,
    GenerationParams,
    Router,
    Routing,
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
    "Router",
    "Routing",
    "TrainableExpert",
    "generate",
    "generate_stream",
    "load_base_model",
    "prefill_lower",
    "prefill_upper",
    "queries",
    "routed_logits",
]
