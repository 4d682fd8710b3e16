"""The Ray Serve application: an `Ingress` (FastAPI, OpenAI-compatible HTTP API) and a `ModelServer`.

    client --HTTP--> Ingress --handle--> ModelServer (Engine: base model, query encoder, expert cache)
                        |                    |--> KeyStoreActor.search / .record     (routing)
                        |                    '--> ShardActor.get_raw (via the client, LRU cache first)
                        '--> TrainerActor (feedback jobs, edits), KeyStoreActor / ShardActors (stats, experts)

Entry point for `serve run` / `serve deploy`: `srmoa_dist.serve.app:build_app` with `args`:

    config       path of a SrmoaConfig YAML (default: <data_dir>/config.yaml when present)
    data_dir     the store's directory (default: the config's, "./data")
    model        ModelConfig.name_or_path override ("smollm2", an HF id, a local dir, a .gguf)
    model_id     the name clients pass as "model" (ServeConfig.model_id)
    api_key      required bearer token (default: ServeConfig.api_key, else $SRMOA_API_KEY, else the
                 file named by $SRMOA_API_KEY_FILE, else none)
    admin_key    bearer token of the learning and writing routes (POST /v1/feedback, DELETE
                 /v1/edits/{id}); default: ServeConfig.admin_key, $SRMOA_ADMIN_KEY, $SRMOA_ADMIN_KEY_FILE.
                 Without it those routes take the user key (or none), as every other route does.
    num_replicas ModelServer replicas (default 1)
    overrides    nested mapping merged into the config ({"keystore": {"tau": 0.5}, ...})

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /v1/feedback,
GET /v1/feedback/{job_id}, GET /v1/experts, POST /v1/experts (import a PEFT adapter),
GET /v1/experts/{id}, GET /v1/experts/{id}/adapter (export), DELETE /v1/experts/{id}, GET /v1/edits,
DELETE /v1/edits/{edit_id}, GET /v1/stats (the expert routes: serve/experts_api.py); and, without
auth, GET /openapi.json (the OpenAPI document of every route, see
serve/openapi.py), GET /docs (an offline HTML page listing them), GET /healthz (liveness: the Ingress
answers; it touches nothing else) and GET /readyz (readiness: a model server answers, so the model is
loaded, and the key store answers a ping within runtime.search_timeout_s; 503 otherwise).

Tenants (serve/tenants.py): each key of the keys file (serve.api_keys_file or $SRMOA_API_KEYS_FILE,
`<key> <namespace>` lines) opens the user routes for its namespace; a request's routing reaches its
namespace's keys and serve.shared_namespace's, its feedback trains in its namespace. `model` may be
"<model_id>:<adapter name>" to force a named expert (gate 1); GET /v1/models lists the adapters.

Errors: bad input is a 4xx, never with Retry-After; an application error in a replica or actor is a
500 (retrying the same request meets it again); only transient conditions (queue full, an actor
restarting, a call timing out) are a 503 with Retry-After. A slow or absent key store does not fail a
generation: it is answered by the base model with `routing.degraded` set (see serve/engine.py).
"""


import asyncio
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from ray import serve

from srmoa_dist import __version__
from srmoa_dist.config import SrmoaConfig
from srmoa_dist.runtime.errors import brief
from srmoa_dist.serve.api_keys import resolve_admin_key, resolve_api_key  # noqa: F401
from srmoa_dist.serve.call_errors import _generation_error, _is_backpressure, _is_transient, _store_full_error  # noqa: F401
from srmoa_dist.serve.errors import (
    APIError,
    bad_request,
    forbidden,
    install_error_handlers,
    not_found,
    overloaded,
    unauthorized,
)
from srmoa_dist.serve.expert_schemas import ExpertImport
from srmoa_dist.serve.experts_api import ExpertsService, split_model
from srmoa_dist.serve.http_metrics import install_http_metrics
from srmoa_dist.serve.keyspace import DEFAULT_LIMIT, MAX_LIMIT, KeySpace, build_keyspace
from srmoa_dist.serve.openapi import DOCS_PATH, OPENAPI_PATH, PUBLIC_PATHS, docs_html, install_openapi
from srmoa_dist.serve.responses import (
    EditRollback,
    ExpertAdapter,
    ExpertDeleted,
    ExpertList,
    FeedbackJobList,
    Health,
    ImportedExpert,
    Ready,
    Stats,
)
from srmoa_dist.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EditList,
    ExpertInfo,
    FeedbackJob,
    FeedbackRequest,
    ModelCard,
    ModelList,
    Routing,
    Usage,
)
from srmoa_dist.serve.slots import _ReleasingStream, _Slots
from srmoa_dist.serve.tenants import Tenants, caller, resolve_tenants, set_caller
from srmoa_dist.serve.ui import UI_PATH, ui_html

