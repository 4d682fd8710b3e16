"""Pooled layer-Lq states of many single-turn prompts, fast: the chat prefix is prefilled once.

Every single-turn chat under one system prompt starts with the same tokens (``<|im_start|>system ...
<|im_start|>user\\n``), and the routing query pools only over the user's tokens, which causal attention
makes independent of whatever follows them. So for N prompts this runs layers 0..Lq once over the shared
prefix, then over each prompt's tokens up to its last user token only (right-padded, positions after
the prefix), attending to the prefix through a batch-expanded KV cache: about a third of the tokens of
`QueryEncoder._pool_prompts` on SmolLM2's template, with the same pooled states (float tolerance).

    pooled_prompts(base, prompts) -> (N, D) float32        mean over each prompt's user tokens

Prompts whose template does not start with the shared prefix (or a tokenizer that merges across it)
fall back to the plain batched path, so the result never depends on the shortcut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from srmoa_dist.model.loading import BaseModel

log = logging.getLogger(__name__)


def _rows(base: BaseModel, prompts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
    from srmoa_dist.model.chat import encode_one, with_system

    out = []
    for p in prompts:
        ids, user, _ = encode_one(base.tokenizer, with_system([{"role": "user", "content": p}],
                                                               base.system_prompt))
        out.append((list(ids), list(user)))
    return out


def _shared_prefix(ids: list[int], user: list[bool]) -> int:
    """Tokens before the first user token: the part every single-turn chat shares."""
    return user.index(True)


@torch.no_grad()
def _prefix_cache(base: BaseModel, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from srmoa_dist.model.generation import prefill_lower

    ids = torch.tensor([prefix], dtype=torch.long)
    lower = prefill_lower(base, ids)
    cache = lower.cache
    return [(cache.layers[i].keys, cache.layers[i].values) for i in range(base.query_layer + 1)]


@torch.no_grad()
def _pool_batch(base: BaseModel, kv: list[tuple[torch.Tensor, torch.Tensor]], p: int,
                rows: list[tuple[list[int], list[bool]]]) -> np.ndarray:
    from transformers import DynamicCache

    from srmoa_dist.model.generation import prefill_lower

    B = len(rows)
    cut = [max(i for i, u in enumerate(user) if u) + 1 for _, user in rows]     # up to the last user token
    T = max(cut) - p
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    ids = torch.full((B, T), int(pad), dtype=torch.long)
    user = torch.zeros(B, T, dtype=torch.bool)
    for b, ((i, u), c) in enumerate(zip(rows, cut, strict=True)):
        ids[b, : c - p] = torch.tensor(i[p:c], dtype=torch.long)
        user[b, : c - p] = torch.tensor(u[p:c], dtype=torch.bool)
    cache = DynamicCache(config=base.model.config)
    for layer, (k, v) in enumerate(kv):
        cache.update(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous(), layer)
    att = torch.ones(B, p + T, dtype=torch.long)
    pos = torch.arange(p, p + T, dtype=torch.long).unsqueeze(0).expand(B, -1)
    h = prefill_lower(base, ids, att, pos, cache).hidden.float()                  # (B, T, D)
    m = user.to(h.device).unsqueeze(-1).float()
    return ((h * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu().numpy()


def pooled_prompts(base: BaseModel, prompts: Sequence[str], *, batch_size: int = 128,
                   progress: bool = False, desc: str = "encoding prompts") -> np.ndarray:
    """(N, D) float32: the mean layer-Lq state over each prompt's user tokens (one user message under
    the model's system prompt), as `QueryEncoder.pool` gives on the full template."""
    from srmoa_dist.routing.query_encoder import _pool_prompts

    prompts = list(prompts)
    if not prompts:
        return np.zeros((0, base.d_model), np.float32)
    ids0, user0 = _rows(base, prompts[:1])[0]
    p = _shared_prefix(ids0, user0)
    if p == 0:
        log.info("no shared chat prefix: plain batched pooling")
        return _pool_prompts(base, prompts, batch_size).astype(np.float32)
    prefix = ids0[:p]
    kv = _prefix_cache(base, prefix)
    out = np.zeros((len(prompts), base.d_model), np.float32)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        rows = _rows(base, chunk)
        if all(ids[:p] == prefix and not any(u[:p]) for ids, u in rows):
            out[s : s + len(chunk)] = _pool_batch(base, kv, p, rows)
        else:                                           # a template that differs: the plain path
            out[s : s + len(chunk)] = _pool_prompts(base, chunk, batch_size)
        bar.update(len(chunk))
    bar.close()
    return out


__all__ = ["pooled_prompts"]
