"""`RoutePlan`: how one request wants to be routed, and the batch's search answer cut to it.

A request may override the store's routing (OpenAI extensions in its body, checked by the schemas and
again here, since the engine is also called without HTTP):

    use_experts  false: the base model alone (no search)
    k            at most this many experts (<= keystore.k, the batch searches the largest k)
    tau          its own deferral threshold (the batch searches at the smallest tau)
    expert_id    a forced expert (model "<base>:<adapter name>"): gate 1, no search, no activation
    namespaces   the key namespaces it may reach (its own and the shared one; None: every key)

One key-store search serves the whole batch (`search_args`: the largest k, the smallest tau, the
per-row namespaces); `apply` then cuts each row of D, I to its own k and tau and puts the forced
expert of a forced row in place of its search answer (score 1, so its softmax gate is 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORCED_SCORE = 1.0


@dataclass(frozen=True)
class RoutePlan:
    """The routing of one request (see the module docstring)."""

    use: bool = True
    k: int | None = None
    tau: float | None = None
    expert_id: int | None = None
    namespaces: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and -1.0 <= self.tau <= 1.0):
            raise ValueError(f"tau must be in [-1, 1] (an inner product), got {self.tau!r}")
        if self.expert_id is not None and (not isinstance(self.expert_id, int) or self.expert_id < 0):
            raise ValueError(f"expert_id must be a non-negative integer, got {self.expert_id!r}")
        if self.expert_id is not None and not self.use:
            raise ValueError("use_experts is false but an expert is forced (model '<base>:<adapter>')")

    @classmethod
    def of(cls, req: dict[str, Any], max_k: int) -> RoutePlan:
        """The plan of an engine request dict; ValueError naming the field when it is out of range."""
        k = req.get("k")
        if k is not None and isinstance(k, int) and not isinstance(k, bool) and k > max_k:
            raise ValueError(f"k must be at most keystore.k = {max_k}, got {k}")
        ns = req.get("namespaces")
        tau = req.get("tau")
        return cls(use=bool(req.get("use_experts", True)), k=k,
                   tau=float(tau) if isinstance(tau, (int, float)) and not isinstance(tau, bool) else tau,
                   expert_id=req.get("expert_id"), namespaces=tuple(ns) if ns is not None else None)

    @property
    def searches(self) -> bool:
        """Whether this row needs the key store's search."""
        return self.use and self.expert_id is None


def search_args(plans: Sequence[RoutePlan], k: int, tau: float
                ) -> tuple[int, float, list[tuple[str, ...] | None] | None] | None:
    """(k, tau, namespaces) of the batch's one search, or None when no row searches."""
    rows = [p for p in plans if p.searches]
    if not rows:
        return None
    k_max = max(p.k or k for p in rows)
    tau_min = min(tau if p.tau is None else p.tau for p in rows)
    ns = [p.namespaces for p in plans]
    return k_max, tau_min, (ns if any(n is not None for n in ns) else None)


def row_taus(plans: Sequence[RoutePlan], tau: float) -> list[float]:
    """Each row's deferral threshold: its plan's tau, else the server's."""
    return [tau if p.tau is None else p.tau for p in plans]


def apply(plans: Sequence[RoutePlan], D: np.ndarray | None, I: np.ndarray | None, k: int, tau: float,
          slack: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Each row of the search answer D, I (B, k') cut to its plan (None: there was no search), at its
    tau less `slack` (the relation gate's named subjects, `routing.relation_gate.search_slack`)."""
    B = len(plans)
    width = max(1, D.shape[1] if D is not None else 1)
    Dout = np.full((B, width), -math.inf, dtype=np.float32)
    Iout = np.full((B, width), -1, dtype=np.int64)
    for b, (p, t_b) in enumerate(zip(plans, row_taus(plans, tau))):
        t = t_b - slack
        if p.expert_id is not None:
            Dout[b, 0], Iout[b, 0] = FORCED_SCORE, p.expert_id
        elif p.use and D is not None:
            kk = min(p.k or k, width)
            d, i = D[b, :kk], I[b, :kk]
            keep = (i >= 0) & (d >= t)
            Dout[b, :kk] = np.where(keep, d, -math.inf)
            Iout[b, :kk] = np.where(keep, i, -1)
    return Dout, Iout


__all__ = ["RoutePlan", "search_args", "apply", "row_taus", "FORCED_SCORE"]
