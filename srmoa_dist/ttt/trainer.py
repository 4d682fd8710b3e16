"""The SR-TTT trainer: a few AdamW micro-steps on one expert (A, B) and its routing key.

Shape legend:
    P  training prompts (4, one per structure)      T  tokens of the padded batch
    V  vocabulary                                   d  d_key, the routing-key dimension
    C  candidates retrieved per prompt (k)          r  expert rank

Loss of one step, over the P prompts:

    lm     = mean_p  mean_{t in answer_p}  -log p(token_t | prefix)          # answer tokens only
    s_pj   = D[p, j]          (scores of the other candidates, constants)      # (P, C)
    s_pt   = q_p . key        (the target's score, learnable through key)     # (P,)
    logits = [s_p1 .. s_pC, tau, s_pt] / temperature                          # (P, C + 2), tau = deferral
    router = mean_p CE(logits_p, label = target)
    loss   = lm + router_lambda * router

The deferral column (score tau: "no expert, base model") is there when `TTTConfig.router_defer` is
on: the target must beat the threshold as well as its rivals, or routing would never reach it.

Only the target expert's A, B (a `TrainableExpert` from `fusion.trainable`) and the key are given to
the optimizer; the base model is frozen. With `TTTConfig.check_isolation` every base parameter and
buffer is snapshotted before and compared bit for bit after (and the keys of the retrieved candidates
too), and an `IsolationError` is raised if anything else moved.
"""

from __future__ import annotations

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
from srmoa_dist.ttt.diversify import TrainingPrompt

log = logging.getLogger(__name__)

IGNORE = -100


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
    converged: bool                     # stopped because lm loss < converge_loss
    seconds: float
    queries: np.ndarray                 # (P, d_key) the prompts' routing queries
    target_scores: tuple[float, ...]    # (P,) q_p . key after training

    @property
    def final_lm_loss(self) -> float:
        return self.lm_losses[-1]


# ----------------------------------------------------------------------------------------------------
# Inputs


