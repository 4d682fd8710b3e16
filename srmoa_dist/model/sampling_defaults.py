"""Sampling defaults from the model's own `generation_config` (as vLLM's `--generation-config auto`).

A request that omits `temperature`, `top_p` or `max_tokens` gets the value the model's
generation_config.json sets explicitly; a value the file does not set falls back to the server's
default (greedy, top_p 1, the route's max_tokens default). Only explicitly set values count: a
`transformers.GenerationConfig` reports library defaults (temperature 1.0) for every model, which
would turn every omitted temperature into sampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's explicit sampling defaults; None where its generation config sets none."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"generation_config temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generation_config top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"generation_config max_new_tokens must be positive, got {self.max_tokens!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


def sampling_defaults(generation_config: Any | None) -> SamplingDefaults:
    """The explicit `temperature`, `top_p`, `max_new_tokens` of a GenerationConfig (or a plain dict).
    `do_sample` is ignored, as vLLM does: a temperature the file sets is the default temperature."""
    if generation_config is None:
        return SamplingDefaults()
    if isinstance(generation_config, dict):
        given = dict(generation_config)
    else:
        given = generation_config.to_diff_dict()   # only what differs from the library defaults
    temperature = given.get("temperature")
    out = SamplingDefaults(
        temperature=float(temperature) if temperature is not None else None,
        top_p=float(given["top_p"]) if given.get("top_p") is not None else None,
        max_tokens=int(given["max_new_tokens"]) if given.get("max_new_tokens") is not None else None,
    )
    if out != SamplingDefaults():
        log.info("sampling defaults from the model's generation config: %s", out.as_dict())
    return out


__all__ = ["SamplingDefaults", "sampling_defaults"]
