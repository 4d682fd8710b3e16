"""The SR-TTT trainer: a few AdamW micro-steps on one expert (A, B) and its routing key.

Shape legend:
    P  training prompts of the edit (4, one per structure)    G  guard prompts (neighbour edits')
    R  rows = P + G                                           T  tokens of the padded batch
    V  vocabulary        d  d_key, the routing-key dimension   C  candidates retrieved per row (k)
    K  experts mixed in one row (co-routed rivals + the target)

**Trained under the mixture it will be served with.** A question about an entity that already has an
edited fact retrieves that fact's expert too, with a nearly equal score; an expert trained alone at
gate 1 then meets a softmax blend at serving time and answers neither fact. So every row runs with the
experts serving would mix for it: the rivals that score >= tau (frozen) plus the target, with gates

    g_r = softmax([s_r1 .. s_rK', q_r . key] / temperature)                  # (R, K), key learnable

Rows of two kinds share one batch:
- the edit's own P prompts (answer = the edit's target);
- G *guard* prompts of neighbour edits (experts co-routed with this edit, from the ledger), each with
  its own answer: the new expert must leave them answered, and its key must not take their queries.

Loss of one step:

    lm     = mean_p nll_p  +  guard_weight * mean_g nll_g          # answer tokens only, under the mixture
    logits = [s_r1 .. s_rC, tau, q_r . key] / temperature           # (R, C + 2), tau = deferral column
    router = CE over the edit rows (label = target) + CE over the guard rows (label = their own expert)
             + contrast_weight * CE over contrast queries (label = deferral; see `ttt.contrast`)
    loss   = lm + router_lambda * router

The deferral column (score tau: "no expert, base model") is there when `TTTConfig.router_defer` is
on: the target must beat the threshold as well as its rivals, or routing would never reach it.

With the relation gate (`relation`), a row's rivals about the edit's own subject leave it (the gate
serves one expert of a subject per query); when the gate also defers (`named_only`), so does every rival
whose relation is about a subject the row's text does not name, and a neighbour's question that does not
name the edit's subject is no guard row: serving never mixes the new expert into it.

**Compute dtype.** With `ttt.train_dtype` bfloat16 (the default where the device has bf16 kernels) the
model's forward in each step, and so its backward, runs under `torch.autocast`; the expert's A, B, the
key, its scores and gates, and AdamW stay float32. Serving and verification stay in the model's dtype, so
the verification after commit checks what training learned in bf16. On the 2-core AVX512-BF16 machine a
SmolLM2 step (4-8 rows) took 30% less time in bf16, with the same losses to two decimals.

Only the target expert's A, B (a `TrainableExpert` from `fusion.trainable`) and the key are given to
the optimizer; the base model and the rivals are frozen. With `TTTConfig.check_isolation` every base
parameter and buffer is snapshotted before and compared bit for bit after; the candidates' keys are held
still in the key store while the edit trains (`hold`: gravity keeps moving every other key) and compared
after; an `IsolationError` is raised if anything else moved.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srmoa_dist.config import ExpertConfig, KeyStoreConfig, TTTConfig
from srmoa_dist.model.training_copy import training_copy
from srmoa_dist.routing.relation_gate import names, same_subject
from srmoa_dist.ttt.answer_loss import (
    AnswerLoss,
    first_stepped_layer,
    lm_batch,
    train_autocast,
    train_dtype,
)
from srmoa_dist.ttt.diversify import TrainingPrompt

log = logging.getLogger(__name__)

HOLD_TTL_S = 600.0        # longest hold on the candidates' keys (a trainer that dies lets go)


class IsolationError(RuntimeError):
    """A tensor other than the target expert's moved during training."""


class KeySearch(Protocol):
    """The part of a KeyStore the trainer reads (never writes)."""

    def search(self, xq: np.ndarray, k: int | None = None, *, tau: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]: ...

    def get(self, ids: Any) -> np.ndarray: ...


class ExpertGetter(Protocol):
    def get_many(self, ids: Sequence[int]) -> list[Any]: ...


@dataclass(frozen=True)
class Target:
    """Which expert an edit trains: an existing one (refined) or a new slot."""

    expert_id: int
    created: bool
    score: float              # the mean query's score against the refined expert's key (nan when created)


