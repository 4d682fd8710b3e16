"""SR-TTT edits end to end: reflect -> diversify -> train -> commit -> verify (else roll back).

An `Edit` is one edit's steps as methods, in the order they run; `apply_edits` runs several edits
together (one training batch, then each committed and verified on its own) and `apply_edit` one. They
take the core objects (`EditEnv`) so the Ray layer can pass its clients: the store needs
`put_many, get_many, versions, rollback`; the key store `add, update, pin, free, get, search` (and
`hold, release`): the same method names on the in-process classes and on the Ray proxies.

Commit order (serving goes on meanwhile; the order keeps a routed key's expert stored, and a missing one
would only be skipped by serving, never fail a request). Every write comes after a ledger line that says
what it will be, so `ttt.recovery` can roll any crash forward or back:
  1. a new expert's slot: the ledger intent (slot -1), then the slot reserved in the key store with a
     zero key (pinned; scores 0, under tau), then the intent rewritten with its id;
  2. training (reads only);
  3. the full intent (previous version, key and pin state, the new key), fsynced;
  4. `store.put_many({id: expert})` -> the new version;
  5. `keystore.update(id, key)` and `keystore.pin(id)` -> routing reaches the new version;
  6. the ledger entry (status "committed", replacing the intent), then `invalidate([id])`;
  7. verify, in one batched generation: the failing prompt is asked again (routed, greedy): its answer
     must contain the correct answer (or, with a rule only, be routed to the edited expert); each
     *neighbour* edit's question (a live edit whose expert scores >= tau - ttt.neighbour_margin on this
     edit's queries, from the ledger) must still be answered right; the locality probes' greedy outputs
     must equal those taken before the commit. Pass -> "verified"; fail -> `rollback`. Each re-ask has
     an expected output (the trained target; the probe's output before), confirmed for all of them in
     one teacher-forced forward (`model.greedy_check`); only a re-ask that differs is decoded.

Neighbours also guard the training: a stored prompt of each trains beside this edit's, under the
mixture serving will use (`ttt.trainer`), so an edit holds when other experts answer near it; a contrast
prompt about the question's subject keeps the base model's answer (`ttt.contrast`).

A failure anywhere undoes what of the edit is in place (`ttt.recovery.undo`) and records it "failed";
if the undo itself fails, the intent stays for the trainer's recovery. `rollback(edit_id)` writes
"rolling_back", restores the previous expert version and key (and pin state), or frees the slot of an
expert the edit created, and marks the ledger entry "rolled_back"; it is idempotent (a retry after a
crash finds the store already restored and finishes the rest).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.routing.relation_gate import defers
from srmoa_dist.ttt.contrast import contrast_questions, relation_questions, subject_of
from srmoa_dist.ttt.detect import Failure, Messages, answer_matches, as_messages
from srmoa_dist.ttt.diversify import CONTRAST, TrainingPrompt, diversify
from srmoa_dist.ttt.edit_env import (
    EditEnv,
)
from srmoa_dist.ttt.ledger import LIVE, EditLedger, EditRecord
from srmoa_dist.ttt.recovery import Writes, expected_version, undo, version_of
from srmoa_dist.ttt.reflect import Ask, reflect
from srmoa_dist.ttt.trainer import Guard, Target, TrainingJob, TrainResult, train_jobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditResult:
    """The outcome of one `apply_edit`."""

    edit_id: str
    status: str                          # "verified" | "rolled_back" | "committed" (verification off)
    expert_id: int
    created: bool
    rule: str
    prompts: tuple[TrainingPrompt, ...]
    steps: int
    lm_losses: tuple[float, ...]
    router_losses: tuple[float, ...]
    prev_version: int | None
    new_version: int
    answer: str | None = None            # the re-asked failing prompt's new answer
    answer_ok: bool | None = None        # None when not verified
    routed_to: tuple[int, ...] = ()      # experts the re-asked prompt was routed to
    locality_changed: tuple[int, ...] = ()   # indices of locality probes whose output changed
    reason: str = ""                     # why it was rolled back
    timings: dict[str, float] = field(default_factory=dict)   # reflect/train/commit/verify/total seconds
    neighbours: tuple[str, ...] = ()     # edit ids of the neighbour edits (guards, re-verified)
    neighbours_broken: tuple[str, ...] = ()   # those no longer answered right after the commit
    locality_after: tuple[tuple[int, ...], ...] | None = None   # probes' greedy ids after the commit
    batch_size: int = 1                  # edits trained together in this edit's batch

    def to_json(self) -> dict[str, Any]:
        return {
            "edit_id": self.edit_id, "status": self.status, "expert_id": self.expert_id,
            "created": self.created,
            "rule": self.rule, "prompts": [p.to_dict() for p in self.prompts], "steps": self.steps,
            "lm_losses": list(self.lm_losses), "router_losses": list(self.router_losses),
            "prev_version": self.prev_version, "new_version": self.new_version, "answer": self.answer,
            "answer_ok": self.answer_ok, "routed_to": list(self.routed_to),
            "locality_changed": list(self.locality_changed), "reason": self.reason,
            "timings": dict(self.timings), "neighbours": list(self.neighbours),
            "neighbours_broken": list(self.neighbours_broken), "batch_size": self.batch_size,
        }


class EditFailed(RuntimeError):
    """Training or commit failed; nothing stays committed. `.edit_id` names the ledger entry."""

    def __init__(self, message: str, edit_id: str) -> None:
        super().__init__(message)
        self.edit_id = edit_id


# ----------------------------------------------------------------------------------------------------
# Neighbours


def _is_pinned(keystore: Any, expert_id: int) -> bool | None:
    """The key store's pin flag of one id (`is_pinned`), or None when it cannot tell."""
    try:
        return bool(np.asarray(keystore.is_pinned(np.array([expert_id], np.int64))).reshape(-1)[0])
    except Exception:        # a store or proxy without it
        return None