log = logging.getLogger(__name__)

ARGS = ("config", "data_dir", "model", "model_id", "api_key", "admin_key", "num_replicas", "overrides")
CHARS_PER_TOKEN_BOUND = 16      # a prompt longer than this many chars per allowed token is refused unread


# ----------------------------------------------------------------------------------------------------
# Config from `serve run` / `serve deploy` args


def config_from_args(args: dict[str, Any] | None) -> SrmoaConfig:
    """The SrmoaConfig that `build_app(args)` serves (see the module docstring for the keys):
    `config.resolve` of config / data_dir / overrides, the named args on top, data_dir made absolute."""
    from srmoa_dist.config import resolve
    from srmoa_dist.runtime.bootstrap import resolve_config

    args = dict(args or {})
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ValueError(f"unknown build_app arg(s) {unknown}; known: {list(ARGS)}")
    overrides = args.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"build_app arg 'overrides' must be a mapping, got {overrides!r}")
    named = {"model": {"name_or_path": args.get("model")},
             "serve": {k: args.get(k) for k in ("model_id", "api_key", "admin_key")}}
    for section, values in named.items():
        given = {k: str(v) for k, v in values.items() if v}
        if given:
            overrides = {**overrides, section: {**(overrides.get(section) or {}), **given}}
    cfg = resolve(args.get("data_dir") or None, args.get("config") or None, overrides)
    return resolve_config(cfg)


def _usage(res: dict[str, Any]) -> Usage:
    return Usage(prompt_tokens=res["prompt_tokens"], completion_tokens=res["completion_tokens"],
                 total_tokens=res["prompt_tokens"] + res["completion_tokens"])


def _from_error(err: dict[str, Any]) -> APIError:
    """An engine/trainer {"status", "message", "param", "code"} dict as an APIError."""
    return APIError(int(err.get("status", 400)), err["message"], param=err.get("param"), code=err.get("code"))


# Learning and writing routes: with an admin key configured they need it (the user key gets a 403).
_ADMIN_ROUTES = (("POST", "/v1/feedback"), ("DELETE", "/v1/edits/"), ("POST", "/v1/experts"),
                 ("DELETE", "/v1/experts/"))


# ... of which a tenant key (serve/tenants.py) may use these, in its own namespace: it teaches itself.
_TENANT_WRITES = (("POST", "/v1/feedback"),)


def _visible(namespace: str | None) -> bool:
    """May the current caller see a job or edit of this namespace (the admin sees every one)?"""
    c = caller()
    return c.admin or (namespace or "default") == c.namespace


def _is_admin_route(method: str, path: str, routes: tuple[tuple[str, str], ...] = _ADMIN_ROUTES) -> bool:
    return any(method == m and (path.endswith(p) if not p.endswith("/") else p in path)
               for m, p in routes)


# ----------------------------------------------------------------------------------------------------
# ModelServer