@dataclass(frozen=True)
class Guard:
    """A row this edit must leave answered: a neighbour edit's training prompt (from the ledger), or a
    contrast prompt whose target is the base model's answer (expert_id -1: no router label)."""

    expert_id: int                      # the neighbour's expert, the router label of this row; -1: none
    prompt: TrainingPrompt
    query: np.ndarray                   # (d_key,) its routing query


@dataclass(frozen=True)
class TrainResult:
    """What one SR-TTT training job produced. Nothing is committed yet."""

    expert_id: int
    created: bool                       # a new expert in a fresh slot, or a refined existing one
    expert: Any                         # the trained LoRAExpert (storage dtype; version of the source)
    key: np.ndarray                     # (d_key,) float32, norm <= 1
    prev_key: np.ndarray | None         # (d_key,) the refined expert's key before (None when created)
    prev_version: int | None            # the refined expert's version before (None when created)
    lm_losses: tuple[float, ...]        # one per step taken (before that step's update)
    router_losses: tuple[float, ...]
    steps: int                          # optimizer updates done
    converged: bool                     # stopped early (see TrainingJob.record)
    seconds: float
    queries: np.ndarray                 # (P, d_key) the prompts' routing queries
    target_scores: tuple[float, ...]    # (P,) q_p . key after training
    guard_losses: tuple[float, ...] = ()   # mean answer NLL of the guard rows, one per step
    guard_ids: tuple[int, ...] = ()     # the neighbour experts whose prompts guarded this edit

    @property
    def final_lm_loss(self) -> float:
        return self.lm_losses[-1]


# ----------------------------------------------------------------------------------------------------
# Target choice