def find_neighbours(queries: np.ndarray, keystore: Any, ledger: EditLedger, k: int, tau: float,
                    margin: float) -> list[EditRecord]:
    """Live edits whose experts score >= tau - margin on any of `queries` (P, d): the edits this one
    will be served beside. Latest first per expert."""
    D, I = keystore.search(np.asarray(queries, np.float32), k, tau=-1.0)            # (P, k)
    D, I = np.asarray(D), np.asarray(I)
    near = {int(i) for i in I[(I >= 0) & (D >= tau - margin)].tolist()}
    if not near:
        return []
    live = [r for r in ledger.list(LIVE) if r.expert_id in near]
    return sorted(live, key=lambda r: r.created_at, reverse=True)


def guard_rows(neighbours: Sequence[EditRecord], per_edit: int,
               limit: int) -> list[tuple[int, TrainingPrompt]]:
    """(expert id, prompt) pairs: the first `per_edit` stored prompts of each neighbour, `limit` in all
    (the direct-answer structures come first in the ledger's STRUCTURES order)."""
    out: list[tuple[int, TrainingPrompt]] = []
    for rec in neighbours:
        for d in rec.prompts[:per_edit]:
            if len(out) >= limit:
                return out
            out.append((rec.expert_id, TrainingPrompt.from_dict(d)))
    return out


# ----------------------------------------------------------------------------------------------------
# the steps of one edit, and apply_edit / apply_edits over them


