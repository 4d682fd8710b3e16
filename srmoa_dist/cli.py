"""The `srmoa` command: init, serve, chat, feedback, stats, demo, bench store, bench serve, bench chaos."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="srmoa-dist: a distributed store of frozen LoRA experts behind a frozen LLM.",
                  no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print and save their figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

DEFAULT_URL = "http://127.0.0.1:8000"
CONFIG_HELP = "SrmoaConfig YAML (default: DATA_DIR/config.yaml or built-ins)."
MODEL_HELP = "Base model: smollm2 (default), an HF id, a local dir or a .gguf."


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--experts must be comma-separated integers, got {text!r}") from None
    if not sizes or any(n <= 0 for n in sizes):
        raise typer.BadParameter(f"--experts must be positive integers, got {text!r}")
    return sizes


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise typer.BadParameter(f"{name} must be positive integers, got {text!r}")
    return vals


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _say(msg: str) -> None:
    typer.echo(f"[srmoa] {msg}", err=True)


def _config(data_dir: Path, config: Path | None, model: str | None = None, **serve: Any) -> Any:
    """The store's config (`config.resolve`): --config, else data_dir/config.yaml, else defaults; then
    the options that were given (None: not given, the file's value stands)."""
    from srmoa_dist.config import resolve

    overrides: dict[str, Any] = {"serve": {k: v for k, v in serve.items() if v is not None}}
    if model:
        overrides["model"] = {"name_or_path": model}
    try:
        return resolve(data_dir, config, overrides)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None


def _bench_config(config: Path | None) -> Any:
    """The YAML config a benchmark starts from (None: the defaults); a bad file is a usage error."""
    from srmoa_dist.config import SrmoaConfig

    if config is None:
        return None
    try:
        return SrmoaConfig.load_yaml(config)
    except OSError as e:
        raise typer.BadParameter(f"--config {config}: {e.strerror}") from None
    except ValueError as e:
        raise typer.BadParameter(f"--config {config}: {e}") from None


def _read_key(path: Path | None, option: str) -> str | None:
    """A key from a secret file (stripped), None without a path; a bad file is a usage error."""
    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise typer.BadParameter(f"{option} {path}: {e.strerror}") from None
    if not key:
        raise typer.BadParameter(f"{option} {path} is empty")
    return key


# ----------------------------------------------------------------------------------------------------
# init / serve


@app.command()
def init(
    data_dir: Path = typer.Option(Path("./data"), help="Directory of the store."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    experts: int = typer.Option(16, min=0, help="Seed experts to create when the key store is empty."),
    seed_kind: str = typer.Option("blank", help="blank: B = 0 under random keys; real: non-zero B under keys "
                                  "near real queries (generated questions), written in bulk (millions)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Create a store: config.yaml, shards, key store, query encoder and N seed experts (no Ray)."""
    from srmoa_dist.runtime.store_init import SEED_KINDS, init_store

    _logging(verbose)
    if seed_kind not in SEED_KINDS:
        raise typer.BadParameter(f"--seed-kind must be one of {SEED_KINDS}, got {seed_kind!r}")
    cfg = _config(data_dir, config, model)
    summary = init_store(cfg, n_experts=experts, progress=_say, seed_kind=seed_kind)
    typer.echo(json.dumps(summary, indent=2))


@app.command("serve")
def serve_cmd(
    data_dir: Path = typer.Option(Path("./data"), help="Directory of the store (created when empty)."),
    config: Path | None = typer.Option(None, help=CONFIG_HELP),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    host: str | None = typer.Option(None, help="HTTP host (default: the config's serve.host, 127.0.0.1)."),
    port: int | None = typer.Option(None, min=0, max=65535,
                                    help="HTTP port (default: the config's serve.port, 8000; 0: any free)."),
    api_key: str | None = typer.Option(None, envvar="SRMOA_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on every /v1 route "
                                            "(never saved to the config; prefer the environment)."),
    api_key_file: Path | None = typer.Option(None, envvar="SRMOA_API_KEY_FILE",
                                             help="Read the API key from this file (a mounted secret)."),
    admin_key: str | None = typer.Option(None, envvar="SRMOA_ADMIN_KEY",
                                         help="Require this key (not the API key) on the learning and "
                                              "writing routes: POST /v1/feedback, DELETE /v1/edits/ID."),
    admin_key_file: Path | None = typer.Option(None, envvar="SRMOA_ADMIN_KEY_FILE",
                                               help="Read the admin key from this file."),
    replicas: int = typer.Option(1, min=1, help="ModelServer replicas."),
    show_config: bool = typer.Option(False, "--show-config",
                                     help="Print the resolved config (YAML, keys left out) and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the OpenAI-compatible API: a local Ray cluster (or RAY_ADDRESS) plus the Serve app.

    Ctrl-C or SIGTERM stops the app and the local Ray cluster this command started.
    """
    from srmoa_dist.serve import local

    _logging(verbose)
    # Keys live in this process's memory and the app's arguments only: `local.start` saves the config
    # without them, and a local Ray cluster started here inherits the environment they came from.
    api_key = api_key or _read_key(api_key_file, "--api-key-file")
    admin_key = admin_key or _read_key(admin_key_file, "--admin-key-file")
    cfg = _config(data_dir, config, model, host=host, port=port if port else None, api_key=api_key,
                  admin_key=admin_key)
    if show_config:
        typer.echo(local.without_keys(cfg).to_yaml(), nl=False)
        return
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    try:
        handle = local.start(cfg, host=host, port=port, num_replicas=replicas, say=_say,
                             log_to_driver=verbose)
    except Exception as e:
        _say(f"could not start: {e}")
        raise typer.Exit(1) from None
    # after ray.init, which installs its own SIGTERM handler (that one aborts the process)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _say(f"serving {cfg.serve.model_id} at {handle.url}/v1 (data dir {cfg.data_dir}); Ctrl-C to stop")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        _say("shutting down ...")
        local.stop(handle)
        _say("stopped")


# ----------------------------------------------------------------------------------------------------
# HTTP clients: chat / feedback / stats


def _client(url: str, api_key: str | None, timeout: float = 300.0) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)


def _check(r: Any) -> Any:
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text[:500]
        _say(f"HTTP {r.status_code}: {msg}")
        raise typer.Exit(1)
    return r.json()


def _model_id(c: Any) -> str:
    return _check(c.get("/v1/models"))["data"][0]["id"]


def _routing_line(routing: dict[str, Any] | None) -> str:
    if not routing:
        return "routing: -"
    if routing.get("deferred"):
        return "routing: base model (no expert above tau)"
    parts = [f"expert {i} (score {s:.3f}, gate {g:.2f})"
             for i, s, g in zip(routing["expert_ids"], routing["scores"], routing["gates"])]
    return "routing: " + ", ".join(parts)


@app.command()
def chat(
    message: str | None = typer.Argument(None, help="One message; omit for an interactive session."),
    url: str = typer.Option(DEFAULT_URL, envvar="SRMOA_URL", help="Server URL."),
    api_key: str | None = typer.Option(None, envvar="SRMOA_API_KEY"),
    max_tokens: int = typer.Option(64, min=1),
    no_experts: bool = typer.Option(False, "--no-experts", help="Answer with the base model alone."),
    stream: bool = typer.Option(True, help="Print tokens as they come."),
) -> None:
    """Chat with a running server (prints the answer and where it was routed)."""
    with _client(url, api_key) as c:
        model = _model_id(c)
        history: list[dict[str, str]] = []
        interactive = message is None
        while True:
            if interactive:
                try:
                    text = input("you> ").strip()
                except (EOFError, KeyboardInterrupt):
                    typer.echo("")
                    return
                if not text:
                    continue
                if text in ("/quit", "/exit"):
                    return
            else:
                text = message or ""
            history.append({"role": "user", "content": text})
            body = {"model": model, "messages": history, "max_tokens": max_tokens,
                    "use_experts": not no_experts, "stream": stream}
            answer, routing = _chat_once(c, body, stream)
            typer.echo(_routing_line(routing), err=True)
            history.append({"role": "assistant", "content": answer})
            if not interactive:
                return


def _chat_once(c: Any, body: dict[str, Any], stream: bool) -> tuple[str, dict | None]:
    if not stream:
        res = _check(c.post("/v1/chat/completions", json=body))
        text = res["choices"][0]["message"]["content"]
        typer.echo(text)
        return text, res.get("routing")
    parts: list[str] = []
    routing = None
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code >= 400:
            r.read()
            _check(r)
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                _say(f"stream error: {ev['error'].get('message')}")
                raise typer.Exit(1)
            for ch in ev.get("choices", []):
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
                    typer.echo(piece, nl=False)
            if ev.get("routing"):
                routing = ev["routing"]
    typer.echo("")
    return "".join(parts), routing


@app.command()
def feedback(
    prompt: str = typer.Option(..., help="The question the model got wrong."),
    answer: str | None = typer.Option(None, help="The correct answer."),
    rule: str | None = typer.Option(None, help="A correction rule (a fact or instruction)."),
    response: str = typer.Option("", help="What the model answered."),
    wait: bool = typer.Option(True, help="Wait for the job to finish and print its result."),
    timeout: float = typer.Option(600.0, help="Seconds to wait."),
    url: str = typer.Option(DEFAULT_URL, envvar="SRMOA_URL", help="Server URL."),
    api_key: str | None = typer.Option(None, envvar="SRMOA_API_KEY"),
) -> None:
    """Send a failed exchange to the server; it trains an expert (SR-TTT) while it keeps serving."""
    if not answer and not rule:
        raise typer.BadParameter("give --answer, --rule or both")
    with _client(url, api_key) as c:
        job = _check(c.post("/v1/feedback", json={"prompt": prompt, "response": response,
                                                   "correct_answer": answer, "rule": rule}))
        _say(f"job {job['job_id']}: {job['status']}")
        if not wait:
            typer.echo(json.dumps(job, indent=2))
            return
        job = _wait_job(c, job["job_id"], timeout)
        typer.echo(json.dumps(_job_summary(job), indent=2))
        if job["status"] != "done":
            raise typer.Exit(1)


def _wait_job(c: Any, job_id: str, timeout: float, progress: bool = True) -> dict[str, Any]:
    t0 = time.monotonic()
    last = None
    while True:
        job = _check(c.get(f"/v1/feedback/{job_id}", params={"wait": 5}))   # returns when it finishes
        if progress and job["status"] != last:
            _say(f"job {job_id}: {job['status']} ({time.monotonic() - t0:.0f} s)")
            last = job["status"]
        if job["status"] not in ("pending", "running"):
            return job
        if time.monotonic() - t0 > timeout:
            _say(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            return job


def _job_summary(job: dict[str, Any]) -> dict[str, Any]:
    r = job.get("result") or {}
    keep = ("edit_id", "status", "expert_id", "created", "rule", "steps", "answer", "answer_ok", "routed_to",
            "locality_changed", "reason", "timings")
    out = {k: job.get(k) for k in ("job_id", "status", "error")}
    out["edit"] = {k: r.get(k) for k in keep if k in r}
    if r.get("lm_losses"):
        out["edit"]["lm_loss"] = [round(r["lm_losses"][0], 4), round(r["lm_losses"][-1], 4)]
    return out


@app.command()
def stats(
    url: str = typer.Option(DEFAULT_URL, envvar="SRMOA_URL", help="Server URL."),
    api_key: str | None = typer.Option(None, envvar="SRMOA_API_KEY"),
) -> None:
    """Print the server's statistics (experts, shards, usage histogram, energy, cache hit rate)."""
    with _client(url, api_key) as c:
        typer.echo(json.dumps(_check(c.get("/v1/stats")), indent=2))


# ----------------------------------------------------------------------------------------------------
# demo


@app.command()
def demo(
    data_dir: Path = typer.Option(Path("./data/demo"), help="Directory of the demo's store."),
    model: str = typer.Option("smollm2", help="Base model (default: SmolLM2-135M-Instruct)."),
    fresh: bool = typer.Option(True, help="Start from an empty store (the model cache is kept)."),
    port: int = typer.Option(0, min=0, max=65535, help="HTTP port on 127.0.0.1 (0: a free one)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Teach the model a fact it gets wrong, through feedback, while it serves; show before and after.

    Exits 0 only when the edit worked: the question is answered right afterwards and an unrelated
    prompt's answer did not change.
    """
    from srmoa_dist.serve.demo import run_demo

    _logging(verbose)
    ok = run_demo(data_dir=data_dir, model=model, fresh=fresh, port=port, say=_say, verbose=verbose)
    raise typer.Exit(0 if ok else 1)


# ----------------------------------------------------------------------------------------------------
# benchmarks


@bench_app.command("store")
def bench_store(
    experts: str = typer.Option("10000", help="Store sizes, comma-separated (e.g. 10000,100000,1000000)."),
    shards: int = typer.Option(4, min=1, help="LMDB shards."),
    out: Path = typer.Option(Path("results/bench_store.json"), help="JSON file for the figures."),
    work_dir: Path | None = typer.Option(None, help="Where the stores are built (default: a temp dir)."),
    seed: int = typer.Option(0),
) -> None:
    """Ingest, get_many latency, search q/s and recall@8, and consolidation speed at each size."""
    from srmoa_dist.bench.store import run_store_bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_store_bench(_sizes(experts), shards=shards, out=out, work_dir=work_dir, seed=seed)


@bench_app.command("serve")
def bench_serve(
    out: Path = typer.Option(Path("results/bench_serve.json"), help="JSON file for the figures."),
    model: str = typer.Option("smollm2", help="Base model (smollm2, an HF id, a local dir or a .gguf)."),
    concurrency: str = typer.Option("1,8,32", help="Concurrency levels, comma-separated."),
    requests: int = typer.Option(0, min=0, help="Requests per level and mode (0: max(16, 2 x concurrency))."),
    max_tokens: int = typer.Option(16, min=1, help="Tokens generated per request."),
    data_dir: Path | None = typer.Option(None, help="Store directory (default: a fresh temp dir)."),
    train: bool = typer.Option(True, help="Also measure latency while an edit trains."),
    batch_wait_ms: float | None = typer.Option(
        None, min=0, help="serve.batch_wait_timeout_s in ms for this run (default: the config's). A longer "
        "wait makes a burst of requests form the same batches in both modes."),
    mixed: bool = typer.Option(False, help="Also run routed requests whose sampling parameters differ "
                               "request to request (greedy, seeded sampling, stop strings)."),
    store_experts: str | None = typer.Option(
        None, help="Store sizes, comma-separated (e.g. 1000,100000,1000000): the scale run instead, one "
        "store of real seed experts per size (bench/scale_serve.py)."),
    work_dir: Path | None = typer.Option(None, help="With --store-experts: where the stores are built "
                                         "(store-N, reused when present)."),
    config: Path | None = typer.Option(None, help="With --store-experts: a YAML config whose sections "
                                       "override the defaults (e.g. the expert geometry)."),
    keep_stores: bool = typer.Option(False, help="With --store-experts: keep the stores afterwards."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Requests/s and p50/p99 latency, routed vs base model, at each concurrency; p99 during an edit."""
    from srmoa_dist.bench.serve_bench import run_serve_bench

    _logging(verbose)
    if store_experts is not None:
        import tempfile

        import yaml

        from srmoa_dist.bench.scale_serve import run_scale_serve_bench

        ov = yaml.safe_load(config.read_text()) if config is not None else {}
        if batch_wait_ms is not None:
            ov.setdefault("serve", {})["batch_wait_timeout_s"] = batch_wait_ms / 1e3
        res = run_scale_serve_bench(out, _sizes(store_experts), overrides=ov, model=model,
                                    work_dir=work_dir or Path(tempfile.mkdtemp(prefix="srmoa-scale-")),
                                    requests=requests or 24, max_tokens=max_tokens, keep_stores=keep_stores,
                                    say=_say)
        typer.echo(json.dumps(res["targets"], indent=2))
        return
    overrides = None if batch_wait_ms is None else {"serve": {"batch_wait_timeout_s": batch_wait_ms / 1e3}}
    res = run_serve_bench(out, model=model, concurrency=_ints(concurrency, "--concurrency"),
                          requests=requests or None, max_tokens=max_tokens, data_dir=data_dir, train=train,
                          say=_say, overrides=overrides, mixed=mixed)
    typer.echo(json.dumps(res["summary"], indent=2))


@bench_app.command("routing")
def bench_routing(
    sizes: str = typer.Option("1000,10000,100000,1000000", help="Key counts, comma-separated."),
    facts: int = typer.Option(25_000, min=4, help="Generated facts (2 distinct questions each)."),
    out: Path = typer.Option(Path("results/bench_routing.json"), help="JSON file (and a PNG beside)."),
    model: str = typer.Option("smollm2", help="Base model (smollm2, an HF id, a local dir or a .gguf)."),
    d_key: int = typer.Option(128, min=1, help="Routing-key dimension of the query encoder."),
    cache_dir: Path | None = typer.Option(None, help="Pooled-state cache (default: the shared model cache)."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Held-out paraphrases routed to their own expert and unrelated prompts false-routed, per key count."""
    from srmoa_dist.bench.routing_quality import run_routing_bench

    _logging(verbose)
    doc = run_routing_bench(out, sizes=_sizes(sizes), n_facts=facts, model=model, d_key=d_key,
                            cache_dir=cache_dir, seed=seed, say=_say)
    typer.echo(json.dumps({"tau": doc["tau"], "sizes": doc["sizes"]}, indent=2))


@bench_app.command("partitions")
def bench_partitions(
    keys: int = typer.Option(1_000_000, min=16, help="Keys in the simulated store."),
    partitions: str = typer.Option("1,2,4,8", help="Partition counts K, comma-separated."),
    queries: int = typer.Option(2000, min=1, help="Queries fanned out per K."),
    nprobe: int = typer.Option(16, min=1, help="IVF lists probed per partition."),
    out: Path = typer.Option(Path("results/bench_partitions.json"), help="JSON file for the figures."),
    seed: int = typer.Option(0),
) -> None:
    """Simulate the key store split into K partitions: fan-out search, merged top-k, build and recall."""
    from srmoa_dist.bench.partition_sim import run_partition_sim

    logging.basicConfig(level=logging.WARNING)
    doc = run_partition_sim(out, n=keys, ks=_ints(partitions, "--partitions"), n_queries=queries,
                            nprobe=nprobe, seed=seed, say=_say)
    typer.echo(json.dumps(doc["rows"], indent=2))


@bench_app.command("ttt")
def bench_ttt(
    edits: int = typer.Option(50, min=1, help="Sequential edits of generated fictional facts."),
    out: Path = typer.Option(Path("results/bench_ttt.json"), help="JSON file for the figures."),
    data_dir: Path | None = typer.Option(None, help="Store directory (default: a fresh temp dir)."),
    seed: int = typer.Option(0),
    rule_option: bool = typer.Option(True, help="Also measure the routed expert plus its rule in context."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Reliability, generalization, locality and routing precision after N edits, beside two baselines."""
    from srmoa_dist.bench.ttt_bench import run_ttt_bench

    _logging(verbose)
    run_ttt_bench(edits, out, data_dir=data_dir, seed=seed, with_rule_option=rule_option, say=_say)


@bench_app.command("lifelong")
def bench_lifelong(
    edits: int = typer.Option(100, min=1, help="Sequential edits (facts about invented entities)."),
    facts_per_entity: int = typer.Option(3, min=1, help="Edited facts about each entity (1..4)."),
    out: Path = typer.Option(Path("results/bench_lifelong.json"), help="JSON file (and a PNG beside)."),
    checkpoints: str = typer.Option(",".join(map(str, (10, 100, 250, 500, 1000))),
                                    help="Edit counts at which every metric is measured (and the last)."),
    baselines: str = typer.Option("base,rule_in_context,shared_lora",
                                  help="Baselines measured beside: base, rule_in_context, shared_lora, "
                                       "grace."),
    serve_queries: int = typer.Option(20_000, min=0, help="Routed queries consolidated after the edits."),
    eval_facts: int = typer.Option(300, min=1, help="Facts evaluated at a checkpoint at most (even sample)."),
    strangers: int = typer.Option(8, min=0, help="Locality probes about invented entities no edit is about."),
    tau: float | None = typer.Option(None, min=-1.0, max=1.0,
                                     help="Deferral threshold (default: calibrated on held-apart facts)."),
    config: Path | None = typer.Option(None, help="A YAML config to start from (default: the defaults)."),
    data_dir: Path | None = typer.Option(None, help="Store directory (default: a fresh temp dir)."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Reliability, generalization, locality and same-entity leak at checkpoints, beside baselines."""
    from srmoa_dist.bench.lifelong import BASELINES, run_lifelong_bench

    _logging(verbose)
    cfg = _bench_config(config)
    names = [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise typer.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(BASELINES)} "
                                 f"(or \"\" for none)", param_hint="--baselines")
    run_lifelong_bench(edits, out, facts_per_entity=facts_per_entity, cfg=cfg,
                       checkpoints=_ints(checkpoints, "--checkpoints"),
                       baselines=names,
                       serve_queries=serve_queries, eval_facts=eval_facts, n_strangers=strangers, tau=tau,
                       data_dir=data_dir, seed=seed, say=_say)


@bench_app.command("feedback")
def bench_feedback(
    edits: int = typer.Option(24, min=1, help="Sequential edits through POST /v1/feedback."),
    facts_per_entity: int = typer.Option(3, min=1, help="Edited facts about each invented entity (1..4)."),
    queued: int = typer.Option(0, min=0, help="Then this many edits posted at once and waited for."),
    strangers: int = typer.Option(6, min=0, help="Locality probes about invented entities no edit is about."),
    out: Path = typer.Option(Path("results/bench_feedback.json"), help="JSON file for the figures."),
    model: str = typer.Option("smollm2", help="Base model of the served app."),
    config: Path | None = typer.Option(None, help="A YAML config a fresh store starts from (default: the "
                                                  "defaults; a store's own config.yaml wins)."),
    data_dir: Path | None = typer.Option(None, help="Store directory (default: a fresh temp dir)."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Edit latency (feedback -> verified) and free-generation quality, all through the HTTP API."""
    from srmoa_dist.bench.feedback_bench import run_feedback_bench

    _logging(verbose)
    cfg = _bench_config(config)
    run_feedback_bench(out, edits=edits, facts_per_entity=facts_per_entity, queued=queued, model=model,
                       n_strangers=strangers, data_dir=data_dir, seed=seed, cfg=cfg, say=_say)


@bench_app.command("chaos")
def bench_chaos(
    minutes: float = typer.Option(10.0, min=0.1, help="How long the load, the edits and the kills run."),
    out: Path = typer.Option(Path("results/bench_chaos.json"), help="JSON file (and a timeline PNG beside)."),
    model: str | None = typer.Option(None, help="Base model of the served app (default: the config's)."),
    config: Path | None = typer.Option(None, help="A YAML config to start from (default: the defaults)."),
    data_dir: Path | None = typer.Option(None, help="Store directory (default: a fresh temp dir)."),
    kill_min_s: float = typer.Option(10.0, min=0.1, help="Shortest wait between two kills (seconds)."),
    kill_max_s: float = typer.Option(30.0, min=0.1, help="Longest wait between two kills (seconds)."),
    chat_workers: int = typer.Option(2, min=1, help="Clients sending chats back to back."),
    seed: int = typer.Option(0),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """kill -9 of shards, the key store, the trainer and the model replica under chat load and edits;
    then every edit invariant checked on the files, recovery times and every reply's body."""
    from srmoa_dist.bench.chaos import run_chaos_bench

    _logging(verbose)
    if kill_max_s < kill_min_s:
        raise typer.BadParameter(f"--kill-max-s ({kill_max_s}) must be >= --kill-min-s ({kill_min_s})")
    cfg = _bench_config(config)
    doc = run_chaos_bench(out, minutes, cfg=cfg, model=model, data_dir=data_dir,
                          kill_interval_s=(kill_min_s, kill_max_s), chat_workers=chat_workers, seed=seed,
                          say=_say)
    if not doc["meets_targets"]:
        _say("the run missed a target (see the JSON)")


def _register_cluster() -> None:
    from srmoa_dist.cli_cluster import cluster_app, register_benches

    app.add_typer(cluster_app, name="cluster")
    register_benches(bench_app)


_register_cluster()


def _register_experts() -> None:
    from srmoa_dist.cli_experts import register

    register(app)


_register_experts()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
