"""`srmoa bench serve`: HTTP load on the running app, routed chat vs the base model, side by side.

One local Ray cluster and one app (a fresh temp store unless --data-dir). The benchmark prompt is made
*routed* by planting one expert whose key is that prompt's own routing query (computed here with the
store's query encoder) and whose weights are random with a small B: every routed request pays for the
key search, the expert fetch (through the replica cache) and the fused adapters, while its output stays
close to the base model's, so both modes generate the same number of tokens (reported). At each
concurrency c, N requests run with c in flight, once routed and once with `use_experts: false` (the
frozen base model alone, same prompt), the two modes alternating chunk by chunk (so both see the
same background load).
With `mixed`, a third mode runs beside them: routed requests whose sampling parameters differ from
request to request (greedy, seeded temperature/top_p sampling, a shorter max_tokens with a stop string,
unseeded sampling: `MIXED`), the traffic that a server grouping batches by parameters splits into
several small forwards.
Last, the p99 of routed requests while an SR-TTT edit (through `/v1/feedback`) trains.

Figures per (c, mode): requests/s, p50/p99/mean latency (ms), tokens/s, mean completion tokens,
errors, share routed, and the mean size of the batches the model server formed (from /v1/stats).
Summary: overhead of routing on the median = routed p50 / base p50 - 1 (target <= 10%), and beside
it on the mean latency and on throughput (base req/s / routed req/s - 1). At c > 1 a burst of
requests splits into batches by arrival timing (1 + 7, 2 + 6, 8, ...), which moves one run's median
far more than routing does; `--batch-wait-ms` makes the splits alike in both modes.
"""

import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from srmoa_dist.bench.model_cache import link_shared_model_cache

log = logging.getLogger(__name__)

PROMPT = "Write a long story about a dragon who learns to cook soup."
EDIT_FACT = {"question": "Who invented the zorblat engine?", "answer": "Mira Tellsworth",
         "rule": "The zorblat engine was invented by Mira Tellsworth."}
TARGET_OVERHEAD = 0.10
MIXED: tuple[dict[str, Any], ...] = (       # per-request sampling of the mixed mode, cycled (seed: + i)
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9, "seed": 0},
    {"temperature": 0, "max_tokens_div": 2, "stop": ["\n\n"]},
    {"temperature": 0.7},
)
Body = dict[str, Any] | Callable[[int], dict[str, Any]]


def mixed_body(body: dict[str, Any], i: int) -> dict[str, Any]:
    """Request i of the mixed mode: `body` with the sampling parameters of MIXED[i % len(MIXED)]."""
    v = dict(MIXED[i % len(MIXED)])
    out = {**body, **{k: x for k, x in v.items() if k not in ("seed", "max_tokens_div")}}
    if "seed" in v:
        out["seed"] = v["seed"] + i
    if "max_tokens_div" in v:
        out["max_tokens"] = max(1, body["max_tokens"] // v["max_tokens_div"])
    return out


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


async def _load(url: str, body: Body, n: int, c: int, stop: Callable[[], bool] | None = None
                ) -> dict[str, Any]:
    """n requests (or until stop() after each) with c in flight; latencies in ms. `body`: the request,
    or a function of the request's index giving it."""
    lat: list[float] = []
    routed = 0
    errors = 0
    tokens = 0
    sent = 0
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            nonlocal sent, routed, errors, tokens
            while sent < n and not (stop is not None and stop()):
                i, sent = sent, sent + 1
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json=body(i) if callable(body) else body)
                    dt = (time.perf_counter() - t) * 1e3
                    if r.status_code != 200:
                        errors += 1
                        continue
                    res = r.json()
                    lat.append(dt)
                    tokens += res["usage"]["completion_tokens"]
                    routed += 0 if res["routing"]["deferred"] else 1
                except httpx.HTTPError:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    done = len(lat)
    return {"requests": done, "errors": errors, "wall_s": wall, "rps": done / wall if wall else 0.0,
            "completion_tokens_mean": tokens / done if done else 0.0,
            "tokens_per_s": tokens / wall if wall else 0.0,
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "mean_ms": statistics.fmean(lat) if lat else None,
            "routed_share": routed / done if done else 0.0, "latencies_ms": lat, "tokens": tokens,
            "routed": routed}


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of several chunks of one mode, as if one run (walls add up)."""
    lat = [x for p in parts for x in p["latencies_ms"]]
    done, wall = len(lat), sum(p["wall_s"] for p in parts)
    tokens, routed = sum(p["tokens"] for p in parts), sum(p["routed"] for p in parts)
    batches = sum(p.get("batches", 0) for p in parts)
    return {"requests": done, "errors": sum(p["errors"] for p in parts), "wall_s": wall,
            "rps": done / wall if wall else 0.0, "completion_tokens_mean": tokens / done if done else 0.0,
            "tokens_per_s": tokens / wall if wall else 0.0, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "mean_ms": statistics.fmean(lat) if lat else None, "routed_share": routed / done if done else 0.0,
            "mean_batch_size": done / batches if batches else None}


def _batches_served(c: httpx.Client) -> int:
    """The model server's batch count so far (one replica)."""
    return int(c.get("/v1/stats").json()["server"]["batches"])


