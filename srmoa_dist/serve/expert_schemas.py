"""Request bodies of the expert routes (serve/experts_api.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from srmoa_dist.routing.namespaces import check_name
from srmoa_dist.serve.schemas import FieldError


class ExpertImport(BaseModel):
    """POST /v1/experts: a PEFT LoRA adapter, from a directory on the server (`path`) or uploaded
    (`files`: adapter_config.json as JSON text or object, adapter_model.safetensors as base64), with
    its name and the example prompts its routing key is computed from."""

    model_config = ConfigDict(extra="ignore")
    name: str
    examples: list[str] = Field(min_length=1, max_length=32)
    path: str | None = Field(default=None, min_length=1)
    files: dict[str, Any] | None = None
    namespace: str | None = None

    @field_validator("name", "namespace")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "the value")

    @field_validator("examples")
    @classmethod
    def _examples(cls, v: list[str]) -> list[str]:
        if any(not e.strip() for e in v):
            raise ValueError("examples must not be empty strings")
        return v

    @model_validator(mode="after")
    def _source(self) -> ExpertImport:
        if (self.path is None) == (self.files is None):
            raise FieldError("path", "give exactly one of 'path' (a directory on the server) or 'files'")
        return self


__all__ = ["ExpertImport"]
