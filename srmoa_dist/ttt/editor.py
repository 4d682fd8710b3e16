"""`Editor`: the SR-TTT edits of one store, one after another: what `POST /v1/feedback` runs.

The trainer actor's `EditContext` builds one over its Ray clients; `srmoa bench lifelong` builds one
over in-process stores, so the benchmark measures the code path of the API. A feedback request (the
`FeedbackRequest` fields as a dict) becomes a `Failure`, then `ttt.edit.apply_edit`.

The locality probes' greedy outputs before an edit are the outputs after the last verified one (an
edit rolled back leaves them as they were), so they are generated once, not before every edit; a
rollback by request drops the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.ttt.detect import Failure, explicit_failure
from srmoa_dist.ttt.edit import EditResult, apply_edit, model_ask, rollback
from srmoa_dist.ttt.ledger import EditLedger, EditRecord

log = logging.getLogger(__name__)


class Editor:
    """Runs edits against one store (see the module docstring); not thread-safe: one edit at a time."""

    def __init__(self, cfg: SrmoaConfig, *, base: Any, fusion: Any, encoder: Any, store: Any, keystore: Any,
                 ledger: EditLedger, locality_prompts: Sequence[str],
                 invalidate: Callable[[list[int]], None] | None = None) -> None:
        self.cfg = cfg
        self.base, self.fusion, self.encoder = base, fusion, encoder
        self.store, self.keystore, self.ledger = store, keystore, ledger
        self.locality_prompts = tuple(locality_prompts)
        self.invalidate = invalidate
        self._probes_before: list[list[int]] | None = None

    def failure(self, request: dict[str, Any], *, job_id: str | None = None) -> Failure:
        """The Failure of a feedback request (prompt or messages, response, correct_answer, rule)."""
        messages = request.get("messages") or [{"role": "user", "content": request["prompt"]}]
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return explicit_failure(
            messages, request.get("response") or "", correct_answer=request.get("correct_answer"),
            rule=request.get("rule"), request_id=request.get("request_id") or job_id,
            expert_ids=request.get("expert_ids") or ())

    def run(self, request: dict[str, Any], *, job_id: str | None = None, exclude: Sequence[str] = (),
            seed: int = 0) -> EditResult:
        """One feedback request -> one edit (verified, rolled back, or EditFailed raised)."""
        failure = self.failure(request, job_id=job_id)
        ask = model_ask(self.base) if failure.rule is None else None
        try:
            res = apply_edit(
                failure, base=self.base, fusion=self.fusion, encoder=self.encoder, store=self.store,
                keystore=self.keystore, ledger=self.ledger, cfg=self.cfg, ask=ask,
                locality_prompts=self.locality_prompts, locality_before=self._probes_before,
                exclude=exclude, invalidate=self.invalidate, seed=seed)
        except Exception:
            self._probes_before = None             # state unknown: generate them again next time
            raise
        if res.status == "verified" and res.locality_after is not None:
            self._probes_before = [list(x) for x in res.locality_after]
        return res

    def rollback(self, edit_id: str, note: str = "rolled back on request") -> EditRecord:
        self._probes_before = None
        return rollback(edit_id, store=self.store, keystore=self.keystore, ledger=self.ledger,
                        invalidate=self.invalidate, note=note)


__all__ = ["Editor"]