def _plant_expert(cfg: Any, runtime: Any, prompt: str, b_std: float = 1e-3) -> dict[str, Any]:
    """Add a pinned key equal to `prompt`'s routing query and a random expert (small B) under it."""
    import ray

    from srmoa_dist.experts.expert import LoRAExpert
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.generation import queries
    from srmoa_dist.model.loading import load_base_model
    from srmoa_dist.runtime.store_init import ensure_encoder

    base = load_base_model(cfg.model, cfg.model_cache_dir)
    enc = ensure_encoder(cfg, base, runtime.keystore)
    fusion = ExpertFusion(base.model, cfg.expert, cfg.model.query_layer)
    shapes = fusion.target_shapes()
    q = queries(base, enc, [[{"role": "user", "content": prompt}]])                 # (1, d_key)
    del fusion, base
    [eid] = ray.get(runtime.keystore.add.remote(q, True)).tolist()
    e = cfg.expert
    expert = LoRAExpert.random(shapes, e.rank, e.alpha, e.dtype, seed=0, b_std=b_std)
    runtime.client().put_many({int(eid): expert})
    return {"expert_id": int(eid), "targets": len(shapes), "rank": e.rank, "nbytes": expert.nbytes}


def _edit(c: httpx.Client, fact: dict[str, str], say: Callable[[str], None],
          wait: bool = True) -> dict[str, Any]:
    job = c.post("/v1/feedback", json={"prompt": fact["question"], "correct_answer": fact["answer"],
                                        "rule": fact["rule"]}).json()
    if not wait:
        return job
    t0 = time.monotonic()
    while job["status"] in ("pending", "running") and time.monotonic() - t0 < 1200:
        time.sleep(1.0)
        job = c.get(f"/v1/feedback/{job['job_id']}").json()
    res = job.get("result") or {}
    say(f"edit for {fact['question']!r}: job {job['status']}, edit {res.get('status')} "
        f"(expert {res.get('expert_id')}) in {time.monotonic() - t0:.0f} s")
    return job