@serve.deployment(name="ModelServer", health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class ModelServer:
    """Frozen base model + query encoder + expert cache; batched generation (`@serve.batch`)."""

    def __init__(self, cfg: SrmoaConfig) -> None:
        from srmoa_dist.model.loading import set_torch_threads
        from srmoa_dist.runtime.bootstrap import ensure_actors
        from srmoa_dist.serve.engine import Engine

        logging.basicConfig(level=logging.INFO)
        threads = set_torch_threads(cfg.runtime.torch_threads)
        self.cfg = cfg
        self.runtime = ensure_actors(cfg, trainer=False)
        self.engine = Engine(cfg, self.runtime)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model")
        self._generate_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        log.info("ModelServer ready (torch threads %d)", threads)

    @serve.batch  # max_batch_size and batch_wait_timeout_s: set from cfg.serve in __init__
    async def _generate_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.engine.generate, reqs)

    async def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._generate_batch(req)

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Items {"delta": str}, then the final result; or one {"error": ...} item."""
        from srmoa_dist.serve.engine import RequestError

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = object()
        cancelled = threading.Event()

        def work() -> None:
            try:
                for item in self.engine.stream(req):
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(q.put_nowait, item)
            except RequestError as e:
                loop.call_soon_threadsafe(q.put_nowait, e.as_dict())
            except Exception as e:
                log.exception("streamed generation failed")
                loop.call_soon_threadsafe(q.put_nowait, {"error": {"status": 500, "message": brief(e),
                                                                   "code": "internal_error", "param": None}})
            finally:
                loop.call_soon_threadsafe(q.put_nowait, done)

        fut = loop.run_in_executor(self._pool, work)
        try:
            while True:
                item = await q.get()
                if item is done:
                    break
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(fut)

    def check_health(self) -> None:
        """Serve's health check of this replica: its own state only. It never pings the shared key
        store or shards (one slow key store would mark every replica unhealthy at once, and Serve
        would restart them all); requests degrade instead, and GET /readyz reports the store."""
        if getattr(self, "engine", None) is None:
            raise RuntimeError("the model server has no engine")

    async def ready(self) -> dict[str, Any]:
        """Answers once the model is loaded (the constructor loaded it): its name, load time and pid."""
        return {"model": self.engine.base.name, "load_seconds": self.engine.load_seconds, "pid": os.getpid()}

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def target_shapes(self) -> dict[str, tuple[int, int]]:
        """The installed adapter targets (an imported expert must fit them)."""
        return self.engine.target_shapes()

    async def encode_prompts(self, prompts: list[str]) -> Any:
        """Routing queries (n, d_key) of prompts (an imported expert's key comes from its examples')."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.engine.encode_prompts, prompts)


# ----------------------------------------------------------------------------------------------------
# Ingress

api = FastAPI(title="srmoa-dist", version=__version__, docs_url=None, redoc_url=None,
              openapi_url=OPENAPI_PATH,
              description="OpenAI-compatible chat and completions over a frozen LLM with routed LoRA "
                          "experts that learn at test time (POST /v1/feedback).")
install_error_handlers(api)
install_openapi(api, __version__)
api.state.api_key = None
api.state.admin_key = None
api.state.tenants = Tenants()