def _unit(x: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return (x / n).astype(np.float32) if n > 0 else x.astype(np.float32)


def choose_target(
    queries: np.ndarray,
    keystore: KeySearch,
    cfg: TTTConfig,
    new_slot: Callable[[], int],
    may_refine: Callable[[int], bool] | None = None,
    k: int = 8,
) -> Target:
    """The nearest existing expert whose key scores >= cfg.refine_radius against the prompts' mean query
    and that `may_refine` allows (default: any); else a new slot from `new_slot()`."""
    m = _unit(queries.mean(0))[None]                              # (1, d)
    D, I = keystore.search(m, k, tau=-1.0)                        # (1, k): every neighbour, no deferral
    for s, i in zip(D[0].tolist(), I[0].tolist()):
        if i < 0 or s < cfg.refine_radius:
            continue
        if may_refine is None or may_refine(int(i)):
            return Target(int(i), False, float(s))
        log.info("expert %d is within the refine radius (%.3f) but may not be refined", i, s)
    eid = int(new_slot())
    if eid < 0:
        raise ValueError(f"new_slot() returned an invalid expert id {eid}")
    return Target(eid, True, float("nan"))


def new_expert(shapes: Mapping[str, tuple[int, int]], cfg: ExpertConfig, seed: int = 0) -> Any:
    """A fresh expert with the usual LoRA init: A ~ N(0, 1/d_in), B = 0 (so it starts as a no-op)."""
    from srmoa_dist.experts.expert import LoRAExpert

    return LoRAExpert.random(shapes, cfg.rank, cfg.alpha, cfg.dtype, seed, b_std=0.0)


# ----------------------------------------------------------------------------------------------------
# Training


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def _changed(model: nn.Module, snap: dict[str, torch.Tensor]) -> list[str]:
    now = {f"param:{n}": p for n, p in model.named_parameters()}
    now.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    bad = [n for n, t in snap.items() if n not in now or not torch.equal(now[n].detach(), t)]
    bad += [n for n in now if n not in snap]
    return bad


def train_edit(
    base: Any,
    fusion: Any,
    prompts: Sequence[TrainingPrompt],
    queries: np.ndarray,
    keystore: KeySearch,
    store: ExpertGetter,
    cfg: TTTConfig,
    ks_cfg: KeyStoreConfig,
    expert_cfg: ExpertConfig,
    *,
    new_slot: Callable[[], int],
    may_refine: Callable[[int], bool] | None = None,
    target: Target | None = None,
    tau: float | None = None,
    seed: int = 0,
    check_keys: bool = True,
    full_forward: bool = False,
    guards: Sequence[Guard] = (),
    contrast: np.ndarray | None = None,
) -> TrainResult:
    """Train one expert and its key on the P prompts (see the module docstring). Commits nothing.

    base: a BaseModel (.model, .tokenizer, .device); fusion: the ExpertFusion installed on base.model;
    queries: (P, d_key) the prompts' routing queries (from the query encoder); keystore: search/get
    (and hold/release when it has them); store: get_many (the rivals, and the expert to refine);
    new_slot: called once when a new expert is made; target: skip the choice and train this one;
    tau: the deferral score (default ks_cfg.tau); check_keys: compare the candidates' keys before/after;
    full_forward: run the whole model each step instead of layers Lq+1.. only (see AnswerLoss);
    guards: neighbour edits' prompts to keep answered (see the module docstring);
    contrast: (C, d_key) queries of contrast prompts, on which the key must defer.
    """
    job = TrainingJob(base, fusion, prompts, queries, keystore, store, cfg, ks_cfg, expert_cfg,
                      new_slot=new_slot, may_refine=may_refine, target=target, tau=tau, seed=seed,
                      guards=guards, contrast=contrast)
    [res] = train_jobs(base, fusion, [job], cfg, check_keys=check_keys, full_forward=full_forward)
    if isinstance(res, BaseException):
        raise res
    return res


def train_jobs(base: Any, fusion: Any, jobs: Sequence[TrainingJob], cfg: TTTConfig, *,
               check_keys: bool = True, full_forward: bool = False) -> list[TrainResult | BaseException]:
    """Train several edits together: one batched forward per step holds every job's rows, each row
    routed to its own job's target (their parameters are disjoint, so each job's gradient is what it
    would be alone); a job stops stepping once it converges, and its rows leave the batch. Results in
    job order; a job whose isolation check fails gets its IsolationError instead of a result (the
    others are unaffected)."""
    t0 = time.perf_counter()
    held = [j.hold_candidates(check_keys) for j in jobs]
    try:
        for j in jobs:
            j.build()
        _JointSteps(base, fusion, jobs, cfg, full_forward).run()
        out: list[TrainResult | BaseException] = []
        for j in jobs:
            try:
                j.check_isolation()
                out.append(j.result(time.perf_counter() - t0))
            except IsolationError as e:
                out.append(e)
        return out
    finally:
        for j, h in zip(jobs, held):
            j.release(h)


class TrainingJob:
    """One edit's training state: its target, rows (own prompts + guards), candidates, parameters."""

    def __init__(self, base: Any, fusion: Any, prompts: Sequence[TrainingPrompt], queries: np.ndarray,
                 keystore: KeySearch, store: ExpertGetter, cfg: TTTConfig, ks_cfg: KeyStoreConfig,
                 expert_cfg: ExpertConfig, *, new_slot: Callable[[], int],
                 may_refine: Callable[[int], bool] | None = None, target: Target | None = None,
                 tau: float | None = None, seed: int = 0, guards: Sequence[Guard] = (),
                 contrast: np.ndarray | None = None, relation: Any = None, named_only: bool = False) -> None:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        P = len(prompts)
        if queries.ndim != 2 or queries.shape != (P, ks_cfg.d_key):
            raise ValueError(f"queries must be (P={P}, d_key={ks_cfg.d_key}), got {queries.shape}")
        if P == 0:
            raise ValueError("no training prompts")
        self.base, self.fusion, self.keystore, self.store = base, fusion, keystore, store
        self.cfg, self.ks_cfg, self.expert_cfg = cfg, ks_cfg, expert_cfg
        self.tau = ks_cfg.tau if tau is None else float(tau)
        if target is None:
            target = choose_target(queries, keystore, cfg, new_slot, may_refine, k=ks_cfg.k)
        self.target = target
        guards = [g for g in guards if g.expert_id != target.expert_id]
        self.relation = relation                     # an `ExpertRelation` the expert will carry, or None
        # the relation gate defers: an expert with a relation serves only texts that name its subject
        self.named_only = named_only
        if relation is not None:
            guards = self._apart_by_relation(guards)
        self.prompts = list(prompts) + [g.prompt for g in guards]                 # R rows
        # the question as the user asked it (verification re-asks it and decodes greedily), or every
        # prompt of the edit
        self.reask_rows = [r for r, p in enumerate(prompts)
                           if cfg.reask_rows == "own" or p.structure == "instruction"]
        self.P, self.G = P, len(guards)
        self.guards = list(guards)
        self.queries = queries                                                    # (P, d)
        self.q_all = np.concatenate([queries] + [g.query[None].astype(np.float32) for g in guards])  # (R, d)
        if target.created:
            self.source = new_expert(fusion.target_shapes(), expert_cfg, seed=seed)
            self.prev_key, self.prev_version = None, None
            self.key0 = _unit(queries.mean(0))                                    # (d,) unit mean query
        else:
            [self.source] = store.get_many([target.expert_id])
            self.prev_version = int(self.source.version)
            self.prev_key = np.asarray(keystore.get(np.array([target.expert_id], np.int64)),
                                       dtype=np.float32).reshape(-1).copy()
            self.key0 = self.prev_key.copy()
            if relation is not None and same_subject(self.source, relation.subject):
                self.relation = self.source.relation.plus(relation.keys)        # one more fact of it
        D, I = keystore.search(self.q_all, ks_cfg.k, tau=-1.0)                   # (R, k) every neighbour
        self.D = np.asarray(D, dtype=np.float32)
        self.I = np.asarray(I, dtype=np.int64)
        self.rival = (self.I >= 0) & (self.I != target.expert_id)               # (R, k)
        self.cand_ids = np.unique(self.I[self.rival])
        no_con = contrast is None or not cfg.router_defer
        self.q_con = (np.zeros((0, ks_cfg.d_key), np.float32) if no_con          # (C, d) contrast queries
                      else np.ascontiguousarray(contrast, dtype=np.float32).reshape(-1, ks_cfg.d_key))
        self.keys_before: np.ndarray | None = None
        self.lm_losses: list[float] = []
        self.guard_losses: list[float] = []
        self.router_losses: list[float] = []
        self.steps = 0
        self.converged = False
        self.done = False

    def _apart_by_relation(self, guards: list[Guard]) -> list[Guard]:
        """The guards whose expert is not about this edit's subject: the relation gate keeps those
        apart at serving (each question reaches its own relation's expert), so they need no guard row.
        When the gate defers (`named_only`), neither do the neighbours' questions that do not name this
        edit's subject: serving never mixes this edit's expert into them."""
        subject = self.relation.subject
        if self.named_only:                      # a text test first: no store read for these
            guards = [g for g in guards if g.expert_id < 0 or names(g.prompt.user_text, subject)]
        experts = _present(self.store, sorted({g.expert_id for g in guards if g.expert_id >= 0}))
        return [g for g in guards if not same_subject(experts.get(g.expert_id), subject)]

    @property
    def n_rows(self) -> int:
        return self.P + self.G

    # -- 1. candidates ---------------------------------------------------------------------------------
    def hold_candidates(self, check_keys: bool) -> bool:
        """Hold the candidates' keys still (gravity goes on for the rest); remember them to compare."""
        if not (check_keys and self.cand_ids.size):
            return False
        hold = getattr(self.keystore, "hold", None)
        if hold is not None:
            hold(self.cand_ids, ttl_s=HOLD_TTL_S)
        self.keys_before = np.asarray(self.keystore.get(self.cand_ids), dtype=np.float32).copy()
        return hold is not None

    def release(self, held: bool) -> None:
        if held:
            try:
                self.keystore.release(self.cand_ids)
            except Exception:                  # the hold expires by itself
                log.warning("could not release the hold on %d candidate keys", self.cand_ids.size)

    # -- 2. parameters, the mixture and the router loss ------------------------------------------------
    def build(self) -> None:
        """Rows' co-routed rivals (score >= tau, frozen experts), router logits and labels, optimizer."""
        cfg, T, dev = self.cfg, self.ks_cfg.temperature, self.base.device
        R = self.n_rows
        served = self.rival & (self.D >= self.tau)                               # (R, k) mixed at serving
        wanted = sorted({int(i) for i in self.I[served]}) if cfg.train_in_mixture else []
        experts = _present(self.store, wanted)
        served &= np.isin(self.I, np.array(list(experts), np.int64))             # missing: skipped, as served
        if self.relation is not None:           # the relation gate takes the subject's others off its rows
            same = [i for i, e in experts.items() if same_subject(e, self.relation.subject)]
            served[: self.P] &= ~np.isin(self.I[: self.P], np.array(same, np.int64))
        if self.named_only:                     # deferring, it takes off every edit whose subject a row
            rel = {i: e.relation for i, e in experts.items() if getattr(e, "relation", None) is not None}
            for r in range(R):                  # does not name
                text = self.prompts[r].user_text
                unnamed = [i for i, x in rel.items() if not names(text, x.subject)]
                served[r] &= ~np.isin(self.I[r], np.array(unnamed, np.int64))
        self.te = self.fusion.trainable(self.source)                             # A, B: float32 Parameters
        self.key = nn.Parameter(torch.tensor(self.key0, device=dev))             # (d,)
        self.q = torch.tensor(self.q_all, device=dev)                            # (R, d)
        self.row_rivals = [[experts[int(i)] for i in self.I[r][served[r]]] for r in range(R)]
        self.rival_gate_logits = [torch.tensor(self.D[r][served[r]] / T, device=dev) for r in range(R)]
        # router CE: rival columns (-inf = none), the deferral column, the target last
        cols = [torch.tensor(np.where(self.rival, self.D, -np.inf), device=dev)]  # (R, k)
        if cfg.router_defer:
            cols.append(torch.full((R, 1), self.tau, device=dev))
        self.fixed_logits = torch.cat(cols, 1) / T                                # (R, k [+1])
        label = torch.full((R,), self.fixed_logits.shape[1], dtype=torch.long, device=dev)   # the target
        ce_w = torch.zeros(R, device=dev)
        ce_w[: self.P] = 1.0 / self.P
        for j, g in enumerate(self.guards):                       # guard rows: their own expert
            own = np.flatnonzero(self.I[self.P + j] == g.expert_id) if g.expert_id >= 0 else []
            if len(own):
                label[self.P + j] = int(own[0])
                ce_w[self.P + j] = cfg.guard_weight / self.G
        self.label, self.ce_w = label, ce_w
        self.con = None
        if len(self.q_con):                                       # contrast queries: defer (column k)
            Dc, Ic = self.keystore.search(self.q_con, self.ks_cfg.k, tau=-1.0)    # (C, k)
            Dc, Ic = np.asarray(Dc, np.float32), np.asarray(Ic, np.int64)
            rc = (Ic >= 0) & (Ic != self.target.expert_id)
            fixed = torch.cat([torch.tensor(np.where(rc, Dc, -np.inf), device=dev),
                               torch.full((len(Dc), 1), self.tau, device=dev)], 1) / T           # (C, k+1)
            self.con = (torch.tensor(self.q_con, device=dev), fixed,
                        torch.full((len(Dc),), fixed.shape[1] - 1, dtype=torch.long, device=dev))
        self.row_weights = torch.cat([torch.full((self.P,), 1.0 / self.P),
                                      torch.full((self.G,), cfg.guard_weight / max(self.G, 1))])   # (R,)
        self.lora_params = list(self.te.parameters())
        self.opt = torch.optim.AdamW([
            {"params": self.lora_params, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": [self.key], "lr": cfg.key_lr if cfg.key_lr is not None else cfg.lr,
             "weight_decay": 0.0},
        ])

    def mixture(self) -> tuple[torch.Tensor, list[list[Any]], list[torch.Tensor]]:
        """The target's scores s_t (R,), and per row [rivals..., target] with their gates (K_r,),
        differentiable in the key."""
        T = self.ks_cfg.temperature
        s_t = self.q @ self.key                                                   # (R,) "rd,d->r"
        rows = [rv + [self.te] for rv in self.row_rivals]
        gates = [torch.softmax(torch.cat([lg, (s_t[r] / T)[None]]), 0)            # (K_r,) rivals, target
                 for r, lg in enumerate(self.rival_gate_logits)]
        return s_t, rows, gates

    def router_loss(self, s_t: torch.Tensor) -> torch.Tensor:
        T = self.ks_cfg.temperature
        logits = torch.cat([self.fixed_logits, (s_t / T)[:, None]], 1)           # (R, k+2)
        loss = (F.cross_entropy(logits, self.label, reduction="none") * self.ce_w).sum()
        if self.con is not None:
            q, fixed, label = self.con
            lc = torch.cat([fixed, (q @ self.key / T)[:, None]], 1)               # (C, k+2) "cd,d->c"
            loss = loss + self.cfg.contrast_weight * F.cross_entropy(lc, label)
        return loss

    def record(self, per_row: torch.Tensor, worst: torch.Tensor, router: torch.Tensor) -> None:
        """Log one step's losses (per_row, worst: (R,) mean and worst token NLL, detached); mark the job
        done when it has converged: its mean LM loss is under `converge_loss`, or (with
        `converge_token_p`) every answer token of its own prompts is at least that likely, so greedy
        decoding already gives every target; either way the guard rows must have held, and (with
        `reask_token_p`) every answer token of the `reask_rows` (every own prompt, or only the question
        as asked) must be that likely: a mean loss under `converge_loss` can hide one unlikely token, on
        which greedy decoding takes another path (a two-piece invented name repeated in a loop) and
        verification rolls the edit back."""
        lm = float(per_row[: self.P].mean())
        self.lm_losses.append(lm)
        if self.G:
            self.guard_losses.append(float(per_row[self.P:].mean()))
        self.router_losses.append(float(router.detach()))
        # guard rows: no worse than before this edit's expert joined them, give or take guard_loss nats
        guards_ok = not self.G or self.guard_losses[-1] <= self.guard_losses[0] + self.cfg.guard_loss
        p = self.cfg.converge_token_p
        likely = p is not None and float(worst[: self.P].max()) <= -np.log(p)
        q = self.cfg.reask_token_p
        sure = q is None or not self.reask_rows or float(worst[self.reask_rows].max()) <= -np.log(q)
        if (lm < self.cfg.converge_loss or likely) and guards_ok and sure:
            self.converged = self.done = True

    def update(self) -> None:
        """Clip and step this job's parameters (gradients already computed)."""
        key, cfg = self.key, self.cfg
        with torch.no_grad():
            # On the unit sphere, a descent step that would lengthen the key is cut back to the
            # sphere anyway: drop that radial part of the gradient, or Adam's per-coordinate
            # scaling turns it into a sideways drift that lowers the target's scores.
            n = key.norm()
            if n >= 1.0 - 1e-6 and key.grad is not None:
                u = key / n
                radial = key.grad @ u
                if radial < 0:
                    key.grad.sub_(radial * u)
        nn.utils.clip_grad_norm_(self.lora_params, cfg.grad_clip)
        nn.utils.clip_grad_norm_([key], cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():                                                    # keys live in the unit ball
            n = key.norm()
            if n > 1.0:
                key.div_(n)
        self.steps += 1

    # -- 4. checks and result --------------------------------------------------------------------------
    def check_isolation(self) -> None:
        if self.keys_before is not None:
            after = np.asarray(self.keystore.get(self.cand_ids), dtype=np.float32)
            if not np.array_equal(after, self.keys_before):
                raise IsolationError("the keys of other experts changed while the edit trained")

    def result(self, seconds: float) -> TrainResult:
        t = self.target
        key_np = self.key.detach().float().cpu().numpy().astype(np.float32)
        expert = self.te.to_expert(self.expert_cfg.dtype if t.created else self.source.dtype)
        if self.relation is not None:
            expert = expert.with_relation(self.relation)
        elif not t.created and getattr(self.source, "relation", None) is not None:
            expert = expert.with_relation(self.source.relation)
        scores = tuple(float(x) for x in self.queries @ key_np)
        log.info("ttt: expert %d (%s) %d steps in %.1f s, lm %.3f -> %.3f, router %.3f -> %.3f, %d guards",
                 t.expert_id, "new" if t.created else "refined", self.steps, seconds, self.lm_losses[0],
                 self.lm_losses[-1], self.router_losses[0], self.router_losses[-1], self.G)
        return TrainResult(
            expert_id=t.expert_id, created=t.created, expert=expert, key=key_np, prev_key=self.prev_key,
            prev_version=self.prev_version, lm_losses=tuple(self.lm_losses),
            router_losses=tuple(self.router_losses), steps=self.steps, converged=self.converged,
            seconds=seconds, queries=self.queries, target_scores=scores,
            guard_losses=tuple(self.guard_losses),
            guard_ids=tuple(sorted({g.expert_id for g in self.guards})),
        )


def _present(store: ExpertGetter, ids: Sequence[int]) -> dict[int, Any]:
    """{id: expert} of the ids the store holds (a key whose expert is missing is skipped, as serving
    skips it)."""
    if not ids:
        return {}
    try:
        return dict(zip(ids, store.get_many(list(ids))))
    except LookupError:                                  # MissingExpertError: sort out which
        out = {}
        for i in ids:
            try:
                [out[i]] = store.get_many([i])
            except LookupError:
                log.warning("rival expert %d has a key but no record; trained without it", i)
        return out


class _JointSteps:
    """The AdamW steps of several jobs in one batch: rows of job 0, then job 1, ... (see train_jobs)."""

    def __init__(self, base: Any, fusion: Any, jobs: Sequence[TrainingJob], cfg: TTTConfig,
                 full_forward: bool) -> None:
        self.base, self.fusion, self.jobs, self.cfg = base, fusion, list(jobs), cfg
        self.full_forward = full_forward
        self.dtype = train_dtype(cfg.train_dtype, base.device)                 # resolved once, not per step

    def batch_of(self, jobs: Sequence[TrainingJob]) -> tuple[AnswerLoss, list[slice]]:
        """The answer loss over these jobs' rows (job 0's, then job 1's, ...; padded to the longest of
        them) and each job's slice of the rows."""
        prompts = [p for j in jobs for p in j.prompts]
        batch = lm_batch(self.base.tokenizer, prompts, self.base.system_prompt, self.base.device)
        weights = torch.cat([j.row_weights for j in jobs])                        # (sum R,)
        first = getattr(self.fusion, "first_layer", None)
        upper = None
        if self.dtype != self.base.model.dtype and not self.full_forward:   # weights cast once, not per call
            upper = training_copy(self.fusion, first_stepped_layer(self.base, first), self.dtype)
        loss = AnswerLoss(self.base, batch, full_forward=self.full_forward, row_weights=weights,
                          first_adapted=first, upper=upper)
        bounds = np.cumsum([0] + [j.n_rows for j in jobs])
        return loss, [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def amp(self) -> contextlib.AbstractContextManager:
        return train_autocast(self.dtype, self.base.device)

    def run(self) -> None:
        """Step every job until it converges or `steps` run out. A converged job's rows leave the batch
        (it is rebuilt for the jobs still stepping), so a batch costs what its edits cost one by one."""
        model = self.base.model
        snap = _snapshot(model) if self.cfg.check_isolation else None
        was_training = model.training
        model.eval()                                                              # deterministic steps
        try:
            live = list(self.jobs)
            lm_loss, slices = self.batch_of(live)
            for step in range(self.cfg.steps + 1):
                final = step == self.cfg.steps                                    # only measures the loss
                with torch.set_grad_enabled(not final):
                    mixes = [j.mixture() for j in live]
                    rows = [r for _, rs, _ in mixes for r in rs]
                    gates = [g for _, _, gs in mixes for g in gs]
                    K = max(g.shape[0] for g in gates)
                    G = torch.stack([F.pad(g, (0, K - g.shape[0])) for g in gates])   # (sum R, K)
                    # rebuilt each step (A, B, keys move); only the model's forward in train_dtype:
                    # the keys' scores and gates stay float32
                    with self.fusion.routing(rows, G), self.amp():
                        lm, per_row, worst = lm_loss.with_rows()                   # (), (sum R,) x2
                    routers = [j.router_loss(s_t) for j, (s_t, _, _) in zip(live, mixes)]
                for j, sl, r in zip(live, slices, routers):
                    j.record(per_row[sl], worst[sl], r)
                stepping = [j for j in live if not j.done]
                if final or not stepping:
                    break
                loss = lm + self.cfg.router_lambda * sum(r for j, r in zip(live, routers) if not j.done)
                for j in live:
                    j.opt.zero_grad(set_to_none=True)
                loss.backward()
                for j in stepping:
                    j.update()
                if len(stepping) < len(live):
                    live = stepping
                    lm_loss, slices = self.batch_of(live)
        finally:
            model.train(was_training)
        if snap is not None:
            bad = _changed(model, snap)
            if bad:
                raise IsolationError(f"training changed {len(bad)} tensor(s) outside the target experts: "
                                     f"{bad[:5]}")
            stray = [n for n, p in model.named_parameters() if p.grad is not None]
            if stray:
                raise IsolationError(f"base parameters received gradients: {stray[:5]}")
