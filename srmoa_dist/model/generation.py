"""Routed generation: one prefill gives both the routing query and the states to continue from.

    prefill_lower:  embed -> layers[0..Lq]            -> h_Lq (B, T, D)  (KV cache of layers 0..Lq filled)
    query:          encoder.encode_hidden(h_Lq, user_mask)            -> xq (B, d_key)
    route step:     route_step(xq) -> BatchRouting: the kept experts (fetched), scores and gates
                    (built from a router and a fetch by `route_step`, or handed down by the serving engine)
      router:       router(xq) -> D, I (B, k); keep I >= 0 (-1: none or deferred); g = softmax(D / T_g);
                    a router with a `tau` attribute searched under it: candidates scored under `tau`
                    stay only where the encoder's arbitration vouches for them (`BatchRouting.tau`)
      fetch:        fetch(unique ids) -> {id: LoRAExpert}; an id it lacks is skipped
    prefill_upper:  under fusion.routing(...): layers[Lq+1..] -> norm -> lm_head   (cache of those layers)
    decode:         HF forward with the KV cache, one token per step, routing fixed per sequence,
                    sampling (temperature, top_p, seed) and stopping (max tokens, stop strings) per sequence

The decoder layers are run by hand with the model's own rotary embedding, `create_causal_mask` and a
`DynamicCache`, so the two stages equal one `model(...)` call. The route step is plain Python (it may call
Ray in the serving layer) and never runs inside an `nn.Module.forward`. A sequence whose routing keeps no
expert gets exactly the base model's tokens; a seeded sequence samples from its own generator, so it gets
the same tokens whatever batch it is in.

Shapes: B sequences, T prompt tokens (left padded), D model dim, V vocab, K experts kept per sequence.
"""

from __future__ import annotations

import dataclasses
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
RouteStep = Callable[[np.ndarray], "BatchRouting"]  # xq (B, d_key) -> the batch's routing, experts fetched
Chats = Sequence[Sequence[Message]] | ChatBatch  # conversations, or conversations already encoded


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping of one sequence (or of every sequence of a batch).

    A batch may give each sequence its own params; `gate_temperature` and `system_prompt` apply to the
    whole batch and must then agree.
    """

    max_new_tokens: int | None = None  # None: ModelConfig.max_new_tokens
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int | None = None  # sampling seed of this sequence (None: nondeterministic)
    gate_temperature: float = 0.1  # router/fetch: gates g = softmax(scores / gate_temperature)
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
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class BatchRouting:
    """The routing of a batch: per sequence, the kept experts (best first), their gates and, once
    fetched (`fetch_experts`), the experts themselves."""

    expert_ids: list[list[int]]
    scores: list[list[float]]
    gates: list[list[float]]
    queries: np.ndarray  # (B, d_key) float32; (B, 0) without an encoder
    skipped: list[list[int]] | None = None  # per sequence, routed experts the store did not hold
    experts: list[list[ExpertLike]] | None = None  # per sequence, the fetched experts (None: not fetched)
    degraded: str | None = None  # why the batch got no routing (the router did not answer), if so
    tau: list[float] | None = None  # per sequence, the deferral threshold when the search went under it:
    #                                 a candidate scored under it stays only if the encoder's arbitration
    #                                 keeps it (the relation gate's named subjects); None: all passed tau

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
    degraded: str | None = None  # why the batch was routed to no expert (the router did not answer)


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
    *,
    last_layer: int | None = None,
) -> LowerPrefill:
    """embed -> layers[0..Lq] (or 0..last_layer); position ids default to HF generate's (cumsum of the
    mask). Only the default stop leaves a state that `prefill_upper` can continue."""
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
    stop = base.query_layer if last_layer is None else last_layer
    for layer in decoder_layers(base.model)[: stop + 1]:
        h = layer(
            h,
            attention_mask=causal_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=pos_emb,
        )
    return LowerPrefill(h, cache, attention_mask, position_ids, causal_mask, pos_emb)


def prefill_upper(base: BaseModel, lower: LowerPrefill, *, last_only: bool = False,
                  at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """layers[Lq+1..] -> norm -> lm_head; the active `fusion.routing` applies. Logits (B, T or 1, V), or
    (N, V) at the positions `at` = (rows (N,), cols (N,)) only."""
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
    if at is not None:
        h = h[at]  # (N, D)
    elif last_only:
        h = h[:, -1:]
    return base.model.lm_head(inner.norm(h))


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
def select_experts(xq: np.ndarray, D: np.ndarray, I: np.ndarray, gate_temperature: float,
                   tau: float | Sequence[float] | None = None) -> BatchRouting:
    """The deferral rule on a search's answer D, I (B, k): keep id >= 0, best first; g = softmax(s / T).
    `tau` (one, or one per sequence): the threshold the arbitration enforces when the search went under
    it (`BatchRouting.tau`)."""
    B = xq.shape[0]
    D, I = np.asarray(D, dtype=np.float32), np.asarray(I, dtype=np.int64)
    if D.shape != I.shape or D.ndim != 2 or D.shape[0] != B:
        raise ValueError(f"router must return D, I of shape (B={B}, k), got {D.shape}, {I.shape}")
    ids, scores, gates = [], [], []
    for b in range(B):
        keep = I[b] >= 0
        order = np.argsort(-D[b][keep], kind="stable")
        s, i = D[b][keep][order], I[b][keep][order]
        if len(s):
            z = (s.astype(np.float64) - s.max()) / gate_temperature
            g = np.exp(z) / np.exp(z).sum()
        else:
            g = np.zeros(0)
        ids.append([int(x) for x in i])
        scores.append([float(x) for x in s])
        gates.append([float(x) for x in g])
    taus = None if tau is None else [float(t) for t in np.broadcast_to(np.asarray(tau, np.float64), (B,))]
    return BatchRouting(ids, scores, gates, xq, tau=taus)


def no_routing(xq: np.ndarray, degraded: str | None = None) -> BatchRouting:
    """The routing of a batch that gets no expert (the base model alone)."""
    B = xq.shape[0]
    empty: list[list[Any]] = [[] for _ in range(B)]
    return BatchRouting(empty, [[] for _ in range(B)], [[] for _ in range(B)], xq,
                        experts=[[] for _ in range(B)], degraded=degraded)


def route(xq: np.ndarray, router: Router | None, params: GenerationParams) -> BatchRouting:
    """`select_experts` on the router's answer for xq (router None: no expert for any sequence)."""
    if router is None:
        return no_routing(xq)
    D, I = router(xq)
    return select_experts(xq, D, I, params.gate_temperature, getattr(router, "tau", None))


