"""`Editor`: the SR-TTT edits of one store, one after another: what `POST /v1/feedback` runs.

The trainer actor's `EditContext` builds one over its Ray clients; `srmoa bench lifelong` builds one
over in-process stores, so the benchmark measures the code path of the API. A feedback request (the
`FeedbackRequest` fields as a dict) becomes a `Failure`, then `ttt.edit.apply_edit`.

`run_many` trains several queued requests in one batch (`ttt.edit.apply_edits`), each committed and
verified on its own; requests whose questions are near each other go to separate batches, so each trains
with the other as a neighbour (a guard) instead of beside it blind. Two facts about one subject are near
for the router (its name dominates the query) but, with the relation gate deferring, not for serving:
the gate lets one expert of a subject answer a question, chosen by relation, and training already
leaves the subject's other experts out of an edit's mixture and guards. So with the gate such requests
share a batch, unless their questions score over `ttt.refine_radius` (one question asked twice, which
the later edit would refine instead of creating a second expert for).

The locality probes' greedy outputs before an edit are the outputs after the last verified one (an
edit rolled back leaves them as they were), so they are generated once, not before every edit; a
rollback by request drops the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.routing.relation_gate import defers
from srmoa_dist.ttt.contrast import subject_of
from srmoa_dist.ttt.detect import Failure, explicit_failure
from srmoa_dist.ttt.edit import Edit, EditResult, apply_edits, rollback
from srmoa_dist.ttt.edit_env import EditEnv, model_ask
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
        self._base_answers: dict[str, str] = {}     # contrast prompts' base answers, kept across edits

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
        """One feedback request -> one edit (verified or rolled back); raises what the edit raised."""
        [out] = self.run_many([request], job_ids=[job_id], excludes=[exclude], seeds=[seed])
        if isinstance(out, BaseException):
            raise out
        return out

    def run_many(self, requests: Sequence[dict[str, Any]], *, job_ids: Sequence[str | None] | None = None,
                 excludes: Sequence[Sequence[str]] | None = None,
                 seeds: Sequence[int] | None = None,
                 on_result: Callable[[int, EditResult | BaseException], None] | None = None,
                 ) -> list[EditResult | BaseException]:
        """Several requests, in batches of at most ttt.batch_edits non-neighbours; per request its
        EditResult or the exception its edit raised (one failure takes no other request with it).
        `on_result(i, result)` is called for each request as soon as its batch has settled, so a caller
        can answer it before the later batches have run."""
        n = len(requests)
        job_ids = list(job_ids or [None] * n)
        excludes = list(excludes or [()] * n)
        seeds = list(seeds or [0] * n)
        out: list[EditResult | BaseException | None] = [None] * n
        failures: dict[int, Any] = {}
        for i, r in enumerate(requests):
            try:
                failures[i] = self.failure(r, job_id=job_ids[i])
            except Exception as e:                  # a malformed request
                out[i] = e
        for batch in self._batches(failures):
            env = EditEnv(self.base, self.fusion, self.encoder, self.store, self.keystore, self.ledger,
                          self.cfg, self.invalidate, base_answers=self._base_answers)
            edits, idx = [], []
            for i in batch:
                f = failures[i]
                try:
                    edits.append(Edit(env, f, ask=model_ask(self.base) if f.rule is None else None,
                                      exclude=excludes[i], seed=seeds[i], job_id=job_ids[i]))
                    idx.append(i)
                except Exception as e:
                    out[i] = e
            results = self._apply(env, edits)
            for i, r in zip(idx, results):
                out[i] = r
            if on_result is not None:
                for i in batch:
                    on_result(i, out[i])
        if on_result is not None:                   # malformed requests (no batch)
            for i in range(n):
                if i not in failures:
                    on_result(i, out[i])
        return out  # type: ignore[return-value]

    def _apply(self, env: EditEnv, edits: list[Edit]) -> list[EditResult | BaseException]:
        try:
            results = apply_edits(env, edits, locality_prompts=self.locality_prompts,
                                  locality_before=self._probes_before)
        except Exception:
            self._probes_before = None             # state unknown: generate them again next time
            raise
        done = [r for r in results if isinstance(r, EditResult)]
        if any(r.status == "verified" for r in done):
            after = next(r.locality_after for r in done if r.locality_after is not None)
            self._probes_before = [list(x) for x in after]
        if any(not isinstance(r, EditResult) for r in results):
            self._probes_before = None
        return results

    def _batches(self, failures: dict[int, Any]) -> list[list[int]]:
        """Greedy batches of at most ttt.batch_edits requests whose questions' queries score under
        tau - ttt.neighbour_margin against each other, or, with the relation gate deferring, are about
        one subject and score under ttt.refine_radius (request order kept within a batch)."""
        order = list(failures)
        if len(order) <= 1:
            return [order] if order else []
        from srmoa_dist.model.generation import queries

        Q = queries(self.base, self.encoder, [list(failures[i].messages) for i in order])   # (n, d_key)
        S = Q @ Q.T                                                                       # (n, n)
        near = S >= self.cfg.keystore.tau - self.cfg.ttt.neighbour_margin
        if defers(self.encoder):
            subjects = [(subject_of(failures[i].question) or "").lower() for i in order]
            same = np.array([[a != "" and a == b for b in subjects] for a in subjects])   # (n, n)
            near &= ~same | (S >= self.cfg.ttt.refine_radius)
        left, batches = list(range(len(order))), []
        while left:
            batch: list[int] = []
            for j in list(left):
                if len(batch) < self.cfg.ttt.batch_edits and not any(near[j, b] for b in batch):
                    batch.append(j)
                    left.remove(j)
            batches.append([order[j] for j in batch])
        return batches

    def rollback(self, edit_id: str, note: str = "rolled back on request") -> EditRecord:
        self._probes_before = None
        return rollback(edit_id, store=self.store, keystore=self.keystore, ledger=self.ledger,
                        invalidate=self.invalidate, note=note)


__all__ = ["Editor"]
