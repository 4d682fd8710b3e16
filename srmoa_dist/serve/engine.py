"""`Engine`: what one ModelServer replica holds and does, without Serve.

The frozen base model, its query encoder and expert fusion, the `ExpertStoreClient` (LRU cache of
decoded experts) and the key-store actor handle. `generate` runs a batch of requests through
`model.generation.generate` with a router that asks the key-store actor (one search per batch) and a
fetch that reads through the client; `stream` does the same for one request, token by token. After
each batch the activations (q, ids, gates) go to the key store without waiting.

Requests and results are plain dicts so that they cross Serve handles cheaply:

    request  {"messages": [...], "max_tokens": int, "temperature": float, "top_p": float,
              "seed": int | None, "stop": [str] | None, "use_experts": bool}
    result   {"text", "finish_reason", "prompt_tokens", "completion_tokens",
              "routing": {"expert_ids", "scores", "gates", "deferred", "use_experts",
                          "skipped", "degraded", "degraded_reason"}}
          or {"error": {"status", "message", "param", "code"}}

Degrade, don't fail: a key-store search that does not answer within `runtime.search_timeout_s` (or a
key store that is down or restarting) answers with the base model, and a routed expert the store no
longer holds is skipped; the routing says so (`degraded`, `degraded_reason`, `skipped`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
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
        from srmoa_dist.runtime.store_init import ensure_encoder

        t0 = time.perf_counter()
        self.cfg = cfg
        self.runtime = runtime
        self.base = base if base is not None else load_base_model(cfg.model, cfg.model_cache_dir)
        self.encoder = ensure_encoder(cfg, self.base, runtime.keystore if runtime is not None else None)
        self.fusion = ExpertFusion(self.base.model, cfg.expert, cfg.model.query_layer)
        self.client = runtime.client() if runtime is not None else None
        self.keystore = runtime.keystore if runtime is not None else None
        self.tau = cfg.keystore.tau
        self.requests = 0
        self.batches = 0
        self.routed = 0
        self.deferred = 0
        self.degraded = 0                      # batches answered by the base model: no key-store answer
        self.skipped = 0                       # requests answered without a routed expert (not in the store)
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready in %.1f s: model %s, d_key %d", self.load_seconds, self.base.name,
                 self.encoder.d_key)

    # -- store access ---------------------------------------------------------------------------------

    def _fetch(self, ids: list[int]) -> dict[int, Any]:
        return self.client.fetch(ids) if self.client is not None else {}

    def _record(self, gens: Sequence[Any], router: _Router) -> None:
        """Send the activations of routed sequences to the key store (fire-and-forget), stamped with the
        key store's incarnation and slot epoch at routing time so it can drop activations of a slot
        that was freed and reused since."""
        rows = [g for g in gens if g.expert_ids]
        if not rows or router.routed_at is None:       # None: no key store, or no search made
            return
        k = max(len(g.expert_ids) for g in rows)
        q = np.stack([g.query for g in rows]).astype(np.float32)                 # (n, d_key)
        ids = np.full((len(rows), k), -1, np.int64)
        gates = np.zeros((len(rows), k), np.float32)
        for r, g in enumerate(rows):
            ids[r, : len(g.expert_ids)] = g.expert_ids
            gates[r, : len(g.gates)] = g.gates
        try:
            self.keystore.record.remote(q, ids, gates, *router.routed_at)
        except Exception:      # the key store restarting must not fail a request
            log.warning("could not send activations to the key store", exc_info=True)

    # -- requests -------------------------------------------------------------------------------------

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        from srmoa_dist.model.chat import encode_one, with_system

        ids, _, _ = encode_one(self.base.tokenizer, with_system(messages, self.base.system_prompt),
                               add_generation_prompt=True)
        return len(ids)

    def check(self, req: dict[str, Any]) -> None:
        """Raise RequestError when the prompt is over the limit."""
        limit = self.cfg.serve.max_prompt_tokens
        try:
            n = self.prompt_tokens(req["messages"])
        except ValueError as e:
            raise RequestError(f"invalid messages: {e}", param="messages", code="invalid_value") from None
        if n > limit:
            raise RequestError(f"the prompt is {n} tokens long; this server accepts at most {limit}",
                               param="messages", code="context_length_exceeded")

    def _params(self, req: dict[str, Any]) -> Any:
        from srmoa_dist.model.generation import GenerationParams

        return GenerationParams(
            max_new_tokens=int(req.get("max_tokens") or self.cfg.model.max_new_tokens),
            temperature=float(req.get("temperature") or 0.0),
            top_p=float(req.get("top_p") or 1.0),
            seed=req.get("seed"),
            gate_temperature=self.cfg.keystore.temperature,
            stop=tuple(req.get("stop") or ()),
        )

    def generate(self, reqs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """A batch of requests -> results in order (equal sampling parameters share one forward)."""
        from srmoa_dist.model.generation import generate

        out: list[dict[str, Any] | None] = [None] * len(reqs)
        groups: dict[Any, list[int]] = {}
        for j, r in enumerate(reqs):
            try:
                self.check(r)
                p = self._params(r)
            except RequestError as e:
                out[j] = e.as_dict()
                continue
            except ValueError as e:
                out[j] = RequestError(str(e)).as_dict()
                continue
            groups.setdefault(p, []).append(j)
        for p, idx in groups.items():
            use = [bool(reqs[j].get("use_experts", True)) for j in idx]
            router = _Router(self, use)
            gens = generate(self.base, self.fusion, self.encoder, [reqs[j]["messages"] for j in idx],
                            router=router, fetch=self._fetch, params=p)
            self._record(gens, router)
            for j, u, g in zip(idx, use, gens):
                out[j] = _result(g, u, router.degraded if u else None)
            self.batches += 1
        self.requests += len(reqs)
        for r in out:
            if r is not None and "routing" in r:
                self.skipped += bool(r["routing"]["skipped"])
                if r["routing"]["deferred"]:
                    self.deferred += 1
                else:
                    self.routed += 1
        return [r if r is not None else RequestError("no result").as_dict() for r in out]

    def stream(self, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """One request streamed: {"delta": str} items, then the final result dict (with "routing")."""
        from srmoa_dist.model.generation import Generation, generate_stream

        self.check(req)
        use = bool(req.get("use_experts", True))
        router = _Router(self, [use])
        for item in generate_stream(self.base, self.fusion, self.encoder, req["messages"],
                                    router=router, fetch=self._fetch, params=self._params(req)):
            if isinstance(item, Generation):
                self._record([item], router)
                self.requests += 1
                self.skipped += bool(item.skipped)
                if item.expert_ids:
                    self.routed += 1
                else:
                    self.deferred += 1
                yield _result(item, use, router.degraded if use else None)
            elif item:
                yield {"delta": item}

    # -- stats ----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "routed": self.routed,
                "deferred": self.deferred, "degraded_batches": self.degraded,
                "skipped_requests": self.skipped, "model": self.base.name, "load_seconds": self.load_seconds,
                "cache": self.client.cache_stats() if self.client is not None else None}


class _Router:
    """One batch's router: xq (B, d_key) -> D, I (B, k) from the key-store actor (one search), applying
    the batch's pending cache invalidations; rows with use=False get no expert (I = -1). Remembers the
    key store's (incarnation, slot epoch) of the search for `Engine._record`."""

    def __init__(self, engine: Engine, use: Sequence[bool]) -> None:
        self.engine = engine
        self.use = list(use)
        self.routed_at: tuple[str, int] | None = None
        self.degraded: str | None = None      # why the batch was answered by the base model, if so

    def __call__(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        e = self.engine
        B = xq.shape[0]
        none = np.zeros((B, 1), np.float32), np.full((B, 1), -1, np.int64)
        if e.keystore is None or not any(self.use):     # the base model alone: no search at all
            return none
        c = e.client
        timeout = e.cfg.runtime.search_timeout_s
        try:
            D, I, inc, entries, epoch = ray.get(
                e.keystore.search.remote(xq, e.cfg.keystore.k, e.tau, c.incarnation, c.seen_seq),
                timeout=timeout)
        except GetTimeoutError:
            self.degraded = f"the key store did not answer in {timeout:g} s: base model only"
        except RayActorError as err:       # dead or restarting (ActorUnavailableError is one too)
            self.degraded = f"the key store is unavailable ({type(err).__name__}): base model only"
        if self.degraded is not None:
            e.degraded += 1
            log.warning("routing degraded for a batch of %d: %s", B, self.degraded)
            return none
        c.apply_invalidations(inc, entries)
        self.routed_at = (inc, int(epoch))
        I = np.array(I, dtype=np.int64, copy=True)                                 # (B, k)
        for b, u in enumerate(self.use):
            if not u:
                I[b] = -1
        return D, I


def _result(g: Any, use: bool, degraded: str | None = None) -> dict[str, Any]:
    """A Generation as a result dict; `degraded`: why routing was skipped for the batch, if it was."""
    skipped = [int(i) for i in getattr(g, "skipped", ())]
    if degraded is None and skipped:
        degraded = f"expert(s) {skipped} are no longer in the store: answered without them"
    return {
        "text": g.text,
        "finish_reason": g.finish_reason if g.finish_reason in ("stop", "length") else "stop",
        "prompt_tokens": int(g.prompt_tokens),
        "completion_tokens": int(g.completion_tokens),
        "routing": {"expert_ids": [int(i) for i in g.expert_ids], "scores": [float(s) for s in g.scores],
                    "gates": [float(x) for x in g.gates], "deferred": not g.expert_ids, "use_experts": use,
                    "skipped": skipped, "degraded": degraded is not None, "degraded_reason": degraded},
    }


__all__ = ["Engine", "RequestError"]