def fetch_experts(routing: BatchRouting, fetch: Fetch | None) -> BatchRouting:
    """The routing with its experts fetched: `with_experts(routing, fetch(routing's ids))`."""
    wanted = routed_ids(routing)
    if wanted and fetch is None:
        raise ValueError("the router returned experts but no fetch callable was given")
    return with_experts(routing, fetch(wanted) if wanted else {})


def routed_ids(routing: BatchRouting) -> list[int]:
    """The distinct expert ids of a batch's routing, sorted (what to fetch)."""
    return sorted({i for ids in routing.expert_ids for i in ids})


def with_experts(routing: BatchRouting, got: Mapping[int, ExpertLike]) -> BatchRouting:
    """The routing with the fetched experts `got` ({id: expert}) in place.

    An expert the store no longer holds (deleted by a rollback after the search that found it) is
    left out of its sequence, the remaining gates are renormalised to sum to 1, and its id goes to
    `routing.skipped`; a sequence left with no expert gets exactly the base model's output.
    """
    missing = {i for i in routed_ids(routing) if i not in got}
    if missing:
        log.warning("routed expert(s) %s are not in the store; their sequences go on without them",
                    sorted(missing)[:8])
        routing = _without(routing, missing)
    return dataclasses.replace(routing, experts=[[got[i] for i in ids] for ids in routing.expert_ids])


def make_route_step(router: Router | None, fetch: Fetch | None, gate_temperature: float) -> RouteStep:
    """The route step of a router and a fetch: xq -> `fetch_experts(route(xq, router))`."""

    def step(xq: np.ndarray) -> BatchRouting:
        return fetch_experts(route(xq, router, GenerationParams(gate_temperature=gate_temperature)), fetch)

    return step


def under_tau(routing: BatchRouting) -> list[set[int]]:
    """Per sequence, the ids scored under its `routing.tau` (none when the search did not go under it)."""
    if routing.tau is None:
        return [set() for _ in routing.expert_ids]
    return [{i for i, s in zip(i_b, s_b) if s < t}
            for i_b, s_b, t in zip(routing.expert_ids, routing.scores, routing.tau)]


def at_or_over_tau(routing: BatchRouting) -> BatchRouting:
    """The routing without the candidates scored under its `tau` (what gravity records: the relation
    gate may yet drop those)."""
    return drop_per_row(routing, under_tau(routing)) if routing.tau is not None else routing


