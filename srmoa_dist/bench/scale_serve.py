"""`srmoa bench serve --store-experts 1000,100000,1000000`: the served system as the store grows.

Per size N: a store of N *real* seed experts (`srmoa init --experts N --seed-kind real`: non-zero B,
keys jittered around the routing queries of generated questions; built once under work_dir/store-N
and reused when already there), the app started on it, then chat requests asking those questions (so
each routed request searches N keys, fetches its experts through the replica cache and fuses them),
routed and base-only (`use_experts: false`) alternating chunk by chunk at concurrency 1 (latency) and
at `burst` (throughput). Then: the expert-cache hit rate, the resident memory of the key-store actor
and of the ModelServer replica (/proc VmRSS), and the key-store restart: kill -9 of its process ->
the first routed (not degraded) answer again.

JSON: `sizes` [{experts, routed_p50_ms, routed_p99_ms, base_p50_ms, base_p99_ms, routed_rps, base_rps,
experts_per_request, cache_hit_rate, keystore_rss_mb, model_server_rss_mb, keystore_restart_s, ...}]
and `targets` (routed median at the largest size <= 1.10 x at the smallest; restart <= 30 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from srmoa_dist.bench.model_cache import link_shared_model_cache
from srmoa_dist.bench.serve_bench import _load, _merge

log = logging.getLogger(__name__)

TARGET_LATENCY_RATIO = 1.10
TARGET_RESTART_S = 30.0
PROMPTS = 12                       # distinct seed questions the requests cycle through (twice at 24)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a local process (VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under path (LMDB maps are sparse files: st_size is the map size)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


class SizeRun:
    """One store size: build (or reuse) the store, serve it, measure, kill the key store, stop."""

    def __init__(self, n: int, root: Path, overrides: dict[str, Any], *, model: str, requests: int,
                 burst: int, max_tokens: int, say: Callable[[str], None]) -> None:
        self.n, self.root, self.model = n, root, model
        self.requests, self.burst, self.max_tokens, self.say = requests, burst, max_tokens, say
        self.overrides = overrides
        self.row: dict[str, Any] = {"experts": n}

    def run(self) -> dict[str, Any]:
        from srmoa_dist.serve import local

        cfg = self.build()
        t0 = time.monotonic()
        app = local.start(cfg, host="127.0.0.1", port=0, say=self.say)
        self.row["app_start_s"] = time.monotonic() - t0
        try:
            with httpx.Client(base_url=app.url, timeout=600) as c:
                self.bodies(c, cfg)
                self.latency(app.url)
                self.throughput(app.url)
                self.memory(c, app)
                self.restart(c, app)
                self.row["cache_hit_rate"] = c.get("/v1/stats").json().get("cache_hit_rate")
        finally:
            local.stop(app)
            if not app.runtime.started_local:          # a shared cluster: this size's actors go
                app.runtime.kill_actors()
        return self.row

    def build(self) -> Any:
        from srmoa_dist.config import resolve
        from srmoa_dist.runtime.store_init import init_store

        d = self.root / f"store-{self.n}"
        link_shared_model_cache(d, self.model)
        cfg = resolve(d, overrides=self.overrides)
        t0 = time.monotonic()
        out = init_store(cfg, n_experts=self.n, seed_kind="real", progress=self.say)
        self.row.update(init_s=time.monotonic() - t0, init_added=out["seed_experts_added"], keys=out["keys"],
                        store_bytes=_disk_bytes(d / "shards"))
        if out["keys"] != self.n:
            raise RuntimeError(f"{d} holds {out['keys']} keys, not {self.n}: delete it or use another dir")
        self.say(f"store of {self.n:,} experts ready ({self.row['store_bytes'] / 1e9:.2f} GB, "
                 f"{self.row['init_s']:.0f} s)")
        return cfg

    def bodies(self, c: httpx.Client, cfg: Any) -> None:
        from srmoa_dist.runtime.store_init import SEED_QUESTIONS_FILE

        model_id = c.get("/v1/models").json()["data"][0]["id"]
        qs = json.loads((Path(cfg.data_dir) / SEED_QUESTIONS_FILE).read_text())[:PROMPTS]
        mk = lambda i, routed: {"model": model_id, "max_tokens": self.max_tokens, "temperature": 0,  # noqa: E731
                                "messages": [{"role": "user", "content": qs[i % len(qs)]}],
                                **({} if routed else {"use_experts": False})}
        self.routed: Callable[[int], dict[str, Any]] = lambda i: mk(i, True)
        self.base: Callable[[int], dict[str, Any]] = lambda i: mk(i, False)
        for i in range(2):                                                   # warm-up
            for b in (self.routed(i), self.base(i)):
                c.post("/v1/chat/completions", json=b)

    def latency(self, url: str) -> None:
        """c = 1, routed and base alternating request by request; experts per routed request."""
        lat: dict[str, list[float]] = {"routed": [], "base": []}
        n_exp: list[int] = []
        errors = 0
        with httpx.Client(base_url=url, timeout=600) as c:
            for i in range(self.requests):
                for mode in (("routed", "base") if i % 2 == 0 else ("base", "routed")):
                    t = time.perf_counter()
                    body = (self.routed if mode == "routed" else self.base)(i)
                    r = c.post("/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        errors += 1
                        continue
                    lat[mode].append((time.perf_counter() - t) * 1e3)
                    if mode == "routed":
                        n_exp.append(len(r.json()["routing"]["expert_ids"]))
        for mode, xs in lat.items():
            self.row[f"{mode}_p50_ms"] = _pct(xs, 50)
            self.row[f"{mode}_p99_ms"] = _pct(xs, 99)
            self.row[f"{mode}_mean_ms"] = statistics.fmean(xs) if xs else None
        self.row["latency_errors"] = errors
        self.row["experts_per_request"] = statistics.fmean(n_exp) if n_exp else 0.0
        self.row["routed_share"] = float(np.mean([k > 0 for k in n_exp])) if n_exp else 0.0
        self.say(f"{self.n:>9,} experts c=1: routed p50 {self.row['routed_p50_ms']:.0f} ms (p99 "
                 f"{self.row['routed_p99_ms']:.0f}), base p50 {self.row['base_p50_ms']:.0f} ms, "
                 f"{self.row['experts_per_request']:.1f} experts/request")

    def throughput(self, url: str) -> None:
        """`burst` requests in flight, routed and base chunk by chunk: requests/s."""
        parts: dict[str, list[dict[str, Any]]] = {"routed": [], "base": []}
        n = 2 * self.burst
        for k in range(2):
            for mode in (("routed", "base") if k % 2 == 0 else ("base", "routed")):
                body = self.routed if mode == "routed" else self.base
                parts[mode].append(asyncio.run(_load(url, body, n // 2, self.burst)))
        for mode, ps in parts.items():
            m = _merge(ps)
            self.row[f"{mode}_rps"] = m["rps"]
            self.row[f"{mode}_tokens_per_s"] = m["tokens_per_s"]
            self.row[f"{mode}_burst_p50_ms"] = m["p50_ms"]
        self.row["burst"] = self.burst

    def memory(self, c: httpx.Client, app: Any) -> None:
        import ray

        info = ray.get(app.runtime.keystore.info.remote(), timeout=30)
        self.ks_pid = int(info["pid"])
        self.row["keystore_rss_mb"] = rss_mb(self.ks_pid)
        ready = c.get("/readyz").json()
        ms_pid = int(ready["checks"]["model"]["pid"])
        self.row["model_server_rss_mb"] = rss_mb(ms_pid)

    def restart(self, c: httpx.Client, app: Any) -> None:
        """kill -9 the key-store actor; seconds until a routed, non-degraded answer comes back."""
        body = {**self.routed(0), "max_tokens": 1}
        t0 = time.monotonic()
        os.kill(self.ks_pid, signal.SIGKILL)
        answered = degraded = 0
        while time.monotonic() - t0 < 300:
            try:
                r = c.post("/v1/chat/completions", json=body, timeout=60)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if r.status_code == 200:
                answered += 1
                rt = r.json()["routing"]
                if rt["expert_ids"] and not rt["degraded"]:
                    self.row["keystore_restart_s"] = time.monotonic() - t0
                    break
                degraded += 1
            time.sleep(0.2)
        else:
            self.row["keystore_restart_s"] = None
        self.row["answered_during_restart"] = answered
        self.row["degraded_during_restart"] = degraded
        import ray

        info = ray.get(app.runtime.keystore.info.remote(), timeout=60)
        self.row["keystore_rss_after_restart_mb"] = rss_mb(int(info["pid"]))
        self.say(f"{self.n:>9,} experts: key store back in {self.row['keystore_restart_s']} s "
                 f"({answered} answers meanwhile, {degraded} without experts)")


def run_scale_serve_bench(out: Path, sizes: Sequence[int], *, work_dir: Path,
                          overrides: dict[str, Any] | None = None, model: str = "smollm2",
                          requests: int = 24, burst: int = 8, max_tokens: int = 16,
                          keep_stores: bool = False, shared_ray: bool = False,
                          say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) at each size; writes JSON to `out`.

    Each size gets a local Ray cluster of its own (nothing of the last size left running), or with
    `shared_ray` one cluster for every size, each size in its own namespace (its actors killed after
    it): faster to start, for tests."""
    sizes = sorted(int(s) for s in sizes)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ov = json.loads(json.dumps(overrides or {}))
    ov["model"] = {**ov.get("model", {}), "name_or_path": model}
    ov["store"] = {"durable": False, **ov.get("store", {})}
    doc: dict[str, Any] = {
        "benchmark": "serve_scale", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": model,
        "max_tokens": max_tokens, "requests_per_mode": requests, "burst": burst, "overrides": ov,
        "shared_ray": shared_ray, "sizes": []}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = False
    if shared_ray:
        from srmoa_dist.config import SrmoaConfig
        from srmoa_dist.runtime.bootstrap import init_ray

        started = init_ray(SrmoaConfig.from_dict({"runtime": ov.get("runtime", {})}), log_to_driver=False)
    try:
        for n in sizes:
            n_map = max(1024, int(n * 40_000 / 2**20 / 4) + 1024)           # MiB per shard, 4 shards
            store = {"map_size_mb": n_map, "max_map_size_mb": max(65536, 2 * n_map), **ov["store"]}
            ov_n = {**ov, "store": store}
            if shared_ray:
                ov_n["runtime"] = {**ov_n.get("runtime", {}), "namespace": f"srmoa-scale-{n}"}
            row = SizeRun(n, work_dir, ov_n, model=model, requests=requests, burst=burst,
                          max_tokens=max_tokens, say=say).run()
            doc["sizes"].append(row)
            out.write_text(json.dumps(doc, indent=2))                     # partial results survive
            if not keep_stores:
                shutil.rmtree(work_dir / f"store-{n}", ignore_errors=True)
    finally:
        if started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    first, last = doc["sizes"][0], doc["sizes"][-1]
    ratio = last["routed_p50_ms"] / first["routed_p50_ms"] if first["routed_p50_ms"] else None
    rss = [r["model_server_rss_mb"] for r in doc["sizes"] if r.get("model_server_rss_mb")]
    doc["targets"] = {
        "routed_p50_ratio_largest_vs_smallest": ratio,
        "routed_p50_ratio_met": ratio is not None and ratio <= TARGET_LATENCY_RATIO,
        "keystore_restart_s_largest": last.get("keystore_restart_s"),
        "keystore_restart_met": (last.get("keystore_restart_s") or 1e9) <= TARGET_RESTART_S,
        "model_server_rss_mb_range": [min(rss), max(rss)] if rss else None,
    }
    out.write_text(json.dumps(doc, indent=2))
    return doc


__all__ = ["run_scale_serve_bench", "rss_mb"]
