"""Routed generation: one prefill gives both the routing query and the states to continue from.

    prefill_lower:  embed -> layers[0..Lq]            -> h_Lq (B, T, D)  (KV cache of layers 0..Lq filled)
    query:          encoder.encode_hidden(h_Lq, user_mask)            -> xq (B, d_key)
    route:          router(xq) -> D, I (B, k); keep I >= 0 and D >= tau; gates g = softmax(D / T_g)
    fetch:          fetch(unique ids) -> {id: LoRAExpert}
    prefill_upper:  under fusion.routing(...): layers[Lq+1..] -> norm -> lm_head   (cache of those layers)
    decode:         HF forward with the KV cache, one token per step, routing fixed per sequence

The decoder layers are run by hand with the model's own rotary embedding, `create_causal_mask` and a
`DynamicCache`, so the two stages equal one `model(...)` call. The router and fetch callables are plain
Python (they may call Ray in the serving layer) and never run inside an `nn.Module.forward`.
A sequence whose router keeps no expert gets exactly the base model's tokens.

Shapes: B sequences, T prompt tokens (left padded), D model dim, V vocab, K experts kept per sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from srmoa_dist.model.chat import ChatBatch, Message, encode_chat
from srmoa_dist.model.fusion import ExpertFusion, ExpertLike, decoder_layers
from srmoa_dist.model.loading import BaseModel

if TYPE_CHECKING:
    from srmoa_dist.experts.expert import LoRAExpert

log = logging.getLogger(__name__)

class Encoder(Protocol):
    """What routed generation needs of a query encoder (`routing.query_encoder.QueryEncoder`); a
    protocol, so that model/ never imports routing/ (which runs the model to calibrate)."""

    d_key: int

    def check_model(self, base: BaseModel) -> None: ...

    def encode_hidden(self, h_Lq: torch.Tensor, user_mask: torch.Tensor) -> np.ndarray: ...


Router = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # xq (B, d_key) -> D, I (B, k); -1 = none
Fetch = Callable[[list[int]], Mapping[int, "LoRAExpert"]]


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int | None = None  # None: ModelConfig.max_new_tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int | None = None  # sampling seed (None: nondeterministic)
    tau: float | None = None  # extra deferral on router scores (None: trust the router's -1)
    gate_temperature: float = 0.1  # gates g = softmax(scores / gate_temperature) over kept experts
    max_experts: int | None = None  # keep at most this many experts per sequence
    stop: tuple[str, ...] = ()  # stop strings (cut from the text)
    system_prompt: str | None = None  # None: ModelConfig.system_prompt (used when a chat has none)

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be positive, got {self.gate_temperature}")
        if self.max_experts is not None and self.max_experts <= 0:
            raise ValueError(f"max_experts must be positive, got {self.max_experts}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class Routing:
    """The routing of a batch: per sequence, the kept experts (best first) and their gates."""

    expert_ids: list[list[int]]
    scores: list[list[float]]
    gates: list[list[float]]
    queries: np.ndarray  # (B, d_key) float32; (B, 0) without an encoder
    skipped: list[list[int]] | None = None  # per sequence, routed experts the store did not hold

    def gate_tensor(self) -> torch.Tensor:
        """(B, K) gates, zero-padded."""
        K = max((len(g) for g in self.gates), default=0)
        out = torch.zeros(len(self.gates), max(K, 1))
        for b, g in enumerate(self.gates):
            out[b, : len(g)] = torch.tensor(g)
        return out


@dataclass(frozen=True)
class Generation:
    text: str
    expert_ids: list[int]
    scores: list[float]
    gates: list[float]
    query: np.ndarray  # (d_key,) float32 (empty without an encoder)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    token_ids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s (batch-wide)
    skipped: list[int] = field(default_factory=list)  # routed experts missing from the store (left out)


@dataclass
class LowerPrefill:
    """State after layers 0..Lq of a prefill; `prefill_upper` continues from it."""

    hidden: torch.Tensor  # (B, T, D) output of layer Lq
    cache: Any  # DynamicCache (layers 0..Lq filled)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    causal_mask: Any
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- two-stage prefill
def prefill_lower(
    base: BaseModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
) -> LowerPrefill:
    """embed -> layers[0..Lq]; position ids default to HF generate's (cumsum of the mask)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    inner = base.model.model
    input_ids = input_ids.to(base.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(base.device)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    position_ids = position_ids.to(base.device)
    if cache is None:
        cache = DynamicCache(config=base.model.config)
    h = inner.embed_tokens(input_ids)  # (B, T, D)
    causal_mask = create_causal_mask(
        config=base.model.config,
        inputs_embeds=h,
        attention_mask=attention_mask,
        past_key_values=cache,
        position_ids=position_ids,
    )
    pos_emb = inner.rotary_emb(h, position_ids=position_ids)
    for layer in decoder_layers(base.model)[: base.query_layer + 1]:
        h = layer(
            h,
            attention_mask=causal_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=pos_emb,
        )
    return LowerPrefill(h, cache, attention_mask, position_ids, causal_mask, pos_emb)


def prefill_upper(base: BaseModel, lower: LowerPrefill, *, last_only: bool = False) -> torch.Tensor:
    """layers[Lq+1..] -> norm -> lm_head; the active `fusion.routing` applies. Logits (B, T or 1, V)."""
    inner = base.model.model
    h = lower.hidden
    for layer in decoder_layers(base.model)[base.query_layer + 1 :]:
        h = layer(
            h,
            attention_mask=lower.causal_mask,
            position_ids=lower.position_ids,
            past_key_values=lower.cache,
            use_cache=True,
            position_embeddings=lower.position_embeddings,
        )
    h = inner.norm(h)
    if last_only:
        h = h[:, -1:]
    return base.model.lm_head(h)


def routed_logits(
    base: BaseModel,
    fusion: ExpertFusion | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    experts: Sequence[Sequence[ExpertLike]] | None = None,
    gates: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) of one forward with sequence b routed to experts[b] (differentiable; for TTT)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ctx = fusion.routing(experts, gates) if (fusion is not None and experts is not None) else nullcontext()
    with ctx:
        lower = prefill_lower(base, input_ids, attention_mask)
        return prefill_upper(base, lower)


def encode_messages(
    base: BaseModel,
    batch_messages: Sequence[Sequence[Message]],
    system_prompt: str | None = None,
    *,
    add_generation_prompt: bool | None = None,
) -> ChatBatch:
    """The chat template applied with the model's system prompt (see `chat.encode_chat`)."""
    sp = base.system_prompt if system_prompt is None else system_prompt
    return encode_chat(
        base.tokenizer, batch_messages, sp, add_generation_prompt=add_generation_prompt, device=base.device
    )


@torch.no_grad()
def queries(
    base: BaseModel,
    encoder: Encoder,
    batch_messages: Sequence[Sequence[Message]],
    system_prompt: str | None = None,
) -> np.ndarray:
    """Routing queries (B, d_key) of conversations: layers 0..Lq only, no generation."""
    encoder.check_model(base)
    batch = encode_messages(base, batch_messages, system_prompt)
    lower = prefill_lower(base, batch.input_ids, batch.attention_mask)
    return encoder.encode_hidden(lower.hidden, batch.user_mask)


# ----------------------------------------------------------------------------- routing
def route(xq: np.ndarray, router: Router | None, params: GenerationParams) -> Routing:
    """Apply the router and the deferral rule: keep id >= 0 (and score >= tau); gates = softmax(s / T)."""
    B = xq.shape[0]
    if router is None:
        return Routing([[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)], xq)
    D, I = router(xq)
    D, I = np.asarray(D, dtype=np.float32), np.asarray(I, dtype=np.int64)
    if D.shape != I.shape or D.ndim != 2 or D.shape[0] != B:
        raise ValueError(f"router must return D, I of shape (B={B}, k), got {D.shape}, {I.shape}")
    ids, scores, gates = [], [], []
    for b in range(B):
        keep = I[b] >= 0
        if params.tau is not None:
            keep &= D[b] >= params.tau
        order = np.argsort(-D[b][keep], kind="stable")
        s, i = D[b][keep][order], I[b][keep][order]
        if params.max_experts is not None:
            s, i = s[: params.max_experts], i[: params.max_experts]
        if len(s):
            z = (s.astype(np.float64) - s.max()) / params.gate_temperature
            g = np.exp(z) / np.exp(z).sum()
        else:
            g = np.zeros(0)
        ids.append([int(x) for x in i])
        scores.append([float(x) for x in s])
        gates.append([float(x) for x in g])
    return Routing(ids, scores, gates, xq)


def _fetch_experts(routing: Routing, fetch: Fetch | None) -> tuple[Routing, list[list[LoRAExpert]]]:
    """The routed experts of each sequence, and the routing they are used under.

    An expert the store no longer holds (deleted by a rollback after the search that found it) is
    left out of its sequence, the remaining gates are renormalised to sum to 1, and its id goes to
    `routing.skipped`; a sequence left with no expert gets exactly the base model's output.
    """
    wanted = sorted({i for ids in routing.expert_ids for i in ids})
    if not wanted:
        return routing, [[] for _ in routing.expert_ids]
    if fetch is None:
        raise ValueError("the router returned experts but no fetch callable was given")
    got = fetch(wanted)
    missing = {i for i in wanted if i not in got}
    if missing:
        log.warning("routed expert(s) %s are not in the store; their sequences go on without them",
                    sorted(missing)[:8])
        routing = _without(routing, missing)
    return routing, [[got[i] for i in ids] for ids in routing.expert_ids]


def _without(routing: Routing, missing: set[int]) -> Routing:
    """The routing with the `missing` experts removed from every sequence, gates renormalised."""
    ids, scores, gates, skipped = [], [], [], []
    for i_b, s_b, g_b in zip(routing.expert_ids, routing.scores, routing.gates):
        keep = [j for j, i in enumerate(i_b) if i not in missing]
        g = np.asarray([g_b[j] for j in keep], dtype=np.float64)
        ids.append([i_b[j] for j in keep])
        scores.append([s_b[j] for j in keep])
        gates.append([float(x) for x in g / g.sum()] if g.size and g.sum() > 0 else [0.0] * g.size)
        skipped.append([i for i in i_b if i in missing])
    return Routing(ids, scores, gates, routing.queries, skipped)


# ----------------------------------------------------------------------------- decoding
def _eos_ids(base: BaseModel) -> set[int]:
    ids: set[int] = set()
    for src in (base.tokenizer.eos_token_id, getattr(base.model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def _select(logits: torch.Tensor, params: GenerationParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (B, V)
    if params.top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > params.top_p  # keep the smallest head >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class _Step:
    """One decoding step's news: the token of each sequence (-1 when it had already finished)."""

    tokens: list[int]


def _run(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    batch_messages: Sequence[Sequence[Message]],
    router: Router | None,
    fetch: Fetch | None,
    params: GenerationParams,
) -> Iterator[_Step | list[Generation]]:
    """The generation loop; yields a `_Step` per decoded token, then the list of Generations.

    No context (grad mode, routing) is held across a `yield`: each forward enters its own.
    """
    tok = base.tokenizer
    max_new = params.max_new_tokens or base.config.max_new_tokens
    if router is not None and encoder is None:
        raise ValueError("a router needs a query encoder")
    if encoder is not None:
        encoder.check_model(base)
    t0 = time.perf_counter()
    with torch.no_grad():
        batch = encode_messages(base, batch_messages, params.system_prompt)
        B = batch.input_ids.shape[0]
        lower = prefill_lower(base, batch.input_ids, batch.attention_mask)
        if encoder is not None:
            xq = encoder.encode_hidden(lower.hidden, batch.user_mask)  # (B, d_key)
        else:
            xq = np.zeros((B, 0), dtype=np.float32)
    routing = route(xq, router, params)
    routing, experts = _fetch_experts(routing, fetch)  # plain Python (may call Ray)
    if fusion is None and any(experts):
        raise ValueError("experts were routed but no ExpertFusion was given")
    prepared = fusion.prepare(experts, routing.gate_tensor()) if fusion is not None else None

    def routed():
        return fusion.activate(prepared) if fusion is not None else nullcontext()

    gen = None
    if params.temperature > 0 and params.seed is not None:
        gen = torch.Generator(device=base.device).manual_seed(params.seed)
    eos = _eos_ids(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    out: list[list[int]] = [[] for _ in range(B)]
    n_gen = [0] * B
    finished = [False] * B
    reasons = ["length"] * B
    mask = lower.attention_mask
    pos = lower.position_ids[:, -1:]  # (B, 1)
    with torch.no_grad(), routed():
        logits = prefill_upper(base, lower, last_only=True)[:, -1]  # (B, V)
    t_prefill = time.perf_counter() - t0
    for step in range(max_new):
        nxt = _select(logits, params, gen)  # (B,)
        news = []
        for b in range(B):
            if finished[b]:
                news.append(-1)
                nxt[b] = pad
                continue
            t = int(nxt[b])
            news.append(t)
            n_gen[b] += 1
            if t in eos:
                finished[b], reasons[b] = True, "stop"
                continue
            out[b].append(t)
            if params.stop and _hit_stop(tok, out[b], params.stop):
                finished[b], reasons[b] = True, "stop"
        yield _Step(news)
        if all(finished) or step == max_new - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        with torch.no_grad(), routed():
            res = base.model(
                input_ids=nxt[:, None].to(base.device),
                attention_mask=mask,
                position_ids=pos,
                past_key_values=lower.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits = res.logits[:, -1]
    t_total = time.perf_counter() - t0
    timings = {"prefill_s": t_prefill, "decode_s": t_total - t_prefill}
    gens = []
    for b in range(B):
        text = tok.decode(out[b], skip_special_tokens=True)
        if params.stop:
            text = _cut_stop(text, params.stop)
        gens.append(
            Generation(
                text=text,
                expert_ids=routing.expert_ids[b],
                scores=routing.scores[b],
                gates=routing.gates[b],
                query=np.asarray(routing.queries[b], dtype=np.float32),
                prompt_tokens=batch.lengths[b],
                completion_tokens=n_gen[b],
                finish_reason=reasons[b],
                token_ids=out[b],
                timings=timings,
                skipped=routing.skipped[b] if routing.skipped is not None else [],
            )
        )
    yield gens


def _hit_stop(tok: Any, ids: list[int], stop: tuple[str, ...]) -> bool:
    tail = tok.decode(ids[-32:], skip_special_tokens=True)
    return any(s in tail for s in stop)


def _cut_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def generate(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    batch_messages: Sequence[Sequence[Message]],
    router: Router | None = None,
    fetch: Fetch | None = None,
    params: GenerationParams | None = None,
) -> list[Generation]:
    """Routed generation for a batch of chats (lists of {"role", "content"} messages).

    encoder/router None: the plain base model (no query, no experts).
    """
    result: list[Generation] = []
    for item in _run(base, fusion, encoder, batch_messages, router, fetch, params or GenerationParams()):
        if isinstance(item, list):
            result = item
    return result


def generate_stream(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    messages: Sequence[Message],
    router: Router | None = None,
    fetch: Fetch | None = None,
    params: GenerationParams | None = None,
) -> Iterator[str | Generation]:
    """One chat, streamed: yields text deltas (str), then the final `Generation`.

    Deltas are held back while the decoded text ends in an incomplete UTF-8 character; the
    concatenated deltas equal the final text (stop strings are cut before they are emitted).
    """
    params = params or GenerationParams()
    tok = base.tokenizer
    eos = _eos_ids(base)
    ids: list[int] = []
    emitted = ""
    hold = max((len(s) for s in params.stop), default=1) - 1
    for item in _run(base, fusion, encoder, [messages], router, fetch, params):
        if isinstance(item, list):
            final = item[0]
            if len(final.text) > len(emitted) and final.text.startswith(emitted):
                yield final.text[len(emitted) :]
            yield final
            return
        t = item.tokens[0]
        if t < 0 or t in eos:
            continue
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if params.stop:
            text = _cut_stop(text, params.stop)
            safe = len(text) - hold if hold > 0 else len(text)
        else:
            safe = len(text)
        if safe > len(emitted) and text.startswith(emitted):
            yield text[len(emitted) : safe]
            emitted = text[:safe]