def drop_per_row(routing: BatchRouting, drop: Sequence[set[int]]) -> BatchRouting:
    """The routing with the ids `drop[b]` removed from sequence b (gates renormalised, experts kept in
    step); `skipped` is left as it is (these experts were there, and not wanted)."""
    ids, scores, gates, experts = [], [], [], []
    for b, (i_b, s_b, g_b) in enumerate(zip(routing.expert_ids, routing.scores, routing.gates)):
        keep = [j for j, i in enumerate(i_b) if i not in drop[b]]
        g = np.asarray([g_b[j] for j in keep], dtype=np.float64)
        ids.append([i_b[j] for j in keep])
        scores.append([s_b[j] for j in keep])
        gates.append([float(x) for x in g / g.sum()] if g.size and g.sum() > 0 else [0.0] * g.size)
        if routing.experts is not None:
            experts.append([routing.experts[b][j] for j in keep])
    return dataclasses.replace(routing, expert_ids=ids, scores=scores, gates=gates,
                               experts=experts if routing.experts is not None else None)


def _without(routing: BatchRouting, missing: set[int]) -> BatchRouting:
    """The routing with the `missing` experts removed from every sequence, gates renormalised, their ids
    in `skipped`."""
    kept = drop_per_row(routing, [missing] * len(routing.expert_ids))
    skipped = [[i for i in i_b if i in missing] for i_b in routing.expert_ids]
    return dataclasses.replace(kept, skipped=skipped)


# ----------------------------------------------------------------------------- decoding
def eos_ids(base: BaseModel) -> set[int]:
    """The token ids that end a generation: the tokenizer's and the generation config's end tokens."""
    ids: set[int] = set()
    gen_cfg = getattr(base.model, "generation_config", None)
    for src in (base.tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def _select(logits: torch.Tensor, rows: Sequence[GenerationParams], gens: Sequence[torch.Generator | None],
            finished: Sequence[bool]) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): greedy rows by argmax, each sampling row from
    its own temperature, top_p and generator (a finished row draws nothing, so a seeded row's draws
    depend on that row alone)."""
    nxt = logits.argmax(-1)
    for b, p in enumerate(rows):
        if p.temperature == 0 or finished[b]:
            continue
        probs = torch.softmax(logits[b].float() / p.temperature, dim=-1)  # (V,)
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            drop = sp.cumsum(-1) - sp > p.top_p  # keep the smallest head >= top_p
            probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
        nxt[b] = torch.multinomial(probs, 1, generator=gens[b])[0]
    return nxt


Params = GenerationParams | Sequence[GenerationParams] | None  # one for all sequences, or one each


def _row_params(params: Params, B: int) -> list[GenerationParams]:
    """One GenerationParams per sequence; the batch-wide fields must agree."""
    if params is None or isinstance(params, GenerationParams):
        return [params or GenerationParams()] * B
    rows = list(params)
    if len(rows) != B:
        raise ValueError(f"params: got {len(rows)} GenerationParams for a batch of {B} sequences")
    for name in ("gate_temperature", "system_prompt"):
        values = {getattr(p, name) for p in rows}
        if len(values) > 1:
            raise ValueError(f"params: {name} applies to the whole batch, got {sorted(map(str, values))}")
    return rows


@dataclass
class _Step:
    """One decoding step's news: the token of each sequence (-1 when it had already finished)."""

    tokens: list[int]


def _run(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    chats: Chats,
    route_step: RouteStep | None,
    params: Params,
) -> Iterator[_Step | list[Generation]]:
    """The generation loop; yields a `_Step` per decoded token, then the list of Generations.

    No context (grad mode, routing) is held across a `yield`: each forward enters its own.
    """
    tok = base.tokenizer
    if route_step is not None and encoder is None:
        raise ValueError("a router needs a query encoder")
    if encoder is not None:
        encoder.check_model(base)
    t0 = time.perf_counter()
    if isinstance(chats, ChatBatch):
        batch = chats
        rows = _row_params(params, batch.input_ids.shape[0])
    else:
        rows = _row_params(params, len(chats))
        batch = encode_messages(base, chats, rows[0].system_prompt if rows else None)
    B = batch.input_ids.shape[0]
    lower, routing, prepared = route_batch(base, fusion, encoder, batch, route_step)

    def routed():
        return fusion.activate(prepared) if fusion is not None else nullcontext()

    gens = [torch.Generator(device=base.device).manual_seed(p.seed)
            if p.temperature > 0 and p.seed is not None else None for p in rows]
    max_new = [p.max_new_tokens or base.config.max_new_tokens for p in rows]
    eos = eos_ids(base)
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
    while True:
        nxt = _select(logits, rows, gens, finished)  # (B,)
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
            if rows[b].stop and _hit_stop(tok, out[b], rows[b].stop):
                finished[b], reasons[b] = True, "stop"
            elif n_gen[b] >= max_new[b]:
                finished[b] = True  # reason "length"
        yield _Step(news)
        if all(finished):
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
    result = []
    for b in range(B):
        text = tok.decode(out[b], skip_special_tokens=True)
        if rows[b].stop:
            text = _cut_stop(text, rows[b].stop)
        result.append(
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
                degraded=routing.degraded,
            )
        )
    yield result