def lm_batch(tokenizer: Any, prompts: Sequence[TrainingPrompt], system_prompt: str | None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The P conversations (prompt + assistant target) templated exactly as serving templates them
    (`model.chat.encode_chat`, left padded): input_ids, attention_mask, position_ids (P, T), labels (P, T)
    = -100 except on the answer tokens (the target's content and its end-of-turn token)."""
    from srmoa_dist.model.chat import encode_chat

    convs = [[dict(m) for m in p.messages] + [{"role": "assistant", "content": p.target}] for p in prompts]
    cb = encode_chat(tokenizer, convs, system_prompt, device=device)
    labels = cb.input_ids.masked_fill(~cb.answer_mask, IGNORE)               # (P, T)
    empty = [p.structure for p, n in zip(prompts, cb.answer_mask.sum(1).tolist()) if n == 0]
    if empty:
        raise ValueError(f"no answer tokens found for the {empty} prompt(s)")
    return {"input_ids": cb.input_ids, "attention_mask": cb.attention_mask, "position_ids": cb.position_ids,
            "labels": labels}


def answer_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of the mean next-token NLL of each prompt's answer tokens (each prompt counts
    the same, however long its answer).  logits (P, T, V), labels (P, T)."""
    lg = logits[:, :-1].float()                                   # (P, T-1, V) predicts token t+1
    tg = labels[:, 1:]                                            # (P, T-1)
    nll = F.cross_entropy(lg.transpose(1, 2), tg, ignore_index=IGNORE, reduction="none")   # (P, T-1)
    n = (tg != IGNORE).sum(1).clamp_min(1)                        # (P,)
    return (nll.sum(1) / n).mean()


class AnswerLoss:
    """The answer-token LM loss of a fixed batch, computed cheaply step after step.

    Layers 0..Lq carry no adapter, so their output is computed once (no grad) and reused; each step
    runs only layers Lq+1.. (under the active routing), the final norm, and the LM head at the
    positions that predict an answer token (a few of the T; the head is ~20% of a small model's FLOPs).
    `full_forward=True` runs the plain `model(...)` instead (a check of the shortcut)."""

    def __init__(self, base: Any, batch: dict[str, torch.Tensor], *, full_forward: bool = False) -> None:
        self.base = base
        self.batch = batch
        self.full = full_forward
        tg = batch["labels"][:, 1:]                               # (P, T-1) targets of positions 0..T-2
        self.rows, self.cols = torch.nonzero(tg != IGNORE, as_tuple=True)   # (N,), (N,) predicting positions
        self.targets = tg[self.rows, self.cols]                   # (N,)
        P = tg.shape[0]
        counts = torch.bincount(self.rows, minlength=P).clamp_min(1).float()   # (P,)
        self.weights = (1.0 / (counts * P))[self.rows]            # (N,): mean per prompt, then over prompts
        if not full_forward:
            from srmoa_dist.model.generation import prefill_lower

            with torch.no_grad():
                self.lower = prefill_lower(base, batch["input_ids"], batch["attention_mask"],
                                           batch["position_ids"])

    def __call__(self) -> torch.Tensor:
        if self.full:
            b = self.batch
            logits = self.base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     position_ids=b["position_ids"]).logits
            return answer_lm_loss(logits, b["labels"])
        from srmoa_dist.model.fusion import decoder_layers

        lw = self.lower
        h = lw.hidden                                             # (P, T, D) output of layer Lq, no grad
        for layer in decoder_layers(self.base.model)[self.base.query_layer + 1:]:
            h = layer(h, attention_mask=lw.causal_mask, position_ids=lw.position_ids, past_key_values=None,
                      use_cache=False, position_embeddings=lw.position_embeddings)
        inner = self.base.model.model
        hs = inner.norm(h[self.rows, self.cols])                  # (N, D) only where an answer token is next
        logits = self.base.model.lm_head(hs).float()              # (N, V)
        nll = F.cross_entropy(logits, self.targets, reduction="none")   # (N,)
        return (nll * self.weights).sum()


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
) -> TrainResult:
    """Train one expert and its key on the 4 prompts (see the module docstring). Commits nothing.

    base: a BaseModel (.model, .tokenizer, .device); fusion: the ExpertFusion installed on base.model;
    queries: (P, d_key) the prompts' routing queries (from the query encoder); keystore: search/get;
    store: get_many (read to refine an existing expert); new_slot: called once when a new expert is made;
    target: skip the choice and train this one; tau: the deferral score (default ks_cfg.tau);
    check_keys: compare the rival candidates' keys before/after (off where gravity moves keys meanwhile);
    full_forward: run the whole model each step instead of layers Lq+1.. only (see AnswerLoss).
    """
    t0 = time.perf_counter()
    model = base.model
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    P = len(prompts)
    if queries.ndim != 2 or queries.shape != (P, ks_cfg.d_key):
        raise ValueError(f"queries must be (P={P}, d_key={ks_cfg.d_key}), got {queries.shape}")
    if P == 0:
        raise ValueError("no training prompts")
    tau = ks_cfg.tau if tau is None else float(tau)
    k = ks_cfg.k

    if target is None:
        target = choose_target(queries, keystore, cfg, new_slot, may_refine, k=k)
    prev_key: np.ndarray | None = None
    prev_version: int | None = None
    if target.created:
        source = new_expert(fusion.target_shapes(), expert_cfg, seed=seed)
        key0 = _unit(queries.mean(0))                                     # (d,) unit-norm mean query
    else:
        [source] = store.get_many([target.expert_id])
        prev_version = int(source.version)
        prev_key = np.asarray(keystore.get(np.array([target.expert_id], dtype=np.int64)),
                              dtype=np.float32).reshape(-1).copy()
        key0 = prev_key.copy()

    # Rival candidates of each prompt (the target excluded): constant scores D (P, C).
    D, I = keystore.search(queries, k, tau=-1.0)                          # (P, k), (P, k)
    D = np.asarray(D, dtype=np.float32)
    I = np.asarray(I, dtype=np.int64)
    rival = (I >= 0) & (I != target.expert_id)                            # (P, k)
    cand_ids = np.unique(I[rival])
    keys_before = (np.asarray(keystore.get(cand_ids), dtype=np.float32).copy()
                   if check_keys and cand_ids.size else None)

    device = base.device
    te = fusion.trainable(source)                                         # A, B: float32 Parameters
    key = nn.Parameter(torch.tensor(key0, device=device))                 # (d,)
    q = torch.tensor(queries, device=device)                              # (P, d)
    rival_scores = torch.tensor(np.where(rival, D, -np.inf), device=device)      # (P, k); -inf = no rival
    cols = [rival_scores]
    if cfg.router_defer:
        cols.append(torch.full((P, 1), tau, device=device))
    fixed_logits = torch.cat(cols, 1) / ks_cfg.temperature               # (P, k [+1])
    label = torch.full((P,), fixed_logits.shape[1], dtype=torch.long, device=device)   # target = last column

    lora_params = list(te.parameters())
    opt = torch.optim.AdamW([
        {"params": lora_params, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": [key], "lr": cfg.key_lr if cfg.key_lr is not None else cfg.lr, "weight_decay": 0.0},
    ])
    batch = lm_batch(base.tokenizer, prompts, base.system_prompt, device)
    snap = _snapshot(model) if cfg.check_isolation else None
    was_training = model.training
    model.eval()                                                          # no dropout: deterministic steps
    lm_loss = AnswerLoss(base, batch, full_forward=full_forward)

    lm_losses: list[float] = []
    router_losses: list[float] = []
    steps = 0
    converged = False
    try:
        for step in range(cfg.steps + 1):
            final = step == cfg.steps                                         # only measures the final loss
            with torch.set_grad_enabled(not final):
                with fusion.routing([[te]] * P):                              # rebuilt each step: A, B move
                    lm = lm_loss()
                s_t = q @ key                                                  # (P,) einsum "pd,d->p"
                logits = torch.cat([fixed_logits, (s_t / ks_cfg.temperature)[:, None]], 1)   # (P, C+1)
                router = F.cross_entropy(logits, label)
            lm_losses.append(float(lm.detach()))
            router_losses.append(float(router.detach()))
            if lm_losses[-1] < cfg.converge_loss:
                converged = True
                break
            if final:
                break
            with torch.enable_grad():
                loss = lm + cfg.router_lambda * router
                opt.zero_grad(set_to_none=True)
                loss.backward()
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
                nn.utils.clip_grad_norm_(lora_params, cfg.grad_clip)
                nn.utils.clip_grad_norm_([key], cfg.grad_clip)
                opt.step()
                with torch.no_grad():                                          # keys live in the unit ball
                    n = key.norm()
                    if n > 1.0:
                        key.div_(n)
                steps += 1
                log.debug("ttt step %d: lm %.4f router %.4f", step, lm_losses[-1], router_losses[-1])
    finally:
        model.train(was_training)

    if snap is not None:
        bad = _changed(model, snap)
        if bad:
            raise IsolationError(f"training changed {len(bad)} tensor(s) outside the target expert: "
                                 f"{bad[:5]}")
        stray = [n for n, p in model.named_parameters() if p.grad is not None]
        if stray:
            raise IsolationError(f"base parameters received gradients: {stray[:5]}")
    if keys_before is not None:
        after = np.asarray(keystore.get(cand_ids), dtype=np.float32)
        if not np.array_equal(after, keys_before):
            raise IsolationError("the keys of other experts changed while the edit trained")

    key_np = key.detach().float().cpu().numpy().astype(np.float32)
    expert = te.to_expert(expert_cfg.dtype if target.created else source.dtype)
    scores = tuple(float(x) for x in queries @ key_np)
    secs = time.perf_counter() - t0
    log.info("ttt: expert %d (%s) %d steps in %.1f s, lm %.3f -> %.3f, router %.3f -> %.3f",
             target.expert_id, "new" if target.created else "refined", steps, secs,
             lm_losses[0], lm_losses[-1], router_losses[0], router_losses[-1])
    return TrainResult(
        expert_id=target.expert_id, created=target.created, expert=expert, key=key_np, prev_key=prev_key,
        prev_version=prev_version, lm_losses=tuple(lm_losses), router_losses=tuple(router_losses),
        steps=steps,
        converged=converged, seconds=secs, queries=queries, target_scores=scores,
    )