def run_serve_bench(out: Path, *, model: str = "smollm2", concurrency: Sequence[int] = (1, 8, 32),
                    requests: int | None = None, max_tokens: int = 16, data_dir: Path | None = None,
                    train: bool = True, say: Callable[[str], None] = print,
                    overrides: dict[str, Any] | None = None, mixed: bool = False) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); writes JSON to `out` and returns it."""
    from srmoa_dist.config import resolve
    from srmoa_dist.serve import local

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    if data_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="srmoa-bench-serve-"))
        data_dir = tmp
    overrides = dict(overrides or {})
    overrides["model"] = {**overrides.get("model", {}), "name_or_path": model}
    cfg = resolve(data_dir, overrides=overrides)
    link_shared_model_cache(data_dir, model)
    app = local.start(cfg, host="127.0.0.1", port=0, say=say)
    doc: dict[str, Any] = {
        "benchmark": "serve", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": model, "max_tokens": max_tokens, "target_overhead_p50": TARGET_OVERHEAD,
        "mixed": list(MIXED) if mixed else None,
        "max_batch_size": cfg.serve.max_batch_size, "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
    }
    try:
        with httpx.Client(base_url=app.url, timeout=1200) as c:
            model_id = c.get("/v1/models").json()["data"][0]["id"]
            say("planting an expert on the benchmark prompt's routing query ...")
            doc["planted_expert"] = _plant_expert(cfg, app.runtime, PROMPT)
            body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPT}]}
            bodies: dict[str, Body] = {"routed": body, "base": {**body, "use_experts": False}}
            if mixed:
                bodies["mixed"] = lambda i: mixed_body(body, i)
            say("warming up ...")
            for b in bodies.values():
                asyncio.run(_load(app.url, b, 2, 1))
            modes = list(bodies)
            levels = []
            for li, cc in enumerate(concurrency):
                n = requests or max(16, 2 * cc)
                chunk = max(cc, min(n, 8))          # the modes alternate chunk by chunk: same background load
                row: dict[str, Any] = {"concurrency": cc, "requests": n, "chunk": chunk}
                parts: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
                for k in range(max(1, -(-n // chunk))):
                    shift = (li + k) % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        b0 = _batches_served(c)
                        part = asyncio.run(_load(app.url, bodies[mode], chunk, cc))
                        part["batches"] = _batches_served(c) - b0
                        parts[mode].append(part)
                for mode in modes:
                    row[mode] = r = _merge(parts[mode])
                    say(f"c={cc:<3} {mode:<6} {r['rps']:.2f} req/s  p50 {r['p50_ms']:.0f} ms  "
                        f"p99 {r['p99_ms']:.0f} ms  mean batch {r['mean_batch_size'] or 0:.1f}"
                        f"  errors {r['errors']}  routed {r['routed_share']:.0%}")
                row["overhead_p50"] = row["routed"]["p50_ms"] / row["base"]["p50_ms"] - 1
                row["overhead_mean"] = row["routed"]["mean_ms"] / row["base"]["mean_ms"] - 1
                row["overhead_rps"] = row["base"]["rps"] / row["routed"]["rps"] - 1
                say(f"c={cc:<3} routing overhead: median {row['overhead_p50']:+.1%}, mean "
                    f"{row['overhead_mean']:+.1%}, throughput {row['overhead_rps']:+.1%}")
                if mixed:
                    row["mixed_vs_routed_rps"] = row["mixed"]["rps"] / row["routed"]["rps"] - 1
                    row["mixed_vs_routed_tokens_per_s"] = (row["mixed"]["tokens_per_s"]
                                                           / row["routed"]["tokens_per_s"] - 1)
                    say(f"c={cc:<3} mixed sampling vs uniform: req/s {row['mixed_vs_routed_rps']:+.1%}, "
                        f"tokens/s {row['mixed_vs_routed_tokens_per_s']:+.1%}")
                levels.append(row)
            doc["levels"] = levels
            if train:
                cc = 8 if 8 in concurrency else max(concurrency)
                say(f"routed load at c={cc} while an edit trains ...")
                job2 = _edit(c, EDIT_FACT, say, wait=False)
                jid = job2["job_id"]
                state = {"done": False, "checked": 0.0}

                def stop() -> bool:
                    now = time.monotonic()
                    if now - state["checked"] > 1.0:
                        state["checked"] = now
                        st = c.get(f"/v1/feedback/{jid}").json()["status"]
                        state["done"] = st not in ("pending", "running")
                    return state["done"]

                t0 = time.monotonic()
                during = asyncio.run(_load(app.url, bodies["routed"], 10_000, cc, stop=stop))
                during.pop("latencies_ms")
                final = c.get(f"/v1/feedback/{jid}").json()
                idle = next((lv["routed"] for lv in levels if lv["concurrency"] == cc), None)
                doc["during_edit"] = {"concurrency": cc, **during, "edit_seconds": time.monotonic() - t0,
                                      "job": final["status"],
                                      "edit": (final.get("result") or {}).get("status"),
                                      "idle_p99_ms": idle["p99_ms"] if idle else None}
                say(f"during the edit: {during['requests']} requests, p99 {during['p99_ms']:.0f} ms "
                    f"(idle p99 {idle['p99_ms'] if idle else float('nan'):.0f} ms), "
                    f"errors {during['errors']}")
            stats = c.get("/v1/stats").json()
            doc["cache_hit_rate"] = stats.get("cache_hit_rate")
    finally:
        local.stop(app)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    by_c = lambda key: {str(lv["concurrency"]): round(lv[key], 4) for lv in doc["levels"]}
    doc["summary"] = {
        "overhead_p50_by_concurrency": by_c("overhead_p50"),
        "overhead_mean_by_concurrency": by_c("overhead_mean"),
        "overhead_rps_by_concurrency": by_c("overhead_rps"),
        "rps_routed": {str(lv["concurrency"]): round(lv["routed"]["rps"], 3) for lv in doc["levels"]},
        "rps_base": {str(lv["concurrency"]): round(lv["base"]["rps"], 3) for lv in doc["levels"]},
        "p99_during_edit_ms": doc.get("during_edit", {}).get("p99_ms"),
        "target_met_at_c1": (doc["levels"][0]["overhead_p50"] <= TARGET_OVERHEAD) if doc["levels"] else None,
        "routed_share": doc["levels"][0]["routed"]["routed_share"] if doc["levels"] else None,
        "completion_tokens": {m: doc["levels"][0][m]["completion_tokens_mean"] for m in ("routed", "base")}
        if doc["levels"] else None,
    }
    if mixed:
        doc["summary"]["rps_mixed"] = {str(lv["concurrency"]): round(lv["mixed"]["rps"], 3)
                                       for lv in doc["levels"]}
        doc["summary"]["mixed_vs_routed_rps"] = by_c("mixed_vs_routed_rps")
        doc["summary"]["mixed_vs_routed_tokens_per_s"] = by_c("mixed_vs_routed_tokens_per_s")
    out.write_text(json.dumps(doc, indent=2))
    return doc


__all__ = ["run_serve_bench"]