def _same(token: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(token.encode(), key.encode())


@api.middleware("http")
async def _auth(request: Request, call_next: Any) -> Any:
    """Bearer keys. The user key (if any) opens every route but the admin ones; the admin key (if any)
    opens every route and is the only one that opens the admin routes. Probes and the API's
    description (/openapi.json, /docs) need no key."""
    user = getattr(request.app.state, "api_key", None)
    admin = getattr(request.app.state, "admin_key", None)
    tenants: Tenants = getattr(request.app.state, "tenants", None) or Tenants()
    path = request.url.path
    if path.endswith(PUBLIC_PATHS):
        return await call_next(request)
    needs_admin = admin is not None and _is_admin_route(request.method, path)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    tenant = tenants.namespace_of(token)
    if tenant is not None and _is_admin_route(request.method, path, _TENANT_WRITES):
        needs_admin = False
    # the request's namespace: its tenant key's, else "default"; no key at all configured: the operator
    set_caller(tenants.caller(tenant or "default", admin=_same(token, admin) or (
        user is None and admin is None and not tenants.keys)))
    if not needs_admin and user is None and not tenants.keys:
        return await call_next(request)
    if needs_admin:
        if _same(token, admin):
            return await call_next(request)
        if not header:
            return unauthorized("missing admin key: this route changes what the model learned; send "
                                "'Authorization: Bearer <admin key>' (the server's SRMOA_ADMIN_KEY)",
                                code="admin_key_required").response()
        if _same(token, user) or tenant is not None:
            return forbidden("the API key may chat but not teach or roll back: send the admin key "
                             "(the server's SRMOA_ADMIN_KEY) as 'Authorization: Bearer <admin key>'"
                             ).response()
        return unauthorized("invalid admin key", code="invalid_api_key").response()
    if _same(token, user) or _same(token, admin) or tenant is not None:
        return await call_next(request)
    if not header:
        return unauthorized("missing API key: send 'Authorization: Bearer <key>'").response()
    return unauthorized("invalid API key").response()


install_http_metrics(api)          # after _auth: the outermost middleware, so a 401 is counted too


async def _await(ref: Any, timeout: float) -> Any:
    return await asyncio.wait_for(_as_future(ref), timeout)


async def _as_future(ref: Any) -> Any:
    return await ref


@serve.deployment(name="Ingress", graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class Ingress:
    """The HTTP API (OpenAI-compatible chat/completions, feedback, edits, experts, stats)."""

    def __init__(self, cfg: SrmoaConfig, server: Any) -> None:
        from srmoa_dist.runtime.bootstrap import ensure_actors
        from srmoa_dist.runtime.client import ExpertStoreClient

        logging.basicConfig(level=logging.INFO)
        self.cfg = cfg
        self.server = server
        self.runtime = ensure_actors(cfg, trainer=True)
        self.client = ExpertStoreClient(self.runtime.shards, keystore=None, cache_size=0,
                                        timeout_s=cfg.runtime.call_timeout_s)
        api.state.api_key = resolve_api_key(cfg)
        api.state.admin_key = resolve_admin_key(cfg)
        api.state.tenants = resolve_tenants(cfg.serve.api_keys_file, cfg.serve.shared_namespace)
        self.experts = ExpertsService(cfg, self.runtime, self.client, server, cfg.runtime.call_timeout_s)
        self.limit = cfg.serve.max_ongoing_requests + cfg.serve.max_queued_requests
        self.inflight = 0
        self.rejected = 0
        self.timeout = cfg.runtime.call_timeout_s
        log.info("Ingress ready (auth %s, admin key %s, admission limit %d)",
                 "on" if api.state.api_key else "off", "on" if api.state.admin_key else "off", self.limit)

    # -- helpers --------------------------------------------------------------------------------------

    def _check_model(self, model: str) -> int | None:
        """The forced expert of `model` ("<model_id>:<adapter name>"), None for the bare model id; 404
        for another model or an adapter name the caller's namespaces do not have."""
        name = split_model(model, self.cfg.serve.model_id)
        return None if name is None else self.experts.resolve(caller(), name)

    def _check_limits(self, max_tokens: int | None, texts: list[str]) -> int:
        s = self.cfg.serve
        if max_tokens is not None and max_tokens > s.max_tokens_limit:
            raise bad_request(f"max_tokens is {max_tokens}; this server allows at most {s.max_tokens_limit}",
                              param="max_tokens", code="invalid_value")
        chars = sum(len(t) for t in texts)
        if chars > s.max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
            raise bad_request(f"the prompt is {chars} characters long, far over the limit of "
                              f"{s.max_prompt_tokens} tokens", param="messages",
                              code="context_length_exceeded")
        return int(max_tokens or min(self.cfg.model.max_new_tokens, s.max_tokens_limit))

    def _admit(self, n: int = 1) -> _Slots:
        """Take `n` admission slots at once (one per generation of the request), or none: 400 when the
        request alone is over the limit (a retry cannot help), 503 + Retry-After when the server is
        busy. Release them with the returned `_Slots` (idempotent) on every path."""
        if n > self.limit:
            self.rejected += 1
            raise bad_request(f"the request asks for {n} generations; this server takes at most "
                              f"{self.limit} at once: send fewer prompts per request",
                              param="prompt", code="too_many_prompts")
        if self.inflight + n > self.limit:
            self.rejected += 1
            raise overloaded(f"{self.inflight} requests in flight (limit {self.limit}); retry later")
        self.inflight += n
        return _Slots(self, n)

    async def _call_server(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            res = await self.server.generate.remote(req)
        except Exception as e:
            raise _generation_error(e) from None
        if "error" in res:
            err = res["error"]
            raise _from_error(err)
        return res

    def _gen_request(self, r: Any, text: dict[str, Any], default_max_tokens: int | None = None
                     ) -> dict[str, Any]:
        """The engine request (see serve/engine.py): `text` is {"messages": ...} or {"prompt": ...};
        sampling values the client omitted stay None (the engine fills the model's defaults). Routing:
        the request's k / tau, its forced expert (model "<id>:<adapter>"), the caller's namespaces."""
        c = caller()
        return {**text, "max_tokens": r.max_tokens, "default_max_tokens": default_max_tokens,
                "temperature": r.temperature, "top_p": r.top_p, "seed": r.seed, "stop": r.stop,
                "use_experts": r.use_experts, "k": r.k, "tau": r.tau, "expert_id": self._check_model(r.model),
                "namespace": c.namespace, "namespaces": list(c.reach)}

    async def _actor(self, ref: Any, what: str) -> Any:
        try:
            return await _await(ref, self.timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"the {what} did not answer in {self.timeout:.0f} s; retry later",
                           code="unavailable", headers={"Retry-After": "2"}) from None
        except Exception as e:
            full = _store_full_error(e)
            if full is not None:
                raise full from None
            if not _is_transient(e):     # the actor raised: the same call would raise again
                log.error("the %s failed: %s", what, brief(e), exc_info=e)
                raise APIError(500, f"the {what} failed ({brief(e)})", code="internal_error") from None
            log.warning("the %s is unavailable: %s", what, brief(e))   # died for good, or restarting
            raise APIError(503, f"the {what} is unavailable ({brief(e)}); retry later",
                           code="unavailable", headers={"Retry-After": "2"}) from None

    # -- the API's description ------------------------------------------------------------------------

    @api.get(DOCS_PATH, include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        """Every route of the OpenAPI document as one self-contained HTML page (no CDN)."""
        return HTMLResponse(docs_html(api.openapi()))

    # -- the key-space page (serve/ui.py, serve/keyspace.py) ------------------------------------------

    @api.get(UI_PATH, include_in_schema=False)
    async def ui(self) -> HTMLResponse:
        """The key-space page: a live 2-D map of the routing keys and the latest edits (offline HTML)."""
        return HTMLResponse(ui_html())

    @api.get("/v1/keyspace")
    async def keyspace(self, limit: int = DEFAULT_LIMIT) -> KeySpace:
        """The routing keys projected on their two principal axes, with namespace, pin, usage and
        the live edit of each; the latest edits. At most `limit` points (pinned, then most used)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise bad_request(f"limit must be in 1..{MAX_LIMIT}, got {limit}", param="limit",
                              code="invalid_value")
        raw = await self._actor(self.runtime.keystore.keyspace.remote(), "key store")
        edits: list[dict[str, Any]] = []
        if self.runtime.trainer is not None:
            edits = await self._actor(self.runtime.trainer.list_edits.remote(), "trainer")
        return build_keyspace(raw, edits, limit=limit)

    # -- OpenAI-compatible ----------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Health:
        """Liveness: this process answers. Never touches the model server or the store."""
        return Health()

    @api.get("/readyz")
    async def readyz(self) -> Ready:
        """Readiness: a model server answers (the model is loaded) and the key store answers a ping
        within runtime.search_timeout_s. 503 + Retry-After naming what is not ready otherwise."""
        t_ks = self.cfg.runtime.search_timeout_s
        checks: dict[str, Any] = {}
        problems: list[str] = []
        model_ref = self.server.ready.remote()
        ks_ref = self.runtime.keystore.ping.remote()
        try:
            checks["model"] = await asyncio.wait_for(_as_future(model_ref), self.timeout)
        except Exception as e:
            problems.append(f"the model server did not answer ({brief(e)})")
        try:
            await asyncio.wait_for(_as_future(ks_ref), t_ks)
            checks["keystore"] = "ok"
        except Exception as e:
            problems.append(f"the key store did not answer in {t_ks:g} s ({brief(e)})")
        if problems:
            raise APIError(503, "not ready: " + "; ".join(problems), code="not_ready",
                           headers={"Retry-After": "2"})
        return {"status": "ready", "checks": checks}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        """The base model, and each named adapter of the caller's namespaces as "<model_id>:<name>"."""
        mid = self.cfg.serve.model_id
        adapters = [ModelCard(id=f"{mid}:{e.name}", created=int(e.created), owned_by=e.namespace)
                    for e in self.experts.adapter_names(caller())]
        return ModelList(data=[ModelCard(id=mid, created=0), *adapters])

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        self._check_model(body.model)
        messages = body.message_dicts()
        self._check_limits(body.max_tokens, [m["content"] for m in messages])
        req = self._gen_request(body, {"messages": messages})
        if body.stream:
            return await self._stream_chat(body, req)
        slots = self._admit()
        try:
            res = await self._call_server(req)
        finally:
            slots.release()
        return ChatCompletion(
            model=body.model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=res["text"]),
                                finish_reason=res["finish_reason"])],
            usage=_usage(res), routing=Routing(**res["routing"]))

    async def _open_stream(self, req: dict[str, Any]) -> tuple[Any, dict[str, Any], _Slots]:
        """Admit a streaming request and start it: (generator, first item, its slot). The caller
        releases the slot when the stream ends; an error before the first item releases it here."""
        slots = self._admit()
        try:
            gen = self.server.options(stream=True).stream.remote(req)
            first = await gen.__anext__()
        except StopAsyncIteration:
            slots.release()
            raise APIError(500, "the model produced no output", code="internal_error") from None
        except BaseException as e:
            slots.release()
            if not isinstance(e, Exception):
                raise                                   # cancelled: the client went away
            raise _generation_error(e) from None
        if "error" in first:
            slots.release()
            raise _from_error(first["error"])
        return gen, first, slots

    def _sse(self, gen: Any, first: dict[str, Any], slots: _Slots,
             render: Callable[[dict[str, Any]], Iterator[str]], head: str | None = None) -> StreamingResponse:
        """Server-sent events of an opened stream: `head`, render(item) for every item, `[DONE]`. An
        error item or a failure mid-stream ends it with an error event. The slot is released when the
        events end, and when the response ends without ever starting them (the client went away)."""

        async def events() -> AsyncIterator[str]:
            try:
                if head is not None:
                    yield head
                item = first
                while True:
                    if "error" in item:
                        yield f"data: {json.dumps({'error': item['error']})}\n\n"
                        break
                    for event in render(item):
                        yield event
                    try:
                        item = await gen.__anext__()
                    except StopAsyncIteration:
                        break
                yield "data: [DONE]\n\n"
            except Exception as e:
                log.exception("stream failed")
                yield f"data: {json.dumps({'error': {'message': brief(e), 'type': 'server_error'}})}\n\n"
            finally:
                slots.release()

        return _ReleasingStream(events(), slots, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream_chat(self, body: ChatCompletionRequest, req: dict[str, Any]) -> Any:
        gen, first, slots = await self._open_stream(req)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: ChunkDelta, finish: str | None = None, **extra: Any) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=body.model,
                                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)], **extra)
            return f"data: {c.model_dump_json(exclude_none=False)}\n\n"

        def render(item: dict[str, Any]) -> Iterator[str]:
            if "delta" in item:
                yield chunk(ChunkDelta(content=item["delta"]))
                return
            yield chunk(ChunkDelta(), item["finish_reason"], routing=Routing(**item["routing"]))
            if include_usage:
                u = ChatCompletionChunk(id=cid, created=created, model=body.model, choices=[],
                                        usage=_usage(item))
                yield f"data: {u.model_dump_json()}\n\n"

        return self._sse(gen, first, slots, render, head=chunk(ChunkDelta(role="assistant", content="")))

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        """Each prompt is completed as raw text, no chat template (as vLLM); max_tokens defaults to
        the model's generation_config, else 16 (OpenAI's default for completions)."""
        self._check_model(body.model)
        prompts = body.prompts()
        self._check_limits(body.max_tokens, prompts)
        reqs = [self._gen_request(body, {"prompt": p}, default_max_tokens=16) for p in prompts]
        if body.stream:
            if len(prompts) != 1:
                raise bad_request("stream: true takes a single prompt", param="prompt", code="invalid_value")
            return await self._stream_completion(body, reqs[0])
        slots = self._admit(len(reqs))                  # all of the request's slots, or none
        try:
            results = await asyncio.gather(*(self._call_server(r) for r in reqs), return_exceptions=True)
        finally:
            slots.release()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        choices = [CompletionChoice(index=i, text=(p if body.echo else "") + r["text"],
                                    finish_reason=r["finish_reason"])
                   for i, (p, r) in enumerate(zip(prompts, results))]
        usage = Usage(prompt_tokens=sum(r["prompt_tokens"] for r in results),
                      completion_tokens=sum(r["completion_tokens"] for r in results),
                      total_tokens=sum(r["prompt_tokens"] + r["completion_tokens"] for r in results))
        routing = [Routing(**r["routing"]) for r in results]
        return Completion(model=body.model, choices=choices, usage=usage,
                          routing=routing[0] if isinstance(body.prompt, str) else routing)

    async def _stream_completion(self, body: CompletionRequest, req: dict[str, Any]) -> Any:
        gen, first, slots = await self._open_stream(req)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: str | None = None, routing: dict | None = None) -> str:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            d: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created,
                                 "model": body.model, "choices": [choice]}
            if routing is not None:
                d["routing"] = routing
            return f"data: {json.dumps(d)}\n\n"

        def render(item: dict[str, Any]) -> Iterator[str]:
            if "delta" in item:
                yield chunk(item["delta"])
            else:
                yield chunk("", item["finish_reason"], item["routing"])

        return self._sse(gen, first, slots, render)

    # -- feedback and edits ---------------------------------------------------------------------------

    def _trainer(self) -> Any:
        if self.runtime.trainer is None:
            raise APIError(503, "no trainer is running", code="unavailable", headers={"Retry-After": "5"})
        return self.runtime.trainer

    @api.post("/v1/feedback", status_code=202)
    async def feedback(self, body: FeedbackRequest) -> FeedbackJob:
        messages = body.message_dicts()
        self._check_limits(None, [m["content"] for m in messages] + [body.response])
        c = caller()                     # the edit trains in the caller's namespace (reach: own + shared)
        request = {**body.model_dump(exclude_none=True), "namespace": c.namespace, "reach": list(c.reach)}
        return await self._actor(self._trainer().submit.remote(request), "trainer")

    @api.get("/v1/feedback")
    async def feedback_jobs(self, limit: int = 100) -> FeedbackJobList:
        """The latest `limit` feedback jobs (1..1000)."""
        if not 1 <= limit <= 1000:
            raise bad_request(f"limit must be in 1..1000, got {limit}", param="limit", code="invalid_value")
        jobs = await self._actor(self._trainer().jobs.remote(limit), "trainer")
        return {"object": "list", "data": [j for j in jobs if _visible(j.get("namespace"))]}

    @api.get("/v1/feedback/{job_id}")
    async def feedback_status(self, job_id: str, wait: float = 0.0) -> FeedbackJob:
        """The job; with `wait` (s), once it finishes or after that long: one call, not a tight poll."""
        if not 0 <= wait <= 20:
            raise bad_request(f"wait must be in 0..20 s, got {wait}", param="wait", code="invalid_value")
        t = self._trainer()
        job = await self._actor(t.wait.remote(job_id, wait) if wait else t.job.remote(job_id), "trainer")
        if job is None or not _visible(job.get("namespace")):
            raise not_found(f"no feedback job '{job_id}'", param="job_id", code="job_not_found")
        return job

    @api.get("/v1/edits")
    async def edits(self) -> EditList:
        data = await self._actor(self._trainer().list_edits.remote(), "trainer")
        mine = [e for e in data if _visible((e.get("extra") or {}).get("namespace"))]
        return {"object": "list", "data": mine}

    @api.delete("/v1/edits/{edit_id}")
    async def rollback_edit(self, edit_id: str) -> EditRollback:
        res = await self._actor(self._trainer().rollback.remote(edit_id), "trainer")
        if "error" in res:
            err = res["error"]
            raise APIError(int(err.get("status", 400)), err["message"], param="edit_id", code=err.get("code"))
        return res

    # -- experts and stats ----------------------------------------------------------------------------

    @api.get("/v1/experts")
    async def list_experts(self, limit: int = 100, after: int | None = None, namespace: str | None = None,
                           origin: str | None = None) -> ExpertList:
        """Catalog entries of the caller's namespaces (the admin's: all), by id, `limit` after `after`."""
        return self.experts.list(caller(), limit=limit, after=after, namespace=namespace, origin=origin)

    @api.post("/v1/experts", status_code=201)
    async def import_expert(self, body: ExpertImport) -> ImportedExpert:
        """Import a PEFT LoRA adapter with a name and example prompts (its routing key)."""
        return await self.experts.import_adapter(caller(), body)

    @api.get("/v1/experts/{expert_id}/adapter")
    async def export_expert(self, expert_id: int) -> ExpertAdapter:
        """The expert as PEFT adapter files (adapter_config.json, base64 adapter_model.safetensors)."""
        return await self.experts.export_adapter(caller(), self._expert_id(expert_id))

    @api.delete("/v1/experts/{expert_id}")
    async def delete_expert(self, expert_id: int) -> ExpertDeleted:
        """Free the expert's slot, delete its record, invalidate the caches, drop its catalog entry."""
        return await self.experts.delete(caller(), self._expert_id(expert_id))

    @staticmethod
    def _expert_id(expert_id: int) -> int:
        if expert_id < 0:
            raise bad_request("expert ids are non-negative", param="expert_id", code="invalid_value")
        return expert_id

    @api.get("/v1/experts/{expert_id}")
    async def expert(self, expert_id: int) -> ExpertInfo:
        from srmoa_dist.experts.codec import decode_expert

        entry = self.experts.entry(caller(), self._expert_id(expert_id))
        loop = asyncio.get_running_loop()
        raws = await loop.run_in_executor(None, self.client.fetch_raw, [expert_id])
        raw = raws.get(expert_id)
        if raw is None:
            raise not_found(f"no expert {expert_id}", param="expert_id", code="expert_not_found")
        e = decode_expert(raw, expert_id=expert_id)
        key = await self._actor(self.runtime.keystore.key_info.remote([expert_id]), "key store")
        c = caller()
        if not c.admin and key and key[0] is not None and key[0].get("namespace") not in c.reach:
            raise not_found(f"no expert {expert_id}", param="expert_id", code="expert_not_found")
        return {"id": expert_id, "object": "expert", "shard": int(self.client.shard_of([expert_id])[0]),
                "version": e.version, "rank": e.rank, "alpha": e.alpha, "dtype": e.dtype, "nbytes": e.nbytes,
                "targets": {n: [int(a.shape[1]), int(b.shape[0])] for n, (a, b) in e.targets.items()},
                "key": key[0] if key else None, "catalog": entry}

    @api.get("/v1/stats")
    async def stats(self) -> Stats:
        rt = self.runtime
        ks_ref = rt.keystore.stats.remote()
        shard_refs = [s.stats.remote() for s in rt.shards]
        out: dict[str, Any] = {"object": "stats", "model": self.cfg.serve.model_id}
        out["keystore"] = await self._actor(ks_ref, "key store")
        shards = [await self._actor(r, "shard") for r in shard_refs]
        out["shards"] = shards
        out["experts"] = int(sum(int(s.get("entries", 0)) for s in shards))
        try:
            out["server"] = await asyncio.wait_for(_as_future(self.server.stats.remote()), self.timeout)
        except Exception as e:
            out["server"] = {"error": brief(e)}
        cache = (out["server"] or {}).get("cache") or {}
        out["cache_hit_rate"] = cache.get("hit_rate")
        if rt.trainer is not None:
            try:
                out["trainer"] = await _await(rt.trainer.stats.remote(), self.timeout)
            except Exception as e:
                out["trainer"] = {"error": brief(e)}
        out["ingress"] = {"inflight": self.inflight, "rejected": self.rejected, "limit": self.limit}
        out["namespaces"] = {"keys": out["keystore"].get("namespaces", {}),
                             "experts": self.experts.catalog.counts(),
                             "requests": (out["server"] or {}).get("namespaces", {})}
        return out


