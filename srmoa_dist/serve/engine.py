"""`Engine`: what one ModelServer replica holds and does, without Serve.

The frozen base model, its query encoder and expert fusion, the `ExpertStoreClient` (LRU cache of
decoded experts) and the key-store actor handle. A request takes one pass, top to bottom:

    prepare     messages -> token ids, once (the length check counts these ids); params; use_experts
    generate    every prepared request of the batch in one `model.generation.generate` call (one
                batched forward, sampling and stopping per row), handed the engine's route step:
    _route      xq -> key-store search (one per batch) -> deferral and gates -> fetch through the
                client -> the activations (q, ids, gates) sent to the key store without waiting;
                generation's one call back into the engine, and the engine alone calls the store

Requests and results are plain dicts so that they cross Serve handles cheaply:

    request  {"messages": [...] | "prompt": str, "max_tokens": int | None, "temperature": float | None,
              "top_p": float | None, "seed": int | None, "stop": [str] | None, "use_experts": bool,
              "default_max_tokens": int | None}
             ("prompt": raw text, no chat template; an omitted sampling value is the model's
             generation_config's, else greedy / top_p 1 / default_max_tokens / model.max_new_tokens)
    result   {"text", "finish_reason", "prompt_tokens", "completion_tokens",
              "routing": {"expert_ids", "scores", "gates", "deferred", "use_experts",
                          "skipped", "degraded", "degraded_reason"}}
          or {"error": {"status", "message", "param", "code"}}

Routing per request (serve/route_plan.py): a request may also carry "k", "tau", "expert_id" (a
forced expert: gate 1, no search), "namespace" (its tenant, for the stats) and "namespaces" (the key
namespaces it may reach; None: every key); the routing says "forced".

Degrade, don't fail: a key-store search that does not answer within `runtime.search_timeout_s` (or a
key store that is down or restarting) answers with the base model, and a routed expert the store no
longer holds is skipped; the routing says so (`degraded`, `degraded_reason`, `skipped`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses (too long, ...): becomes a 4xx for the client."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def as_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "message": str(self), "param": self.param,
                          "code": self.code}}


class Engine:
    """The model side of serving (one per replica). `runtime` is a `bootstrap.Runtime` (or None: no store)."""

    def __init__(self, cfg: SrmoaConfig, runtime: Any | None, *, base: Any | None = None) -> None:
        from srmoa_dist.model.fusion import ExpertFusion
        from srmoa_dist.model.loading import load_base_model
        from srmoa_dist.model.sampling_defaults import sampling_defaults
        from srmoa_dist.runtime.keystore_proxy import KeyStoreProxy
        from srmoa_dist.runtime.store_init import ensure_encoder
        from srmoa_dist.serve.engine_metrics import EngineMetrics

        t0 = time.perf_counter()
        self.cfg = cfg
        self.runtime = runtime
        self.base = base if base is not None else load_base_model(cfg.model, cfg.model_cache_dir)
        self.encoder = ensure_encoder(cfg, self.base, runtime.keystore if runtime is not None else None)
        self.fusion = ExpertFusion(self.base.model, cfg.expert, cfg.model.query_layer)
        self.sampling = sampling_defaults(getattr(self.base.model, "generation_config", None))
        self.metrics = EngineMetrics()
        self.client = runtime.client() if runtime is not None else None
        self.keystore = runtime.keystore if runtime is not None else None
        self.keystore_calls = (KeyStoreProxy(self.keystore, cfg.keystore, cfg.runtime.search_timeout_s)
                               if self.keystore is not None else None)      # what the relation mirror reads
        self.tau = cfg.keystore.tau
        self.requests = 0
        self.batches = 0
        self.routed = 0
        self.deferred = 0
        self.degraded = 0                      # batches answered by the base model: no key-store answer
        self.skipped = 0                       # requests answered without a routed expert (not in the store)
        self.by_namespace: dict[str, dict[str, int]] = {}   # namespace -> requests / routed / deferred
        if self.keystore is not None:     # the bulk of the mirror read here, not in the first request
            self._sync_relations()
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready in %.1f s: model %s, d_key %d", self.load_seconds, self.base.name,
                 self.encoder.d_key)

    # -- requests -------------------------------------------------------------------------------------

    def prepare(self, req: dict[str, Any]) -> _Prepared:
        """The request tokenized (once), its length checked and its params built; RequestError if bad.
        A "prompt" request is completed as raw text (no chat template); a "messages" one is a chat."""
        from srmoa_dist.model.chat import encode_one, encode_prompt, with_system

        param = "prompt" if "prompt" in req else "messages"
        try:
            if param == "prompt":
                row = encode_prompt(self.base.tokenizer, req["prompt"])
            else:
                row = encode_one(self.base.tokenizer, with_system(req["messages"], self.base.system_prompt))
        except ValueError as e:
            raise RequestError(f"invalid {param}: {e}", param=param, code="invalid_value") from None
        n, limit = len(row[0]), self.cfg.serve.max_prompt_tokens
        if n > limit:
            raise RequestError(f"the prompt is {n} tokens long; this server accepts at most {limit}",
                               param=param, code="context_length_exceeded")
        try:
            params = self._params(req)
        except ValueError as e:
            raise RequestError(str(e)) from None
        from srmoa_dist.serve.route_plan import RoutePlan

        try:
            plan = RoutePlan.of(req, self.cfg.keystore.k)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise RequestError(str(e), param=field if field in ("k", "tau", "expert_id") else "use_experts",
                               code="invalid_value") from None
        return _Prepared(row, params, plan.use, plan, req.get("namespace"))

    def _params(self, req: dict[str, Any]) -> Any:
        from srmoa_dist.model.generation import GenerationParams

        d = self.sampling
        max_tokens = (req.get("max_tokens") or d.max_tokens or req.get("default_max_tokens")
                      or self.cfg.model.max_new_tokens)
        temperature, top_p = req.get("temperature"), req.get("top_p")
        return GenerationParams(
            max_new_tokens=int(min(max_tokens, self.cfg.serve.max_tokens_limit)),
            temperature=float(temperature if temperature is not None else d.temperature or 0.0),
            top_p=float(top_p if top_p is not None else d.top_p or 1.0),
            seed=req.get("seed"),
            stop=tuple(req.get("stop") or ()),
        )

    def generate(self, reqs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch of requests -> results in order; the valid ones run as one batched forward, each
        with its own sampling parameters."""
        from srmoa_dist.model.chat import pad
        from srmoa_dist.model.generation import generate

        out: list[dict[str, Any]] = [RequestError("no result").as_dict()] * len(reqs)
        todo: list[tuple[int, _Prepared]] = []
        for j, r in enumerate(reqs):
            try:
                todo.append((j, self.prepare(r)))
            except RequestError as e:
                out[j] = e.as_dict()
        if todo:
            plans = [p.plan for _, p in todo]
            batch = pad(self.base.tokenizer, [p.row for _, p in todo], self.base.device)
            gens = generate(self.base, self.fusion, self.encoder, batch, params=[p.params for _, p in todo],
                            route_step=functools.partial(self._route, plans=plans))
            for (j, p), g in zip(todo, gens):
                out[j] = self._count(_result(g, p.use, p.plan.expert_id is not None), p.namespace)
            self.batches += 1
        self.requests += len(reqs)
        return out

    def stream(self, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """One request streamed: {"delta": str} items, then the final result dict (with "routing")."""
        from srmoa_dist.model.chat import pad
        from srmoa_dist.model.generation import Generation, generate_stream

        p = self.prepare(req)
        batch = pad(self.base.tokenizer, [p.row], self.base.device)
        for item in generate_stream(self.base, self.fusion, self.encoder, batch, params=p.params,
                                    route_step=functools.partial(self._route, plans=[p.plan])):
            if isinstance(item, Generation):
                self.requests += 1
                yield self._count(_result(item, p.use, p.plan.expert_id is not None), p.namespace)
            elif item:
                yield {"delta": item}

    def _count(self, res: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        r = res["routing"]
        self.metrics.generation(r, namespace)
        self.skipped += bool(r["skipped"])
        if r["deferred"]:
            self.deferred += 1
        else:
            self.routed += 1
        ns = self.by_namespace.setdefault(namespace or "default", {"requests": 0, "routed": 0, "deferred": 0})
        ns["requests"] += 1
        ns["deferred" if r["deferred"] else "routed"] += 1
        return res

    # -- the route step ---------------------------------------------------------------------------------

    def _route(self, xq: np.ndarray, plans: Sequence[Any]) -> Any:
        """The route step handed to generation: xq (B, d_key) -> BatchRouting with the experts fetched.

        One key-store search for the batch (applying its pending cache invalidations), at the largest
        k and smallest tau of its rows, each row reaching its own namespaces; then each row is cut to
        its own plan (`route_plan.apply`: use_experts false gets no expert, a forced row its expert at
        gate 1). The activations of searched rows go to the key store, stamped with its incarnation
        and slot epoch at search time, so it can drop those of a slot freed and reused since.
        """
        from srmoa_dist.model.generation import no_routing, routed_ids, select_experts, with_experts
        from srmoa_dist.routing.relation_gate import search_slack
        from srmoa_dist.serve.route_plan import apply, row_taus, search_args

        ks = self.cfg.keystore
        if self.keystore is None or not any(p.use for p in plans):   # the base model alone: no search
            return no_routing(xq)
        args = search_args(plans, ks.k, self.tau)
        slack = search_slack(self.encoder)          # the relation gate vouches for named subjects under tau
        D = I = stamp = None
        if args is not None:
            k, tau_min, namespaces = args
            found = self._search(xq, k, tau_min - slack, namespaces)
            if isinstance(found, str):
                if not any(p.expert_id is not None for p in plans):
                    return no_routing(xq, degraded=found)
            else:
                D, I, stamp = found
                self._sync_relations()
        D, I = apply(plans, None if D is None else np.asarray(D), None if I is None else np.asarray(I),
                     ks.k, self.tau, slack)
        routing = select_experts(xq, D, I, ks.temperature, row_taus(plans, self.tau) if slack else None)
        wanted = routed_ids(routing)
        t_fetch = time.perf_counter()
        got = self.client.fetch_available(wanted, self.cfg.runtime.search_timeout_s)[0] if wanted else {}
        if wanted:
            self.metrics.fetch(time.perf_counter() - t_fetch, self.client)
        routing = with_experts(routing, got)         # an unreachable shard's experts: skipped, degraded
        if stamp is not None:
            self._record(routing, stamp, [p.searches for p in plans])
        return routing

    def _sync_relations(self) -> None:
        """The relation gate's mirror of the store's edited relations, synced when due
        (`routing.relation_bank`); a store that does not answer leaves the mirror as it was."""
        from srmoa_dist.routing.relation_gate import sync_edited

        try:
            sync_edited(self.encoder, self.keystore_calls, self.client, force=False)
        except Exception as err:           # the bank only sharpens deferral: serve on with the old one
            log.warning("could not sync the edited relations (%s: %s); routing uses the last copy",
                        type(err).__name__, err)

    def _search(self, xq: np.ndarray, k: int | None = None, tau: float | None = None,
                namespaces: list[Any] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, int]] | str:
        """D, I (B, k) and the (incarnation, epoch) stamp of one search; or why there is none (degraded)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        c, timeout = self.client, self.cfg.runtime.search_timeout_s
        t0 = time.perf_counter()
        try:
            D, I, inc, entries, epoch = ray.get(
                self.keystore.search.remote(xq, k or self.cfg.keystore.k, self.tau if tau is None else tau,
                                            c.incarnation, c.seen_seq, namespaces),
                timeout=timeout)
        except GetTimeoutError:
            why = f"the key store did not answer in {timeout:g} s: base model only"
        except RayActorError as err:       # dead or restarting (ActorUnavailableError is one too)
            why = f"the key store is unavailable ({type(err).__name__}): base model only"
        else:
            self.metrics.search(time.perf_counter() - t0)
            c.apply_invalidations(inc, entries)
            return D, I, (inc, int(epoch))
        self.degraded += 1
        self.metrics.degraded()
        log.warning("routing degraded for a batch of %d: %s", xq.shape[0], why)
        return why

    def _record(self, routing: Any, stamp: tuple[str, int], searched: Sequence[bool]) -> None:
        """Send the activations of the routed, searched sequences to the key store (fire-and-forget;
        a forced expert was not found by its query, so it must not pull its key; candidates under tau,
        which the relation gate may yet drop, are left out)."""
        from srmoa_dist.model.generation import at_or_over_tau

        routing = at_or_over_tau(routing)
        rows = [b for b, ids in enumerate(routing.expert_ids) if ids and searched[b]]
        if not rows:
            return
        k = max(len(routing.expert_ids[b]) for b in rows)
        q = np.asarray(routing.queries, dtype=np.float32)[rows]                    # (n, d_key)
        ids = np.full((len(rows), k), -1, np.int64)
        gates = np.zeros((len(rows), k), np.float32)
        for r, b in enumerate(rows):
            ids[r, : len(routing.expert_ids[b])] = routing.expert_ids[b]
            gates[r, : len(routing.gates[b])] = routing.gates[b]
        try:
            self.keystore.record.remote(q, ids, gates, *stamp)
        except Exception:      # the key store restarting must not fail a request
            log.warning("could not send activations to the key store", exc_info=True)

    # -- experts in and out (the ingress's import route) ------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """Routing queries (n, d_key) of prompts, each asked as one user message (as serving does)."""
        from srmoa_dist.model.generation import queries

        return queries(self.base, self.encoder, [[{"role": "user", "content": p}] for p in prompts])

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """The installed adapter targets: name -> (d_in, d_out) (what an imported expert must fit)."""
        return self.fusion.target_shapes()

    # -- stats ----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        from srmoa_dist.routing.relation_gate import edited_of

        bank = edited_of(self.encoder)
        return {"requests": self.requests, "batches": self.batches, "routed": self.routed,
                "deferred": self.deferred, "degraded_batches": self.degraded,
                "skipped_requests": self.skipped, "model": self.base.name, "load_seconds": self.load_seconds,
                "namespaces": {k: dict(v) for k, v in self.by_namespace.items()},
                "cache": self.client.cache_stats() if self.client is not None else None,
                "edited_relations": bank.stats() if bank is not None else None}


@dataclass(frozen=True)
class _Prepared:
    """A request ready for a batch: its encoded chat (ids, user mask, answer mask), params, use_experts."""

    row: tuple[list[int], list[bool], list[bool]]
    params: Any
    use: bool
    plan: Any = None                 # route_plan.RoutePlan
    namespace: str | None = None


def _result(g: Any, use: bool, forced: bool = False) -> dict[str, Any]:
    """A Generation as a result dict (routing.degraded: why routing was skipped for the batch, if so)."""
    degraded = g.degraded if use else None
    skipped = [int(i) for i in g.skipped]
    if degraded is None and skipped:
        degraded = (f"expert(s) {skipped} are not available (no longer in the store, or their shard is "
                    "unreachable): answered without them")
    return {
        "text": g.text,
        "finish_reason": g.finish_reason if g.finish_reason in ("stop", "length") else "stop",
        "prompt_tokens": int(g.prompt_tokens),
        "completion_tokens": int(g.completion_tokens),
        "routing": {"expert_ids": [int(i) for i in g.expert_ids], "scores": [float(s) for s in g.scores],
                    "gates": [float(x) for x in g.gates], "deferred": not g.expert_ids, "use_experts": use,
                    "skipped": skipped, "degraded": degraded is not None, "degraded_reason": degraded,
                    "forced": forced},
    }


__all__ = ["Engine", "RequestError"]
