"""One SR-TTT edit end to end: reflect -> diversify -> train -> commit -> verify (else roll back).

`apply_edit` takes the core objects as parameters so the Ray layer can pass its clients: the store
needs `put_many, get_many, versions, rollback`; the key store `add, update, pin, free, get, search`
(the same method names on the in-process classes and on the Ray proxies).

Commit order (serving goes on meanwhile and must never route to a missing expert):
  1. a new expert's slot is reserved in the key store with a zero key (pinned; scores 0, under tau);
  2. training (reads only);
  3. `store.put_many({id: expert})` -> the new version;
  4. `keystore.update(id, key)` and `keystore.pin(id)` -> routing reaches the new version;
  5. the ledger entry (status "committed"), then `invalidate([id])` (replicas' expert caches);
  6. verify, in one batched generation: the failing prompt is asked again (routed, greedy): its answer
     must contain the correct answer (or, with a rule only, be routed to the edited expert); each
     *neighbour* edit's question (a live edit whose expert scores >= tau - ttt.neighbour_margin on this
     edit's queries, from the ledger) must still be answered right; the locality probes' greedy outputs
     must equal those taken before the commit. Pass -> "verified"; fail -> `rollback`.

Neighbours also guard the training: a few of their stored prompts train beside this edit's, under the
mixture serving will use (`ttt.trainer`), so an edit holds when other experts answer near it.

`rollback(edit_id)` restores the previous expert version and key (and pin state), or frees the slot
of an expert the edit created, and marks the ledger entry "rolled_back".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.ttt.detect import Failure, Messages, answer_matches, as_messages
from srmoa_dist.ttt.diversify import TrainingPrompt, diversify
from srmoa_dist.ttt.ledger import EditLedger, EditRecord
from srmoa_dist.ttt.reflect import Ask, reflect
from srmoa_dist.ttt.trainer import Guard, TrainResult, train_edit

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
            "neighbours_broken": list(self.neighbours_broken),
        }


class EditFailed(RuntimeError):
    """Training or commit failed; nothing stays committed. `.edit_id` names the ledger entry."""

    def __init__(self, message: str, edit_id: str) -> None:
        super().__init__(message)
        self.edit_id = edit_id


# ----------------------------------------------------------------------------------------------------
# Helpers the Ray layer may reuse


def make_router(keystore: Any, k: int,
                tau: float | None = None) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """generation.Router over a key store: top-k ids, -1 under tau (the key store's own tau when None)."""
    def router(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return keystore.search(np.asarray(xq, dtype=np.float32), k, tau=tau)
    return router


def make_fetch(store: Any) -> Callable[[list[int]], dict[int, Any]]:
    """generation.Fetch over an expert store's get_many."""
    def fetch(ids: list[int]) -> dict[int, Any]:
        ids = [int(i) for i in ids]
        return dict(zip(ids, store.get_many(ids)))
    return fetch


def model_ask(base: Any, max_new_tokens: int = 64) -> Ask:
    """An `Ask` for reflection: the plain base model (no routing), greedy, one user turn."""
    from srmoa_dist.model.generation import GenerationParams, generate

    def ask(prompt: str) -> str:
        [g] = generate(base, None, None, [[{"role": "user", "content": prompt}]],
                       params=GenerationParams(max_new_tokens=max_new_tokens))
        return g.text
    return ask


def _is_pinned(keystore: Any, expert_id: int) -> bool | None:
    """The key store's pin flag of one id (`is_pinned`), or None when it cannot tell."""
    try:
        return bool(np.asarray(keystore.is_pinned(np.array([expert_id], np.int64))).reshape(-1)[0])
    except Exception:        # a store or proxy without it
        return None


def _version_or_none(store: Any, expert_id: int) -> int | None:
    """The stored version of one expert, None when it is not stored."""
    try:
        v = store.versions([expert_id])[0]
    except LookupError:                     # MissingExpertError (a KeyError), also through Ray
        return None
    return None if v is None else int(v)


def _generate(base: Any, fusion: Any, encoder: Any, chats: Sequence[Messages], router: Any, fetch: Any,
              max_new_tokens: int) -> list[Any]:
    from srmoa_dist.model.generation import GenerationParams, generate

    if not chats:
        return []
    return generate(base, fusion, encoder, [list(c) for c in chats], router, fetch,
                    GenerationParams(max_new_tokens=max_new_tokens))


def find_neighbours(queries: np.ndarray, keystore: Any, ledger: EditLedger, k: int, tau: float,
                    margin: float) -> list[EditRecord]:
    """Live edits whose experts score >= tau - margin on any of `queries` (P, d): the edits this one
    will be served beside. Latest first per expert."""
    D, I = keystore.search(np.asarray(queries, np.float32), k, tau=-1.0)            # (P, k)
    D, I = np.asarray(D), np.asarray(I)
    near = {int(i) for i in I[(I >= 0) & (D >= tau - margin)].tolist()}
    if not near:
        return []
    live = [r for r in ledger.list(("committed", "verified")) if r.expert_id in near]
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
# apply_edit


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

    ask: text -> text for reflection when the failure has no rule (None: a rule is written from the
    correct answer); locality_prompts: unrelated prompts (the first cfg.ttt.locality_probes are used);
    locality_before: their greedy token ids before the edit, when the caller has them cached;
    exclude: held-out evaluation texts that must not be trained on; invalidate: called with the edited
    expert id after commit and rollback (replica caches); new_slot: reserves an id for a new expert
    (default: a zero key added to the key store, pinned); may_refine: may this existing expert be
    refined (default: not if a live edit in the ledger holds it).
    Raises RuleRejected / HeldOutLeak before anything is written, EditFailed if training or the
    commit fails (the ledger records the failure and any reserved slot is freed).
    """
    ttt, ks_cfg = cfg.ttt, cfg.keystore
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    edit_id = edit_id or ledger.new_id()
    if edit_id in ledger:
        raise ValueError(f"edit id {edit_id!r} is already in the ledger")

    # 1-2. reflect and diversify (pure; nothing written yet)
    t = time.perf_counter()
    rule = reflect(failure, ask, ttt)
    prompts = diversify(failure, rule, exclude=exclude)
    timings["reflect_s"] = time.perf_counter() - t

    from srmoa_dist.model.generation import queries as prompt_queries

    router = make_router(keystore, ks_cfg.k)
    fetch = make_fetch(store)
    probes = [as_messages(p) for p in list(locality_prompts)[: ttt.locality_probes]]
    if verify and probes and locality_before is None:
        t = time.perf_counter()
        locality_before = [g.token_ids for g in
                           _generate(base, fusion, encoder, probes, router, fetch, ttt.verify_max_new_tokens)]
        timings["locality_before_s"] = time.perf_counter() - t
    if locality_before is not None and len(locality_before) < len(probes):
        raise ValueError(f"locality_before has {len(locality_before)} outputs for {len(probes)} probes")

    # 3. train
    reserved: list[int] = []

    def reserve() -> int:
        if new_slot is not None:
            eid = int(new_slot())
        else:
            ids = keystore.add(np.zeros((1, ks_cfg.d_key), np.float32), pinned=True)
            eid = int(np.asarray(ids).reshape(-1)[0])
        reserved.append(eid)
        return eid

    live = ledger.live_experts()
    refine_ok = may_refine if may_refine is not None else (lambda i: i not in live)
    t = time.perf_counter()
    neighbours: list[EditRecord] = []
    try:
        qs = prompt_queries(base, encoder, [list(p.messages) for p in prompts])          # (4, d_key)
        neighbours = find_neighbours(qs, keystore, ledger, ks_cfg.k, ks_cfg.tau, ttt.neighbour_margin)
        rows = guard_rows(neighbours, ttt.guard_prompts, ttt.max_guard_prompts)
        guards = []
        if rows:
            gq = prompt_queries(base, encoder, [list(p.messages) for _, p in rows])       # (G, d_key)
            guards = [Guard(eid, p, gq[j]) for j, (eid, p) in enumerate(rows)]
        res = train_edit(base, fusion, prompts, qs, keystore, store, ttt, ks_cfg, cfg.expert,
                         new_slot=reserve, may_refine=refine_ok, tau=ks_cfg.tau, seed=seed, guards=guards)
    except Exception as e:
        _free_reserved(keystore, reserved, new_slot)
        _record_failure(ledger, edit_id, failure, rule, prompts, e)
        raise EditFailed(f"edit {edit_id}: training failed: {type(e).__name__}: {e}", edit_id) from e
    timings["train_s"] = time.perf_counter() - t

    # 4. commit
    t = time.perf_counter()
    eid = res.expert_id
    prev_pinned = True if res.created else bool(_is_pinned(keystore, eid) or eid in live)
    written = False
    try:
        prev_version = res.prev_version
        if res.created:
            prev_version = _version_or_none(store, eid)      # a recycled slot may hold an old record
        new_version = int(store.put_many({eid: res.expert})[eid])
        written = True
        keystore.update(np.array([eid], np.int64), res.key[None, :])
        keystore.pin(np.array([eid], np.int64), True)
    except Exception as e:
        if written and not res.created:        # the new weights must not serve under the old key
            try:
                store.rollback(eid)
                keystore.update(np.array([eid], np.int64), res.prev_key[None, :])
            except Exception:
                log.exception("edit %s: could not undo the partial commit of expert %d", edit_id, eid)
        _free_reserved(keystore, reserved, new_slot)
        _record_failure(ledger, edit_id, failure, rule, prompts, e, res)
        raise EditFailed(f"edit {edit_id}: commit failed: {type(e).__name__}: {e}", edit_id) from e
    rec = ledger.commit(EditRecord(
        edit_id=edit_id, status="committed", rule=rule, prompts=tuple(p.to_dict() for p in prompts),
        expert_id=eid, created=res.created, prev_version=prev_version, new_version=new_version,
        prev_key=res.prev_key, new_key=res.key, prev_pinned=prev_pinned, lm_losses=res.lm_losses,
        router_losses=res.router_losses, steps=res.steps, question=failure.question,
        correct_answer=failure.correct_answer, train_seconds=res.seconds,
        extra={"source": failure.source, "request_id": failure.request_id, "converged": res.converged,
               "target_scores": list(res.target_scores), "guard_losses": list(res.guard_losses),
               "neighbours": [r.edit_id for r in neighbours]},
    ))
    if invalidate is not None:
        invalidate([eid])
    timings["commit_s"] = time.perf_counter() - t
    log.info("edit %s committed: expert %d v%d (%s), %d steps", edit_id, eid, new_version,
             "new" if res.created else "refined", res.steps)

    result = _result(rec, prompts, res, status="committed", timings=timings)
    if not verify:
        timings["total_s"] = time.perf_counter() - t_start
        return result

    # 5. verify: the failing prompt, the neighbours' questions and the probes in one batch
    t = time.perf_counter()
    checked = [r for r in neighbours if r.expert_id != eid]
    chats = [failure.messages] + [_question_chat(r) for r in checked] + probes
    gens = _generate(base, fusion, encoder, chats, router, fetch, ttt.verify_max_new_tokens)
    g, g_neigh, g_probes = gens[0], gens[1:1 + len(checked)], gens[1 + len(checked):]
    routed_to = tuple(int(i) for i in g.expert_ids)
    if failure.correct_answer is not None:
        answer_ok = answer_matches(g.text, failure.correct_answer)
    else:
        answer_ok = eid in routed_to
    broken = [r.edit_id for r, gn in zip(checked, g_neigh) if not _still_right(r, gn)]
    changed = [i for i, (a, b) in enumerate(zip(locality_before or [], g_probes))
               if list(a) != list(b.token_ids)]
    timings["verify_s"] = time.perf_counter() - t
    reasons = []
    if not answer_ok:
        reasons.append(f"the failing prompt still fails (answer {g.text[:80]!r}, routed to {list(routed_to)})"
                       if failure.correct_answer is not None else
                       f"the failing prompt is not routed to expert {eid} (routed to {list(routed_to)})")
    if broken:
        reasons.append(f"neighbour edit(s) {broken} no longer answered right")
    if changed:
        reasons.append(f"locality probes {changed} changed their output")
    extra = {"answer": g.text, "routed_to": list(routed_to), "locality_changed": changed,
             "neighbours_broken": broken}
    if reasons:
        reason = "; ".join(reasons)
        rollback(edit_id, store=store, keystore=keystore, ledger=ledger, invalidate=invalidate,
                 note=f"verification failed: {reason}", **extra)
        status = "rolled_back"
        log.warning("edit %s rolled back: %s", edit_id, reason)
    else:
        reason = ""
        ledger.set_status(edit_id, "verified", note="verified", **extra)
        status = "verified"
    timings["total_s"] = time.perf_counter() - t_start
    after = tuple(tuple(int(x) for x in gp.token_ids) for gp in g_probes)
    return _result(rec, prompts, res, status=status, timings=timings, answer=g.text, answer_ok=answer_ok,
                   routed_to=routed_to, locality_changed=tuple(changed), reason=reason,
                   neighbours=tuple(r.edit_id for r in checked), neighbours_broken=tuple(broken),
                   locality_after=after)


def _question_chat(rec: EditRecord) -> Messages:
    """The failing question of a ledger record, as the user asked it (its instruction prompt)."""
    for d in rec.prompts:
        if d.get("structure") == "instruction":
            return [dict(m) for m in d["messages"] if m["role"] != "system"]
    return as_messages(rec.question)


def _still_right(rec: EditRecord, g: Any) -> bool:
    """Is a neighbour edit still in force: its answer given (or, rule only, still routed to it)?"""
    if rec.correct_answer:
        return answer_matches(g.text, rec.correct_answer)
    return rec.expert_id in [int(i) for i in g.expert_ids]


def _result(rec: EditRecord, prompts: Sequence[TrainingPrompt], res: TrainResult, *, status: str,
            timings: dict[str, float], **kw: Any) -> EditResult:
    return EditResult(edit_id=rec.edit_id, status=status, expert_id=rec.expert_id, created=rec.created,
                      rule=rec.rule, prompts=tuple(prompts), steps=res.steps, lm_losses=res.lm_losses,
                      router_losses=res.router_losses, prev_version=rec.prev_version,
                      new_version=int(rec.new_version), timings=timings, **kw)


def _free_reserved(keystore: Any, reserved: list[int], new_slot: Callable[[], int] | None) -> None:
    if reserved and new_slot is None:        # only slots this module reserved
        try:
            keystore.free(np.array(reserved, np.int64))
        except Exception:
            log.exception("could not free reserved slot(s) %s", reserved)


def _record_failure(ledger: EditLedger, edit_id: str, failure: Failure, rule: str,
                    prompts: Sequence[TrainingPrompt], err: BaseException,
                    res: TrainResult | None = None) -> None:
    try:
        ledger.commit(EditRecord(
            edit_id=edit_id, status="failed", rule=rule, prompts=tuple(p.to_dict() for p in prompts),
            expert_id=res.expert_id if res is not None else -1, created=bool(res and res.created),
            prev_version=res.prev_version if res is not None else None, new_version=None,
            lm_losses=res.lm_losses if res is not None else (),
            router_losses=res.router_losses if res is not None else (),
            steps=res.steps if res is not None else 0,
            question=failure.question, correct_answer=failure.correct_answer,
            notes=(f"{type(err).__name__}: {err}",),
        ))
    except Exception:
        log.exception("could not record the failed edit %s in the ledger", edit_id)


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
    expert can be undone (the store keeps one previous version). Returns the ledger record, now
    "rolled_back"."""
    rec = ledger.get(edit_id)
    if rec.status not in ("committed", "verified"):
        raise ValueError(f"edit {edit_id!r} is {rec.status}: only committed or verified edits can be "
                         "rolled back")
    later = [r.edit_id for r in ledger.list(("committed", "verified"))
             if r.expert_id == rec.expert_id and r.created_at > rec.created_at and r.edit_id != edit_id]
    if later:
        raise ValueError(f"edit {edit_id!r}: expert {rec.expert_id} was edited again by {later}; roll "
                         "those back first (the store keeps one previous version)")
    eid = rec.expert_id
    ids = np.array([eid], np.int64)
    if rec.created:
        keystore.free(ids)                      # unreachable first: a request routed just before reads
        store.delete([eid])                     # a missing expert as "no expert", never a half record
    else:
        if rec.prev_key is None:
            raise ValueError(f"edit {edit_id!r} refined expert {eid} but recorded no previous key")
        cur = _version_or_none(store, eid)
        if cur is not None and rec.new_version is not None and int(cur) != int(rec.new_version):
            raise ValueError(f"edit {edit_id!r}: expert {eid} is at version {cur}, not the edit's "
                             f"{rec.new_version}; it changed since (cannot roll back safely)")
        restored = store.rollback(eid)
        if rec.prev_version is not None and int(restored) != int(rec.prev_version):
            log.warning("rollback of %s restored version %s of expert %d, ledger says %s", edit_id, restored,
                        eid, rec.prev_version)
        keystore.update(ids, rec.prev_key[None, :])
        if not rec.prev_pinned:
            keystore.pin(ids, False)
    if invalidate is not None:
        invalidate([eid])
    log.info("edit %s rolled back (expert %d %s)", edit_id, eid, "freed" if rec.created else "restored")
    return ledger.set_status(edit_id, "rolled_back", note=note or "rolled back", **extra)