# ----------------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application for `serve run` / `serve deploy` (import path srmoa_dist.serve.app:build_app)."""
    from srmoa_dist.runtime.torch_env import torch_runtime_env

    cfg = config_from_args(args)
    args = dict(args or {})
    s, rt = cfg.serve, cfg.runtime
    keys = {"api_key": resolve_api_key(cfg), "admin_key": resolve_admin_key(cfg)}  # the driver's env
    cfg = cfg.replace(serve=dataclasses.replace(cfg.serve, **keys))
    server = ModelServer.options(
        num_replicas=int(args.get("num_replicas") or 1),
        ray_actor_options={"num_cpus": rt.replica_cpus, "runtime_env": torch_runtime_env(cfg),
                           **_resource(rt.replica_resource)},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
    ).bind(cfg)
    return Ingress.options(
        ray_actor_options={"num_cpus": rt.actor_cpus, **_resource(rt.ingress_resource)},
        max_ongoing_requests=s.max_ongoing_requests + s.max_queued_requests + 64,
    ).bind(cfg, server)


def _resource(name: str | None) -> dict[str, Any]:
    """Ray actor options asking one unit of a custom resource (runtime.replica_resource, ...)."""
    return {"resources": {name: 1}} if name else {}


__all__ = ["build_app", "config_from_args", "ModelServer", "Ingress", "api"]
