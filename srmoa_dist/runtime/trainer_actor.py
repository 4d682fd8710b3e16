"""`TrainerActor`: SR-TTT feedback jobs from a queue, so serving never waits for training.

`submit(request)` records a job (status "pending") and returns at once; one worker thread takes jobs
in order and runs each (status "running", then "done" with the edit's result or "failed" with the
error). Jobs queued together run as one call (`EditContext.run_feedback_many`: batches of non-neighbour
edits, one after another), and each job is answered as soon as its own batch has settled. Every status
change is written to data_dir/jobs/<job_id>.json (temp file + rename) before it
is reported. When the actor restarts after a crash (`max_restarts`), its constructor queues the
pending jobs again, and the worker's first act, before any job, is the edit recovery
(`ttt.recovery.Recovery`): every edit the crash left in flight is rolled back (an edit counts once
verified), leaked key-store reservations are freed. The job that was running then gets the status the
ledger says (its edit is found by job id): done when its edit had settled before the crash, failed
with what recovery undid, or failed with "nothing of its edit was written" when it had no ledger entry
yet. A job is never left pending or running forever. After a batch in which an edit failed, recovery
runs again (a failed undo leaves its intent for it) and the failed jobs' errors say what the ledger says.

The base model, query encoder and fusion are loaded lazily by the worker (the first job pays for it),
so the actor answers `job`/`submit` immediately after a (re)start. The store is reached through the
same actors as serving (their handles are the constructor's arguments): an `ExpertStoreClient` (writes
publish cache invalidations) and a `KeyStoreProxy` with the KeyStore method surface over the key-store actor.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.runtime.errors import brief
from srmoa_dist.runtime.trainer_metrics import TrainerMetrics
from srmoa_dist.ttt.phase_timings import PhaseTimings

log = logging.getLogger(__name__)

PUBLIC = ("job_id", "object", "status", "created", "started", "finished", "error", "result", "attempt",
          "namespace")


@ray.remote
class TrainerActor:
    """A queue of feedback jobs run one at a time by a worker thread (see the module docstring)."""

    def __init__(self, cfg: SrmoaConfig, shards: list[Any], keystore: Any) -> None:
        from srmoa_dist.runtime.store_init import jobs_dir

        self.cfg = cfg
        self._handles = (list(shards), keystore)           # the store's actors (named, detached)
        self.dir = jobs_dir(cfg)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)     # notified on every job status change
        self._jobs: dict[str, dict[str, Any]] = {}
        self._phases = PhaseTimings()               # recent edits' phase seconds, for /v1/stats
        self._queue: queue.Queue[str] = queue.Queue()
        self._ctx: Any = None
        self._ctx_error: str | None = None
        self._current: str | None = None
        self._interrupted: list[str] = []           # running when the trainer stopped: settled by recovery
        self._recovery: dict[str, Any] | None = None
        self._recovered = threading.Event()
        self.incarnation = uuid.uuid4().hex
        self._recover()
        self._thread = threading.Thread(target=self._worker, name="ttt-worker", daemon=True)
        self._thread.start()
        log.info("trainer ready (pid %d): %d jobs on record, %d queued", os.getpid(), len(self._jobs),
                 self._queue.qsize())

    # -- persistence ----------------------------------------------------------------------------------

    def _path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def _save(self, job: dict[str, Any]) -> None:
        p = self._path(job["job_id"])
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(job, f, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def _recover(self) -> None:
        jobs = []
        for p in self.dir.glob("job-*.json"):
            try:
                jobs.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                log.warning("unreadable job record %s skipped", p)
        jobs.sort(key=lambda j: j.get("created", 0))
        for job in jobs:
            self._jobs[job["job_id"]] = job
            if job["status"] == "running":            # its outcome is the ledger's, after recovery
                self._interrupted.append(job["job_id"])
                log.warning("job %s was running when the trainer stopped: settled by recovery", job["job_id"])
            elif job["status"] == "pending":
                self._queue.put(job["job_id"])

    def _recover_edits(self) -> None:
        """Settle the edits a crash left in flight, then the interrupted jobs from the ledger; retried
        until the stores answer (no job runs before)."""
        delay = 1.0
        while True:
            try:
                ctx = self._context(load_model=False)
                with ctx.edit_lock:
                    self._run_recovery(ctx)
                    for job_id in self._interrupted:
                        self._set(job_id, finished=time.time(), **_outcome(ctx.ledger.by_job(job_id), None))
                self._interrupted = []
                self._recovered.set()
                return
            except Exception:
                log.exception("edit recovery failed; retrying in %.0f s", delay)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def _run_recovery(self, ctx: Any) -> None:
        from srmoa_dist.ttt.recovery import Recovery

        report = Recovery(ctx.client, ctx.keystore, ctx.ledger, invalidate=ctx.invalidate).run()
        self._recovery = {**report.to_json(), "at": time.time()}

    def _prune(self) -> None:
        done = [j for j in self._jobs.values() if j["status"] not in ("pending", "running")]
        extra = len(done) - self.cfg.runtime.job_history
        for j in sorted(done, key=lambda j: j.get("finished") or 0)[: max(0, extra)]:
            self._jobs.pop(j["job_id"], None)
            try:
                self._path(j["job_id"]).unlink()
            except OSError:
                pass

    # -- API ------------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"name": "trainer", "path": str(self.dir), "pid": os.getpid(), "incarnation": self.incarnation}

    def ping(self) -> bool:
        return True

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a feedback job (a FeedbackRequest as a dict); returns the job (status pending/skipped)."""
        now = time.time()
        job = {"job_id": f"job-{uuid.uuid4().hex[:16]}", "object": "feedback.job", "status": "pending",
               "created": now, "started": None, "finished": None, "error": None, "result": None,
               "attempt": 1, "request": dict(request),
               "namespace": str(request.get("namespace") or "default")}
        if request.get("verdict") == "correct":
            job.update(status="skipped", finished=now, result={"reason": "the response was marked correct"})
        with self._lock:
            self._jobs[job["job_id"]] = job
            self._save(job)
            self._prune()
            out = _public(job)          # as submitted: the worker may start it the moment it is queued
        if job["status"] == "pending":
            self._queue.put(job["job_id"])
        else:
            TrainerMetrics.job(job["status"])
        TrainerMetrics.queue(self._queue.qsize())
        return out

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            j = self._jobs.get(job_id)
            return _public(j) if j is not None else None

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            return [_public(j) for j in list(self._jobs.values())[-limit:]]

    def wait(self, job_id: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """The job once it is finished, or as it is after `timeout_s` (woken by the job's status change,
        not by polling it)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                j = self.job(job_id)
                left = deadline - time.monotonic()
                if j is None or j["status"] not in ("pending", "running") or left <= 0:
                    return j
                self._changed.wait(left)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts: dict[str, int] = {}
            for j in self._jobs.values():
                counts[j["status"]] = counts.get(j["status"], 0) + 1
            phases = self._phases.summary()
        return {"queued": self._queue.qsize(), "running": self._current, "jobs": counts,
                "model_loaded": self._ctx is not None, "load_error": self._ctx_error, "pid": os.getpid(),
                "incarnation": self.incarnation, "recovered": self._recovered.is_set(),
                "recovery": self._recovery, "edit_phase_seconds": phases,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),   # as the process started
                "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}

    def list_edits(self) -> list[dict[str, Any]]:
        ctx = self._context(load_model=False)
        return [_edit_json(r) for r in ctx.ledger.list()]

    def rollback(self, edit_id: str) -> dict[str, Any]:
        """Undo an edit (expert version, key, ledger); {"error": ...} when it cannot be undone."""
        ctx = self._context(load_model=False)
        with ctx.edit_lock:
            if edit_id not in ctx.ledger:
                return _err(404, f"no edit '{edit_id}'", "edit_not_found")
            rec = ctx.ledger.get(edit_id)
            if rec.status in ("rolled_back", "failed"):
                return _err(409, f"edit '{edit_id}' is {rec.status}; there is nothing to roll back",
                            "edit_not_active")
            try:
                out = ctx.rollback(edit_id)
            except Exception as e:
                log.exception("rollback of %s failed", edit_id)
                return _err(409, f"edit '{edit_id}' cannot be rolled back: {e}", "rollback_failed")
        TrainerMetrics.rollback(rec.extra.get("namespace"))
        return {"object": "edit.rollback", "edit_id": edit_id, "status": "rolled_back", **(out or {})}

    # -- worker ---------------------------------------------------------------------------------------

    def _context(self, load_model: bool = True) -> Any:
        from srmoa_dist.runtime.edit_context import EditContext

        with self._lock:
            if self._ctx is None:
                self._ctx = EditContext(self.cfg, *self._handles)
        if load_model:
            self._ctx.load_model()
        return self._ctx

    def _set(self, job_id: str, **fields: Any) -> None:
        with self._changed:
            job = self._jobs[job_id]
            job.update(fields)
            self._save(job)
            self._changed.notify_all()

    def _worker(self) -> None:
        from srmoa_dist.model.loading import set_torch_threads

        # every core: an edit finishes while the user waits (serving shares them while one trains)
        set_torch_threads(self.cfg.runtime.torch_threads)
        self._recover_edits()                       # before any job: what a crash left in flight
        while True:
            batch = self._take_batch()
            if not batch:
                continue
            self._run_batch(batch)
            with self._lock:
                self._current = None
                self._prune()

    def _run_batch(self, batch: list[str]) -> None:
        """Run one batch of jobs; each job is settled (done, or failed after recovery)."""
        done: set[str] = set()

        def settled(i: int, r: Any) -> None:
            """A job whose edit has settled is answered at once, before the rest of the batch runs;
            a failed one waits for the recovery after the batch."""
            if not isinstance(r, BaseException):
                self._done(batch[i], r)
                done.add(batch[i])

        try:
            ctx = self._context()
            with ctx.edit_lock:
                results = ctx.run_feedback_many([self._jobs[j]["request"] for j in batch], job_ids=batch,
                                                on_result=settled)
        except Exception as e:                  # the model or the stores are unusable: every job fails
            log.exception("jobs %s failed", batch)
            results = [e] * len(batch)
        failed = {j: r for j, r in zip(batch, results) if j not in done and isinstance(r, BaseException)}
        if failed:
            self._settle_failed(failed)
        for job_id, r in zip(batch, results):
            if job_id in failed:
                self._record_metrics(job_id, r)
            elif job_id not in done:
                self._done(job_id, r)

    def _done(self, job_id: str, r: dict[str, Any]) -> None:
        """A job whose edit settled (verified or rolled back): recorded "done" with its result."""
        self._set(job_id, status="done", finished=time.time(), result=r)
        log.info("job %s done: edit %s %s (expert %s), phases %s", job_id, r.get("edit_id"),
                 r.get("status"), r.get("expert_id"), r.get("timings"))
        self._record_metrics(job_id, r)

    def _record_metrics(self, job_id: str, r: Any) -> None:
        """A job of the batch is settled: its final status, its edit's outcome and phase timings."""
        with self._lock:
            job = self._jobs.get(job_id) or {}
        ns = (job.get("request") or {}).get("namespace")
        TrainerMetrics.job(str(job.get("status", "failed")))
        if isinstance(r, BaseException):
            TrainerMetrics.edit_failed(ns)
        else:
            TrainerMetrics.edit(r, ns)
            with self._lock:
                self._phases.add(r.get("timings"))

    def _settle_failed(self, failed: dict[str, BaseException]) -> None:
        """Jobs whose edit raised: recovery settles what their edits left (an undo that failed, an edit
        committed but never verified), then each job says what the ledger says."""
        ledger = None
        try:
            ctx = self._context(load_model=False)
            with ctx.edit_lock:
                self._run_recovery(ctx)
            ledger = ctx.ledger
        except Exception:
            log.exception("edit recovery after failed jobs %s failed (the next start-up retries)",
                          list(failed))
        for job_id, err in failed.items():
            if ledger is None:                      # the ledger cannot say: the error as it was raised
                self._set(job_id, status="failed", finished=time.time(), error=brief(err, 500))
            else:
                self._set(job_id, finished=time.time(), **_outcome(ledger.by_job(job_id),
                                                                   brief(err, 500)))

    def _take_batch(self) -> list[str]:
        """The next pending job (waiting for one), and up to ttt.batch_edits - 1 more already queued;
        each marked running."""
        first = self._queue.get()
        ids = [first]
        while len(ids) < self.cfg.ttt.batch_edits:
            try:
                ids.append(self._queue.get_nowait())
            except queue.Empty:
                break
        batch = []
        with self._lock:
            for job_id in ids:
                job = self._jobs.get(job_id)
                if job is not None and job["status"] == "pending":
                    batch.append(job_id)
            self._current = batch[0] if batch else None
        for job_id in batch:
            self._set(job_id, status="running", started=time.time())
        TrainerMetrics.queue(self._queue.qsize())
        return batch


def _outcome(recs: list[Any], error: str | None) -> dict[str, Any]:
    """A job's status, error and result from its edit's ledger record (the latest of `recs`), after
    recovery: `error` is what the job raised (None: the trainer stopped under it)."""
    stopped = "the trainer stopped while this job was running (it was restarted)"
    why = error or stopped
    if not recs:
        return {"status": "failed", "result": None,
                "error": f"{why}; nothing of its edit was written (no ledger entry): the edit was not "
                         "applied — send the feedback again"}
    rec = recs[-1]
    result = {**_edit_json(rec), "recovered": bool(rec.extra.get("recovered"))}
    if rec.status in ("verified", "committed") or (rec.status == "rolled_back" and not result["recovered"]):
        return {"status": "done", "result": result, "error": None}       # settled before it stopped
    note = rec.notes[-1] if rec.notes else rec.status
    return {"status": "failed", "result": result,
            "error": f"{why}; its edit {rec.edit_id} is {rec.status} ({note}): the edit was not applied "
                     "— send the feedback again"}


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in PUBLIC}


def _err(status: int, message: str, code: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "code": code}}


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _edit_json(rec: Any) -> dict[str, Any]:
    d = rec.to_json()
    d.pop("prev_key", None)
    d.pop("new_key", None)
    d["object"] = "edit"
    return json.loads(json.dumps(d, default=_jsonable))


__all__ = ["TrainerActor"]
