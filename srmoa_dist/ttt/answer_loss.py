"""The answer-token LM loss an SR-TTT step minimises, and the compute dtype it runs in.

`lm_batch` templates training prompts as serving templates them and labels their answer tokens;
`AnswerLoss` computes the loss of a fixed batch step after step, running only the layers that carry an
adapter (on a `model.training_copy.TrainingCopy` when the compute dtype is not the model's);
`train_dtype` / `train_autocast` pick and apply that dtype.

Shape legend: P rows, T tokens, V vocabulary, D hidden size, N answer positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from srmoa_dist.model.training_copy import TrainingCopy
from srmoa_dist.ttt.diversify import TrainingPrompt

IGNORE = -100




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


def first_stepped_layer(base: Any, first_adapted: int | None = None) -> int:
    """The first layer an `AnswerLoss` runs at each step: above the query layer Lq and from the first
    adapted one on (the layers below carry no adapter, so their output is computed once)."""
    return max(base.query_layer + 1, first_adapted or 0)


class AnswerLoss:
    """The answer-token LM loss of a fixed batch, computed cheaply step after step.

    Layers 0..Lq carry no adapter, so their output is computed once (no grad) and reused; each step
    runs only layers Lq+1.. (under the active routing), the final norm, and the LM head at the
    positions that predict an answer token (a few of the T; the head is ~20% of a small model's FLOPs).
    `first_adapted` (the fusion's first adapted layer, when above Lq+1): layers Lq+1..first_adapted-1
    carry no adapter either, so they join the part computed once. `upper` (a `TrainingCopy` of the
    layers stepped, `model.training_copy`): the steps run it instead of the model's own layers and
    head (for a low-precision compute dtype). `full_forward=True` runs the plain `model(...)` instead
    (a check of the shortcut)."""

    def __init__(self, base: Any, batch: dict[str, torch.Tensor], *, full_forward: bool = False,
                 row_weights: torch.Tensor | None = None, first_adapted: int | None = None,
                 upper: TrainingCopy | None = None) -> None:
        self.base = base
        self.batch = batch
        self.full = full_forward
        self.upper = None if full_forward else upper
        tg = batch["labels"][:, 1:]                               # (P, T-1) targets of positions 0..T-2
        self.rows, self.cols = torch.nonzero(tg != IGNORE, as_tuple=True)   # (N,), (N,) predicting positions
        self.targets = tg[self.rows, self.cols]                   # (N,)
        P = tg.shape[0]
        counts = torch.bincount(self.rows, minlength=P).clamp_min(1).float()   # (P,)
        w = torch.full((P,), 1.0 / P) if row_weights is None else row_weights.float().cpu()   # (P,)
        self.row_weights = w
        self.weights = (w.to(counts.device) / counts)[self.rows]  # (N,): mean per prompt, weighted over rows
        if not full_forward:
            from srmoa_dist.model.fusion import decoder_layers
            from srmoa_dist.model.generation import prefill_lower

            self.start = first_stepped_layer(base, first_adapted)           # first layer run each step
            if upper is not None and upper.start != self.start:
                raise ValueError(f"the training copy starts at layer {upper.start}, "
                                 f"the steps at {self.start}")
            with torch.no_grad():
                self.lower = prefill_lower(base, batch["input_ids"], batch["attention_mask"],
                                           batch["position_ids"])
                lw, h = self.lower, self.lower.hidden
                for layer in decoder_layers(base.model)[base.query_layer + 1:self.start]:
                    h = layer(h, attention_mask=lw.causal_mask, position_ids=lw.position_ids,
                              past_key_values=None, use_cache=False,
                              position_embeddings=lw.position_embeddings)
                self.frozen_hidden = h                                    # (P, T, D) input of layer start
                self.mask = (lw.causal_mask if self.upper is None          # the copy's attention is eager
                             else self.upper.causal_mask(h, lw.attention_mask, lw.position_ids))

    def __call__(self) -> torch.Tensor:
        return (self._token_nll() * self.weights).sum()

    def with_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward: the weighted loss (differentiable), and each row's mean and worst answer-token
        NLL (P,), (P,), detached."""
        nll = self._token_nll()                                   # (N,)
        P = self.row_weights.shape[0]
        d = nll.detach()
        tot = torch.zeros(P, device=d.device, dtype=d.dtype).index_add(0, self.rows, d)
        cnt = torch.bincount(self.rows, minlength=P).clamp_min(1).to(d.dtype)
        worst = torch.zeros(P, device=d.device, dtype=d.dtype).scatter_reduce(0, self.rows, d, "amax")
        return (nll * self.weights).sum(), tot / cnt, worst

    def _token_nll(self) -> torch.Tensor:
        """(N,) next-token NLL at every answer position, under the active routing."""
        if self.full:
            b = self.batch
            logits = self.base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     position_ids=b["position_ids"]).logits          # (P, T, V)
            lg = logits[:, :-1][self.rows, self.cols].float()                         # (N, V)
            return F.cross_entropy(lg, self.targets, reduction="none")
        from srmoa_dist.model.fusion import decoder_layers

        lw = self.lower
        h = self.frozen_hidden                                    # (P, T, D) input of layer start, no grad
        layers = decoder_layers(self.base.model)[self.start:] if self.upper is None else self.upper.layers
        for layer in layers:
            h = layer(h, attention_mask=self.mask, position_ids=lw.position_ids, past_key_values=None,
                      use_cache=False, position_embeddings=lw.position_embeddings)
        h = h[self.rows, self.cols]                               # (N, D) only where an answer token is next
        if self.upper is None:
            logits = self.base.model.lm_head(self.base.model.model.norm(h))   # (N, V)
        else:
            logits = self.upper.head(h)                           # (N, V)
        return F.cross_entropy(logits.float(), self.targets, reduction="none")   # (N,)


def train_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype `ttt.train_dtype` names on `device`; "auto" is bfloat16 where the device has
    bf16 kernels (on a CPU without them autocast would emulate bf16, slower than float32)."""
    if name != "auto":
        return getattr(torch, name)
    device = torch.device(device)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:                   # AVX512-BF16 or AMX; plain AVX512 runs bf16 matmuls slower than float32
        cpu = torch.cpu
        try:
            fast = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        except AttributeError:
            fast = False
    return torch.bfloat16 if fast else torch.float32


def train_autocast(dtype: torch.dtype, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A training forward in `dtype` (from `train_dtype`; its backward follows); float32: as is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