def route_batch(base: BaseModel, fusion: ExpertFusion | None, encoder: Encoder | None, batch: ChatBatch,
                route_step: RouteStep | None) -> tuple[LowerPrefill, BatchRouting, Any]:
    """Layers 0..Lq of a batch, then its routing: queries from the user tokens, the route step, the
    encoder's arbitration (a relation gate, `routing.relation_gate`) and the fusion's prepared experts
    (None without a fusion). The prompt's states never see later tokens, so a batch that carries a known
    continuation after each prompt gets the same routing as the prompt alone."""
    B = batch.input_ids.shape[0]
    with torch.no_grad():
        lower = prefill_lower(base, batch.input_ids, batch.attention_mask)
        if encoder is not None:
            xq = encoder.encode_hidden(lower.hidden, batch.user_mask)  # (B, d_key)
        else:
            xq = np.zeros((B, 0), dtype=np.float32)
    routing = route_step(xq) if route_step is not None else no_routing(xq)  # plain Python (may call Ray)
    arbitrate = getattr(encoder, "arbitrate", None)
    if arbitrate is not None and routing.experts is not None:
        routing = arbitrate(base, batch, routing)
    experts = routing.experts if routing.experts is not None else [[] for _ in range(B)]
    if len(experts) != B:
        raise ValueError(f"the route step returned the routing of {len(experts)} sequences, not {B}")
    if fusion is None and any(experts):
        raise ValueError("experts were routed but no ExpertFusion was given")
    prepared = fusion.prepare(experts, routing.gate_tensor()) if fusion is not None else None
    return lower, routing, prepared


def _hit_stop(tok: Any, ids: list[int], stop: tuple[str, ...]) -> bool:
    tail = tok.decode(ids[-32:], skip_special_tokens=True)
    return any(s in tail for s in stop)


def _cut_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _step_of(router: Router | None, fetch: Fetch | None, step: RouteStep | None,
             params: Params) -> RouteStep | None:
    if step is not None:
        if router is not None or fetch is not None:
            raise ValueError("give a route_step or a router and fetch, not both")
        return step
    if router is None:
        return None
    p = params if isinstance(params, GenerationParams) else next(iter(params or ()), GenerationParams())
    return make_route_step(router, fetch, p.gate_temperature)


def generate(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    batch_messages: Chats,
    router: Router | None = None,
    fetch: Fetch | None = None,
    params: Params = None,
    *,
    route_step: RouteStep | None = None,
) -> list[Generation]:
    """Routed generation for a batch of chats (lists of {"role", "content"} messages, or a `ChatBatch`
    already encoded), in one batched forward.

    Routing: `route_step` (xq -> BatchRouting, experts fetched), or a router and a fetch; none of them (and
    encoder None): the plain base model. params: one for every sequence, or one per sequence.
    """
    result: list[Generation] = []
    step = _step_of(router, fetch, route_step, params)
    for item in _run(base, fusion, encoder, batch_messages, step, params):
        if isinstance(item, list):
            result = item
    return result


def generate_stream(
    base: BaseModel,
    fusion: ExpertFusion | None,
    encoder: Encoder | None,
    messages: Sequence[Message] | ChatBatch,
    router: Router | None = None,
    fetch: Fetch | None = None,
    params: GenerationParams | None = None,
    *,
    route_step: RouteStep | None = None,
) -> Iterator[str | Generation]:
    """One chat (or a `ChatBatch` of one), streamed: yields text deltas (str), then the final `Generation`.

    Deltas are held back while the decoded text ends in an incomplete UTF-8 character; the
    concatenated deltas equal the final text (stop strings are cut before they are emitted).
    """
    params = params or GenerationParams()
    tok = base.tokenizer
    eos = eos_ids(base)
    ids: list[int] = []
    emitted = ""
    hold = max((len(s) for s in params.stop), default=1) - 1
    chats = messages if isinstance(messages, ChatBatch) else [messages]
    for item in _run(base, fusion, encoder, chats, _step_of(router, fetch, route_step, params), params):
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