class Edit:
    """One edit's steps, in the order they run: `prepare` (reflect, diversify, neighbours, target),
    training (`train_jobs`, alone or beside other edits), `commit`, then `settle` with the verification's
    generations. Nothing is written before `commit` but a reserved slot (after its intent), which `fail`
    frees. `job_id` (the trainer's job) is recorded in the ledger entry."""

    def __init__(self, env: EditEnv, failure: Failure, *, ask: Ask | None = None, exclude: Sequence[str] = (),
                 edit_id: str | None = None, may_refine: Callable[[int], bool] | None = None,
                 seed: int = 0, job_id: str | None = None) -> None:
        self.env, self.failure, self.ask = env, failure, ask
        self.job_id = job_id
        self.exclude, self.seed = tuple(exclude), seed
        self.edit_id = edit_id or env.ledger.new_id()
        if self.edit_id in env.ledger:
            raise ValueError(f"edit id {self.edit_id!r} is already in the ledger")
        live = env.ledger.live_experts()
        self.live = live
        self.may_refine = may_refine if may_refine is not None else (lambda i: i not in live)
        self.timings: dict[str, float] = {}
        self.t_start = time.perf_counter()
        self.reserved: list[int] = []
        self.rule = ""
        self.prompts: list[TrainingPrompt] = []
        self.neighbours: list[EditRecord] = []
        self.same_subject: list[EditRecord] = []     # ttt.entity_experts: earlier live edits of the subject
        self.job: TrainingJob | None = None
        self.res: TrainResult | None = None
        self.rec: EditRecord | None = None
        self.intent: EditRecord | None = None     # the ledger intent, while the edit is in flight
        self.batch_size = 1

    # 1. reflect, diversify, neighbours, the training job (RuleRejected / HeldOutLeak before any write)
    def prepare(self) -> None:
        env, ttt, ks_cfg = self.env, self.env.cfg.ttt, self.env.cfg.keystore
        t = time.perf_counter()
        self.rule = reflect(self.failure, self.ask, ttt)
        self.prompts = diversify(self.failure, self.rule, exclude=self.exclude)
        self.timings["reflect_s"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            qs = env.queries([p.messages for p in self.prompts])                          # (4, d_key)
            self.neighbours = find_neighbours(qs, env.keystore, env.ledger, ks_cfg.k, ks_cfg.tau,
                                              ttt.neighbour_margin)
            rows = guard_rows(self.neighbours, ttt.guard_prompts, ttt.max_guard_prompts)
            guards = []
            if rows:
                gq = env.queries([p.messages for _, p in rows])                           # (G, d_key)
                guards = [Guard(eid, p, gq[j]) for j, (eid, p) in enumerate(rows)]
            contrast = self._contrast_rows()
            guards += contrast
            cq = np.stack([g.query for g in contrast]) if contrast and ttt.contrast_weight > 0 else None
            self.same_subject = self._subject_edits()
            target, rows, rq = self._subject_target(qs)
            self.job = TrainingJob(env.base, env.fusion, rows, rq, env.keystore, env.store, ttt,
                                   ks_cfg, env.cfg.expert, new_slot=self._reserve, may_refine=self.may_refine,
                                   target=target, tau=ks_cfg.tau, seed=self.seed, guards=guards, contrast=cq,
                                   relation=self._relation(), named_only=defers(env.encoder))
        except Exception as e:
            raise self.fail(e, "training failed") from e
        self.timings["prepare_s"] = time.perf_counter() - t

    def _relation(self) -> Any:
        """The failing question's relation key and subject (an `ExpertRelation`) when the encoder has a
        relation gate (`model.relation_layer`) and the question a subject; else None."""
        gate = getattr(self.env.encoder, "gate", None)
        if gate is None:
            return None
        q = self.failure.question
        return gate.relation_of(self.env.base, q, subject_of(q))

    def _subject_edits(self) -> list[EditRecord]:
        """With ttt.entity_experts: the live edits about this question's subject, all on the expert of
        the latest of them (latest first); else none."""
        if not self.env.cfg.ttt.entity_experts:
            return []
        s = subject_of(self.failure.question)
        if s is None:
            return []
        same = [r for r in self.env.ledger.list(LIVE) if (subject_of(r.question) or "").lower() == s.lower()]
        if not same:
            return []
        same.sort(key=lambda r: r.created_at, reverse=True)
        return [r for r in same if r.expert_id == same[0].expert_id]

    def _subject_target(self, qs: np.ndarray) -> tuple[Target | None, list[TrainingPrompt], np.ndarray]:
        """The target and the rows trained toward it: the subject's expert (refined) with this edit's
        prompts and the replayed prompts of its earlier edits (so the key and the expert hold every fact
        of the subject), or no fixed target (the trainer chooses) and this edit's prompts alone."""
        if not self.same_subject:
            return None, list(self.prompts), qs
        env, per_edit = self.env, self.env.cfg.ttt.entity_replay_prompts
        eid = self.same_subject[0].expert_id
        replay = [TrainingPrompt.from_dict(d) for r in self.same_subject for d in r.prompts[:per_edit]]
        rows = list(self.prompts) + replay
        rq = np.concatenate([qs, env.queries([p.messages for p in replay])]) if replay else qs   # (R, d_key)
        key = np.asarray(env.keystore.get(np.array([eid], np.int64)), np.float32).reshape(-1)      # (d_key,)
        m = qs.mean(0)
        score = float(m @ key / (np.linalg.norm(m) * np.linalg.norm(key) + 1e-12))
        log.info("edit %s refines expert %d, the expert of %d earlier edit(s) about its subject",
                 self.edit_id, eid, len(self.same_subject))
        return Target(eid, False, score), rows, rq

    def contrast_texts(self) -> list[str]:
        """The generic and relation questions about the failing question's subject that keep the base
        model's answer (`ttt.contrast_prompts`, `ttt.relation_contrast`), held-out texts left out."""
        ttt = self.env.cfg.ttt
        held = [" ".join(x.lower().split()) for x in self.exclude]
        q = self.failure.question
        texts = contrast_questions(q, ttt.contrast_prompts) + relation_questions(q, ttt.relation_contrast)
        return [t for t in texts if not any(h in t.lower() for h in held)]

    def _contrast_rows(self) -> list[Guard]:
        """The contrast questions, each with the base model's own first sentence as its target, as guard
        rows without a router label."""
        env = self.env
        answers = env.base_answers_of(self.contrast_texts())
        rows = [([{"role": "user", "content": t}], a) for t, a in answers.items() if a]
        if not rows:
            return []
        q = env.queries([c for c, _ in rows])                                            # (C, d_key)
        return [Guard(-1, TrainingPrompt(CONTRAST, tuple(c), a), q[j]) for j, (c, a) in enumerate(rows)]

    def _reserve(self) -> int:
        """A new expert's slot: the intent first (slot -1), the pinned zero key, the intent with its id."""
        env = self.env
        if env.new_slot is not None:                # the caller's slot: the caller frees it
            eid = int(env.new_slot())
            self.reserved.append(eid)
            return eid
        self._write_intent(-1, True, stage="reserving")
        ids = env.keystore.add(np.zeros((1, env.cfg.keystore.d_key), np.float32), pinned=True)
        eid = int(np.asarray(ids).reshape(-1)[0])
        self.reserved.append(eid)
        self._write_intent(eid, True, prev_version=version_of(env.store, eid), prev_pinned=True,
                           stage="reserved")
        return eid

    def _write_intent(self, expert_id: int, created: bool, *, stage: str, prev_version: int | None = None,
                      prev_key: np.ndarray | None = None, prev_pinned: bool = False,
                      new_key: np.ndarray | None = None, new_version: int | None = None) -> None:
        f = self.failure
        self.intent = self.env.ledger.intent(EditRecord(
            edit_id=self.edit_id, status="intent", rule=self.rule,
            prompts=tuple(p.to_dict() for p in self.prompts), expert_id=expert_id, created=created,
            prev_version=prev_version, new_version=new_version, prev_key=prev_key, new_key=new_key,
            prev_pinned=prev_pinned, question=f.question, correct_answer=f.correct_answer,
            extra={"stage": stage, "job_id": self.job_id, "source": f.source, "request_id": f.request_id,
                   "slot_reserved": self.env.new_slot is None, "namespace": self.env.namespace}))

    # 2. commit: the full intent, the expert's new version, its key (pinned), the ledger entry, the caches
    def commit(self, res: TrainResult, train_s: float) -> None:
        env = self.env
        self.res = res
        self.timings["train_s"] = train_s
        t = time.perf_counter()
        eid = res.expert_id
        try:
            prev_version = version_of(env.store, eid)     # a recycled slot may hold an old record
            if not res.created and prev_version != res.prev_version:
                log.warning("edit %s: expert %d changed while it trained (version %s, trained from %s)",
                            self.edit_id, eid, prev_version, res.prev_version)
            prev_pinned = True if res.created else bool(_is_pinned(env.keystore, eid) or eid in self.live)
            self._write_intent(eid, res.created, stage="committing", prev_version=prev_version,
                               prev_key=res.prev_key, prev_pinned=prev_pinned, new_key=res.key,
                               new_version=expected_version(prev_version))
            new_version = int(env.store.put_many({eid: res.expert})[eid])
            env.keystore.update(np.array([eid], np.int64), res.key[None, :])
            env.keystore.pin(np.array([eid], np.int64), True)
            f = self.failure
            self.rec = env.ledger.commit(EditRecord(
                edit_id=self.edit_id, status="committed", rule=self.rule,
                prompts=tuple(p.to_dict() for p in self.prompts), expert_id=eid, created=res.created,
                prev_version=prev_version, new_version=new_version, prev_key=res.prev_key, new_key=res.key,
                prev_pinned=prev_pinned, lm_losses=res.lm_losses, router_losses=res.router_losses,
                steps=res.steps,
                question=f.question, correct_answer=f.correct_answer, train_seconds=res.seconds,
                extra={**self.intent.extra, "stage": "committed", "converged": res.converged,
                       "target_scores": list(res.target_scores), "guard_losses": list(res.guard_losses),
                       "neighbours": [r.edit_id for r in self.neighbours]},
            ))
            self.intent = None
        except Exception as e:
            raise self.fail(e, "commit failed") from e
        if env.invalidate is not None:
            env.invalidate([eid])
        self.timings["commit_s"] = time.perf_counter() - t
        log.info("edit %s committed: expert %d v%d (%s), %d steps", self.edit_id, eid, new_version,
                 "new" if res.created else "refined", res.steps)

    # 3. verify: the chats to generate (the failing prompt, then each neighbour's question)
    @property
    def checked(self) -> list[EditRecord]:
        eid = self.res.expert_id if self.res is not None else None
        others = [r for r in self.neighbours if r.expert_id != eid]
        return others + [r for r in self.same_subject if r.expert_id == eid]   # the subject's earlier facts

    def verify_chats(self) -> list[Messages]:
        return [self.failure.messages] + [_question_chat(r) for r in self.checked]

    def verify_expected(self) -> list[Any]:
        """Per verify chat, the answer it was trained to give (its instruction prompt's target), as the
        `Expected` output that `EditEnv.reask` confirms without decoding."""
        targets = [_instruction_target([p.to_dict() for p in self.prompts])]
        targets += [_instruction_target(r.prompts) for r in self.checked]
        return [self.env.expected_answer(c, t) for c, t in zip(self.verify_chats(), targets)]

    def unverified(self) -> EditResult:
        self.timings["total_s"] = time.perf_counter() - self.t_start
        return self._result("committed")

    # 4. settle: verified, or rolled back with the reasons
    def settle(self, gens: Sequence[Any], changed: Sequence[int], after: tuple[tuple[int, ...], ...],
               verify_s: float) -> EditResult:
        env, f, eid = self.env, self.failure, self.res.expert_id
        g, g_neigh = gens[0], gens[1:]
        routed_to = tuple(int(i) for i in g.expert_ids)
        if f.correct_answer is not None:
            answer_ok = answer_matches(g.text, f.correct_answer)
        else:
            answer_ok = eid in routed_to
        broken = [r.edit_id for r, gn in zip(self.checked, g_neigh) if not _still_right(r, gn)]
        self.timings["verify_s"] = verify_s
        reasons = []
        if not answer_ok:
            reasons.append(f"the failing prompt still fails (answer {g.text[:80]!r}, "
                           f"routed to {list(routed_to)})"
                           if f.correct_answer is not None else
                           f"the failing prompt is not routed to expert {eid} (routed to {list(routed_to)})")
        if broken:
            reasons.append(f"neighbour edit(s) {broken} no longer answered right")
        if changed:
            reasons.append(f"locality probes {list(changed)} changed their output")
        extra = {"answer": g.text, "routed_to": list(routed_to), "locality_changed": list(changed),
                 "neighbours_broken": broken, "timings": {k: round(v, 3) for k, v in self.timings.items()}}
        reason = "; ".join(reasons)
        if reasons:
            rollback(self.edit_id, store=env.store, keystore=env.keystore, ledger=env.ledger,
                     invalidate=env.invalidate, note=f"verification failed: {reason}", **extra)
            status = "rolled_back"
            log.warning("edit %s rolled back: %s", self.edit_id, reason)
        else:
            env.ledger.set_status(self.edit_id, "verified", note="verified", **extra)
            status = "verified"
        self.timings["total_s"] = time.perf_counter() - self.t_start
        return self._result(status, answer=g.text, answer_ok=answer_ok, routed_to=routed_to,
                            locality_changed=tuple(changed), reason=reason,
                            neighbours=tuple(r.edit_id for r in self.checked),
                            neighbours_broken=tuple(broken),
                            locality_after=after)

    # on any failure: undo what of the intent is in place, record the failure; the EditFailed to raise
    def fail(self, err: BaseException, what: str) -> EditFailed:
        if self.intent is not None:
            try:
                undo(self.intent, self.env.store, self.env.keystore)
                if self.intent.expert_id < 0 and self.reserved and self.env.new_slot is None:
                    self.env.keystore.free(np.array(self.reserved, np.int64))    # reserved, not yet named
            except Exception:        # the intent stays: the trainer's recovery finishes the undo
                log.exception("edit %s: could not undo its writes; left to recovery", self.edit_id)
                return EditFailed(f"edit {self.edit_id}: {what}: {type(err).__name__}: {err} (its partial "
                                  "writes are undone by the trainer's recovery)", self.edit_id)
        res, f = self.res, self.failure
        try:
            self.env.ledger.commit(EditRecord(
                edit_id=self.edit_id, status="failed", rule=self.rule,
                prompts=tuple(p.to_dict() for p in self.prompts),
                expert_id=res.expert_id if res is not None else -1, created=bool(res and res.created),
                prev_version=res.prev_version if res is not None else None, new_version=None,
                lm_losses=res.lm_losses if res is not None else (),
                router_losses=res.router_losses if res is not None else (),
                steps=res.steps if res is not None else 0,
                question=f.question, correct_answer=f.correct_answer,
                notes=(f"{type(err).__name__}: {err}",),
                extra={"job_id": self.job_id, "source": f.source, "request_id": f.request_id,
                       "namespace": self.env.namespace},
            ))
            self.intent = None
        except Exception:
            log.exception("could not record the failed edit %s in the ledger", self.edit_id)
        return EditFailed(f"edit {self.edit_id}: {what}: {type(err).__name__}: {err}", self.edit_id)

    def _result(self, status: str, **kw: Any) -> EditResult:
        rec, res = self.rec, self.res
        return EditResult(edit_id=rec.edit_id, status=status, expert_id=rec.expert_id, created=rec.created,
                          rule=rec.rule, prompts=tuple(self.prompts), steps=res.steps,
                          lm_losses=res.lm_losses,
                          router_losses=res.router_losses, prev_version=rec.prev_version,
                          new_version=int(rec.new_version), timings=dict(self.timings),
                          batch_size=self.batch_size, **kw)


def apply_edit(
    failure: Failure,
    *,
    base: Any,
    fusion: Any,
    encoder: Any,
    store: Any,
    keystore: Any,
    ledger: EditLedger,
    cfg: SrmoaConfig,
    ask: Ask | None = None,
    locality_prompts: Sequence[str | Messages] = (),
    locality_before: Sequence[Sequence[int]] | None = None,
    exclude: Sequence[str] = (),
    verify: bool = True,
    invalidate: Callable[[list[int]], None] | None = None,
    new_slot: Callable[[], int] | None = None,
    may_refine: Callable[[int], bool] | None = None,
    edit_id: str | None = None,
    seed: int = 0,
) -> EditResult:
    """Run one SR-TTT edit for `failure` (see the module docstring). Returns the EditResult.

    ask: text -> text for reflection (see `reflect` and `ttt.reflect`); locality_prompts: unrelated prompts
    (the first cfg.ttt.locality_probes are used); locality_before: their greedy token ids before the edit,
    when the caller has them cached; exclude: held-out evaluation texts that must not be trained on;
    invalidate: called with the edited expert id after commit and rollback (replica caches); new_slot:
    reserves an id for a new expert (default: a zero key added to the key store, pinned); may_refine: may
    this existing expert be refined (default: not if a live edit in the ledger holds it).
    Raises RuleRejected / HeldOutLeak before anything is written, EditFailed if training or the
    commit fails (the ledger records the failure and any reserved slot is freed).
    """
    env = EditEnv(base, fusion, encoder, store, keystore, ledger, cfg, invalidate, new_slot)
    edit = Edit(env, failure, ask=ask, exclude=exclude, edit_id=edit_id, may_refine=may_refine, seed=seed)
    [out] = apply_edits(env, [edit], locality_prompts=locality_prompts, locality_before=locality_before,
                        verify=verify)
    if isinstance(out, BaseException):
        raise out
    return out


def apply_edits(env: EditEnv, edits: Sequence[Edit], *, locality_prompts: Sequence[str | Messages] = (),
                locality_before: Sequence[Sequence[int]] | None = None,
                verify: bool = True) -> list[EditResult | BaseException]:
    """Several edits trained in one batch (`ttt.trainer.train_jobs`), then each committed and verified
    on its own (one batched generation for all): an edit that fails to prepare, train, commit or verify
    takes no other edit with it. Returns per edit its EditResult or the exception it raised. Edits that
    are each other's neighbours should not share a batch (`Editor.run_many` keeps them apart)."""
    ttt = env.cfg.ttt
    out: list[EditResult | BaseException | None] = [None] * len(edits)
    probes = [as_messages(p) for p in list(locality_prompts)[: ttt.locality_probes]]
    if locality_before is not None and len(locality_before) < len(probes):
        raise ValueError(f"locality_before has {len(locality_before)} outputs for {len(probes)} probes")
    if verify and probes and locality_before is None:      # before any slot is reserved
        t = time.perf_counter()
        locality_before = [g.token_ids for g in env.generate(probes)]
        for e in edits:
            e.timings["locality_before_s"] = time.perf_counter() - t
    if len(edits) > 1:                    # the base model's contrast answers, in one batch for all
        env.base_answers_of([t for e in edits for t in e.contrast_texts()])
    for i, e in enumerate(edits):
        try:
            e.prepare()
        except Exception as err:
            out[i] = err
    ready = [i for i, e in enumerate(edits) if out[i] is None]
    t = time.perf_counter()
    try:
        trained = train_jobs(env.base, env.fusion, [edits[i].job for i in ready], ttt)
    except Exception as err:
        trained = [err] * len(ready)
    train_s = time.perf_counter() - t
    for i, res in zip(ready, trained):
        edits[i].batch_size = len(ready)
        try:
            if isinstance(res, BaseException):
                raise edits[i].fail(res, "training failed") from res
            edits[i].commit(res, train_s)
        except Exception as err:
            out[i] = err
    committed = [i for i in ready if out[i] is None]
    if not verify:
        for i in committed:
            out[i] = edits[i].unverified()
        return out
    if not committed:
        return out
    from srmoa_dist.model.greedy_check import expected_output

    t = time.perf_counter()
    chats = [c for i in committed for c in edits[i].verify_chats()] + probes
    expected = [x for i in committed for x in edits[i].verify_expected()]
    expected += [expected_output(b, ttt.verify_max_new_tokens) for b in locality_before or ()][: len(probes)]
    gens = env.reask(chats, expected)
    g_probes = gens[len(gens) - len(probes):] if probes else []
    after = tuple(tuple(int(x) for x in gp.token_ids) for gp in g_probes)
    changed = [j for j, (a, b) in enumerate(zip(locality_before or [], g_probes))
               if list(a) != list(b.token_ids)]
    verify_s = time.perf_counter() - t
    pos = 0
    for i in committed:
        e = edits[i]
        n = len(e.verify_chats())
        mine = [j for j in changed if len(committed) == 1 or e.res.expert_id in g_probes[j].expert_ids]
        try:
            out[i] = e.settle(gens[pos:pos + n], mine, after, verify_s)
        except Exception as err:            # a rollback that failed: left "rolling_back" for recovery
            log.exception("edit %s could not be settled", e.edit_id)
            out[i] = err
        pos += n
    return out


def _question_chat(rec: EditRecord) -> Messages:
    """The failing question of a ledger record, as the user asked it (its instruction prompt)."""
    for d in rec.prompts:
        if d.get("structure") == "instruction":
            return [dict(m) for m in d["messages"] if m["role"] != "system"]
    return as_messages(rec.question)


def _instruction_target(prompts: Sequence[dict]) -> str | None:
    """The target of the instruction prompt (the question as the user asked it) among stored prompts."""
    return next((d["target"] for d in prompts if d.get("structure") == "instruction"), None)


def _still_right(rec: EditRecord, g: Any) -> bool:
    """Is a neighbour edit still in force: its answer given (or, rule only, still routed to it)?"""
    if rec.correct_answer:
        return answer_matches(g.text, rec.correct_answer)
    return rec.expert_id in [int(i) for i in g.expert_ids]


# ----------------------------------------------------------------------------------------------------
# rollback


def rollback(
    edit_id: str,
    *,
    store: Any,
    keystore: Any,
    ledger: EditLedger,
    invalidate: Callable[[list[int]], None] | None = None,
    note: str = "",
    **extra: Any,
) -> EditRecord:
    """Undo a committed or verified edit: the previous expert version and key come back (an expert the
    edit created has its key slot freed and its record deleted). Only the latest live edit of an
    expert can be undone (the store keeps one previous version). "rolling_back" is written first, so a
    crash midway is finished by recovery or by calling this again: each write is checked before it is
    redone (`ttt.recovery.undo`). Returns the ledger record, now "rolled_back"."""
    rec = ledger.get(edit_id)
    if rec.status not in ("committed", "verified", "rolling_back"):
        raise ValueError(f"edit {edit_id!r} is {rec.status}: only committed or verified edits can be "
                         "rolled back")
    later = [r.edit_id for r in ledger.list(LIVE)
             if r.expert_id == rec.expert_id and r.created_at > rec.created_at and r.edit_id != edit_id]
    if later:
        raise ValueError(f"edit {edit_id!r}: expert {rec.expert_id} was edited again by {later}; roll "
                         "those back first (the store keeps one previous version)")
    eid = rec.expert_id
    if not rec.created:
        if rec.prev_key is None:
            raise ValueError(f"edit {edit_id!r} refined expert {eid} but recorded no previous key")
        w = Writes.of(rec, store, keystore)
        if not w.expert(rec) and w.version != rec.prev_version:
            raise ValueError(f"edit {edit_id!r}: expert {eid} is at version {w.version}, neither the edit's "
                             f"{rec.new_version} nor the previous {rec.prev_version}; it changed since "
                             "(cannot roll back safely)")
    if rec.status != "rolling_back":
        rec = ledger.set_status(edit_id, "rolling_back")
    undo(rec, store, keystore)
    if invalidate is not None:
        invalidate([eid])
    log.info("edit %s rolled back (expert %d %s)", edit_id, eid, "freed" if rec.created else "restored")
    return ledger.set_status(edit_id, "rolled_back", note=note or "rolled back", **extra)
