"""What the trainer actor records in Prometheus (see runtime/metrics.py): feedback jobs by final
status, edits by outcome and namespace, each phase's duration from the edit's own timings
(`ttt/edit.py`: reflect_s, prepare_s, train_s, commit_s, verify_s, total_s), the queue's length."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from srmoa_dist.runtime import metrics


class TrainerMetrics:
    """The trainer actor's recording calls."""

    @staticmethod
    def job(status: str) -> None:
        metrics.inc("srmoa_feedback_jobs", status=status)

    @staticmethod
    def edit(result: Mapping[str, Any], namespace: str | None) -> None:
        """A finished edit's result (EditResult.to_json): its status and phase timings."""
        metrics.inc("srmoa_edits", status=str(result.get("status", "unknown")),
                    namespace=metrics.namespace_label(namespace))
        for key, seconds in (result.get("timings") or {}).items():
            if key.endswith("_s") and isinstance(seconds, (int, float)):
                metrics.observe("srmoa_edit_phase_seconds", float(seconds), phase=key[:-2])

    @staticmethod
    def edit_failed(namespace: str | None) -> None:
        metrics.inc("srmoa_edits", status="failed", namespace=metrics.namespace_label(namespace))

    @staticmethod
    def rollback(namespace: str | None) -> None:
        metrics.inc("srmoa_edits", status="rollback", namespace=metrics.namespace_label(namespace))

    @staticmethod
    def queue(n: int) -> None:
        metrics.set_gauge("srmoa_trainer_queue", float(n))


__all__ = ["TrainerMetrics"]
