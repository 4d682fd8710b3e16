"""Confirm a known greedy output in one forward, instead of decoding it token by token.

Greedy decoding of a prompt p yields c = (c_1..c_n) and then stops (an end token) exactly when, for
every i, argmax of the next-token logits after p c_<i is c_i, and (when it stops) the argmax after p c is
an end token. One teacher-forced forward over p c computes all those logits at once, under the same
routing: the routing query is pooled from the prompt's states, which no later token changes. So a
re-ask whose answer is expected (an edit's trained target, a probe's output before the edit) costs one
prefill, not n decoding steps; a row whose expectation fails says only that: the caller decodes it.

    rows:     p_b (prompt, templated as generation templates it) + c_b (expected tokens), left padded
    at:       the positions predicting c_b,1..c_b,n and the token after c_b,n (B rows, N positions in all)
    logits:   (N, V) under the routed experts -> argmax (N,)

A full forward and cached decoding differ only in rounding, so an argmax on a near-tie may differ: a
confirmed row is what decoding gives unless two tokens tie within rounding; a refuted row is decoded,
so it is never wrongly refuted.

Shapes: B rows, T longest prompt + expectation, D model dim, V vocab, N predicting positions in all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from srmoa_dist.model.chat import Message, encode_one, pad, with_system
from srmoa_dist.model.fusion import ExpertFusion
from srmoa_dist.model.generation import (
    Encoder,
    Generation,
    RouteStep,
    eos_ids,
    prefill_upper,
    route_batch,
)
from srmoa_dist.model.loading import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expected:
    """A greedy output to confirm: its tokens (no end token) and whether decoding stops right after them
    (an end token next) rather than at the token limit."""

    token_ids: tuple[int, ...]
    stops: bool

    def __post_init__(self) -> None:
        if not self.token_ids and not self.stops:
            raise ValueError("an Expected output with no tokens must stop")


def expected_answer(base: BaseModel, messages: Sequence[Message], target: str, max_new_tokens: int,
                    system_prompt: str | None = None) -> Expected:
    """The greedy output of `max_new_tokens` tokens at most that answers `messages` with exactly
    `target` (tokenized as the chat template tokenizes an assistant turn, as training saw it)."""
    sp = base.system_prompt if system_prompt is None else system_prompt
    conv = with_system([*messages, {"role": "assistant", "content": target}], sp)
    ids, _, answer = encode_one(base.tokenizer, conv)
    content = [t for t, a in zip(ids, answer) if a]
    if content and content[-1] in eos_ids(base):
        content = content[:-1]
    if len(content) >= max_new_tokens:               # decoding stops at the limit, not at an end token
        return Expected(tuple(content[:max_new_tokens]), stops=False)
    return Expected(tuple(content), stops=True)


def expected_output(token_ids: Sequence[int], max_new_tokens: int) -> Expected:
    """A greedy output seen before (`Generation.token_ids`): fewer than the limit means it stopped."""
    ids = tuple(int(t) for t in token_ids)
    return Expected(ids[:max_new_tokens], stops=len(ids) < max_new_tokens)


@torch.no_grad()
def confirm_greedy(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    chats: Sequence[Sequence[Message]],
    expected: Sequence[Expected],
    route_step: RouteStep | None,
    system_prompt: str | None = None,
) -> list[Generation | None]:
    """Per chat, the Generation greedy decoding would give when it is `expected[b]` (confirmed in one
    routed forward, see the module docstring), else None (decode that chat to know its output)."""
    if len(chats) != len(expected):
        raise ValueError(f"{len(chats)} chats but {len(expected)} expected outputs")
    if not chats:
        return []
    tok = base.tokenizer
    sp = base.system_prompt if system_prompt is None else system_prompt
    rows, prompt_len = [], []
    for c, e in zip(chats, expected):
        ids, user, _ = encode_one(tok, with_system(c, sp), add_generation_prompt=True)
        n = len(e.token_ids)
        rows.append((ids + list(e.token_ids), user + [False] * n, [False] * (len(ids) + n)))
        prompt_len.append(len(ids))
    batch = pad(tok, rows, base.device)
    T = batch.input_ids.shape[1]
    lower, routing, prepared = route_batch(base, fusion, encoder, batch, route_step)
    # row b predicts its expected tokens (and the one after) from its last prompt token on
    spans = [(T - len(e.token_ids) - 1, T) for e in expected]
    r_idx = torch.cat([torch.full((hi - lo,), b) for b, (lo, hi) in enumerate(spans)])          # (N,)
    c_idx = torch.cat([torch.arange(lo, hi) for lo, hi in spans])                                  # (N,)
    with fusion.activate(prepared) if fusion is not None else nullcontext():
        logits = prefill_upper(base, lower, at=(r_idx.to(base.device), c_idx.to(base.device)))     # (N, V)
    pred = logits.argmax(-1).cpu().numpy()                                                         # (N,)
    eos = eos_ids(base)
    out: list[Generation | None] = []
    pos = 0
    for b, e in enumerate(expected):
        n = len(e.token_ids)
        got = pred[pos:pos + n + 1]
        pos += n + 1
        same = bool(np.array_equal(got[:n], np.asarray(e.token_ids, dtype=got.dtype)))
        if not same or (e.stops and int(got[n]) not in eos):
            out.append(None)
            continue
        out.append(Generation(
            text=tok.decode(list(e.token_ids), skip_special_tokens=True),
            expert_ids=routing.expert_ids[b], scores=routing.scores[b], gates=routing.gates[b],
            query=np.asarray(routing.queries[b], dtype=np.float32), prompt_tokens=prompt_len[b],
            completion_tokens=n + int(e.stops), finish_reason="stop" if e.stops else "length",
            token_ids=list(e.token_ids),
            skipped=routing.skipped[b] if routing.skipped is not None else [],
            degraded=routing.degraded,
        ))
    log.debug("greedy check: %d of %d rows confirmed", sum(g is not None for g in out), len(out))
    return out


__all__ = ["Expected", "confirm_greedy", "expected_answer", "expected_output"]
