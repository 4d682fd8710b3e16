"""`srmoa bench cluster`: a worker node killed under chat load on a 3-node Ray cluster of this machine.

A `LocalCluster` (runtime/local_cluster.py): the head holds the key store, the trainer and the HTTP
ingress; each of the two workers holds half of the shard actors (their LMDB under the node's data
directory, mounted at the store path) and one ModelServer replica. The app attaches with the cluster's
address, as `RAY_ADDRESS=... srmoa serve` does. Read `ClusterRun.run` top down:

1. up: the nodes, the shard mounts, the app (one replica per worker);
2. plant: one expert per chat prompt (key = that prompt's own routing query, random small-B weights),
   spread over every shard; the committed bytes of each expert are kept (sha256);
3. load: `chat_workers` clients send the prompts back to back (503 / dropped connection retried, as
   an OpenAI client does); every reply is classed answered (routed normally), degraded (2xx with
   `routing.degraded`: its expert's shard did not answer) or failed (no 2xx after the retries);
4. kill: every process of one worker (raylet, agents, shard actors, the replica), `kill_node`;
5. outage: the load goes on for `outage_s`; then the node is started again on its data directory;
6. recovery: until every shard actor answers from the restarted node, the replicas are all running
   again and a request for each expert of the lost shards comes back routed and not degraded;
   `recovery_s` is from the kill to then;
7. verify: every planted expert read back through the shard actors, then (the cluster down) from the
   LMDB files themselves; `lost_experts` counts those missing or not byte-identical.

The shard actors' replica cache is off by default (`cache_experts` 0: a store much larger than the
cache, every routed request reads its shard), else cached experts hide the outage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from srmoa_dist.bench.chaos import Replies, request
from srmoa_dist.bench.model_cache import link_shared_model_cache
from srmoa_dist.config import SrmoaConfig
from srmoa_dist.runtime.local_cluster import ClusterSpec, LocalCluster, session_pids

log = logging.getLogger(__name__)

TOPICS = ("volcanoes", "penguins", "the violin", "tea", "glaciers", "chess", "honey bees", "the moon",
          "bicycles", "saffron", "lighthouses", "octopuses", "paper", "thunder", "coral reefs", "the abacus",
          "camels", "jazz", "silk", "comets", "maple syrup", "origami", "owls", "the printing press",
          "deserts", "kites", "salt", "whales", "clocks", "bamboo", "fireflies", "the compass")
PROMPT = "Tell me one short fact about {topic}."
PLANT_ROUNDS = 8
RECOVERY_TIMEOUT_S = 240.0
ACTOR_TITLES = {"shard": "ray::ShardActor", "keystore": "ray::KeyStoreActor", "trainer": "ray::TrainerActor",
                "replica": "ServeReplica:srmoa:ModelServer", "ingress": "ServeReplica:srmoa:Ingress"}


class ClusterRun:
    """One run: up, plant, load, kill a worker, restart it, recover, verify, down."""

    def __init__(self, cfg: SrmoaConfig, spec: ClusterSpec, *, warm_s: float = 10.0, outage_s: float = 20.0,
                 chat_workers: int = 2, max_tokens: int = 8, experts: int = 16, victim: int = 1,
                 say: Callable[[str], None] = print) -> None:
        if not 1 <= victim <= spec.workers:
            raise ValueError(f"victim must be a worker node in 1..{spec.workers}, got {victim}")
        if experts < spec.shards:
            raise ValueError(f"experts must be >= shards ({spec.shards}) so every shard holds one, "
                             f"got {experts}")
        for name, v in (("warm_s", warm_s), ("outage_s", outage_s)):
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.cfg, self.spec, self.say = cfg, spec, say
        self.warm_s, self.outage_s = float(warm_s), float(outage_s)
        self.chat_workers, self.max_tokens = chat_workers, max_tokens
        self.n_experts, self.victim = experts, victim
        self.cluster = LocalCluster(spec)
        self.stop = threading.Event()
        self.replies = Replies(time.monotonic())
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.app: Any = None
        self.planted: dict[int, dict[str, Any]] = {}      # expert id -> prompt, shard, sha256
        self.t: dict[str, float] = {}
        self.before_kill: dict[str, Any] = {}
        self.placement_end: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        try:
            self._up()
            self._plant()
            threads = self._start_load()
            self._phase("steady load", self.warm_s)
            self._kill()
            self._phase("outage", self.outage_s)
            self._restart()
            self._wait_recovered()
            self._phase("after recovery", min(5.0, self.warm_s))
            self.stop.set()
            for t in threads:
                t.join(timeout=120)
            read_back = self._read_back_live()
        finally:
            self._down()
        on_disk = self._read_back_disk()
        return self._report(read_back, on_disk)

    # -- 1. up ------------------------------------------------------------------------------------------

    def _up(self) -> None:
        from srmoa_dist.serve import local

        self.say(f"starting a head and {self.spec.workers} workers under {self.spec.root} ...")
        self.cluster.up()
        self.mounts = self.cluster.mount_shards(self.cfg.data_dir)
        rt = dataclasses.replace(self.cfg.runtime, ray_address=self.cluster.address(),
                                 replica_resource="srmoa_replica", ingress_resource="srmoa_ingress")
        store = dataclasses.replace(self.cfg.store, n_shards=self.spec.shards)
        self.cfg = self.cfg.replace(runtime=rt, store=store)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.say(f"attaching the app at {rt.ray_address} (one ModelServer replica per worker) ...")
        self.app = local.start(self.cfg, host="127.0.0.1", port=0, num_replicas=self.spec.workers,
                               say=self.say)
        self.model_id = httpx.get(f"{self.app.url}/v1/models", timeout=60).json()["data"][0]["id"]

    # -- 2. plant ---------------------------------------------------------------------------------------

    def _plant(self) -> None:
        import ray

        from srmoa_dist.experts.expert import LoRAExpert
        from srmoa_dist.model.fusion import ExpertFusion
        from srmoa_dist.model.generation import queries
        from srmoa_dist.model.loading import load_base_model
        from srmoa_dist.runtime.store_init import ensure_encoder

        cfg, rt = self.cfg, self.app.runtime
        self.say(f"planting {self.n_experts} experts, one per prompt (more until every shard has one) ...")
        base = load_base_model(cfg.model, cfg.model_cache_dir)
        enc = ensure_encoder(cfg, base, rt.keystore)
        shapes = ExpertFusion(base.model, cfg.expert, cfg.model.query_layer).target_shapes()
        e, client = cfg.expert, rt.client()
        missing: list[int] = list(range(self.spec.shards))
        for r in range(PLANT_ROUNDS):
            start = len(self.planted)
            prompts = [_prompt(start + j) for j in range(self.n_experts if r == 0 else len(missing))]
            q = queries(base, enc, [[{"role": "user", "content": p}] for p in prompts])   # (M, d_key)
            ids = [int(i) for i in ray.get(rt.keystore.add.remote(q, True)).tolist()]
            client.put_many({eid: LoRAExpert.random(shapes, e.rank, e.alpha, e.dtype, seed=eid, b_std=1e-3)
                             for eid in ids})
            raws = client.get_raw_many(ids)
            for eid, p, raw, s in zip(ids, prompts, raws, client.shard_of(ids).tolist()):
                self.planted[eid] = {"prompt": p, "shard": int(s), "node": self.spec.node_of_shard(int(s)),
                                     "sha256": hashlib.sha256(raw).hexdigest(), "nbytes": len(raw)}
            by_shard = Counter(v["shard"] for v in self.planted.values())
            missing = [s for s in range(self.spec.shards) if not by_shard[s]]
            if not missing:
                break
        del base
        if missing:
            raise RuntimeError(f"no planted expert on shard(s) {missing} after {PLANT_ROUNDS} rounds")

    # -- 3. load ----------------------------------------------------------------------------------------

    def _start_load(self) -> list[threading.Thread]:
        self.replies = Replies(time.monotonic())
        threads = [threading.Thread(target=self._chat_load, args=(w,), daemon=True)
                   for w in range(self.chat_workers)]
        for t in threads:
            t.start()
        return threads

    def _chat_load(self, worker: int) -> None:
        items = list(self.planted.items())
        i = worker
        with httpx.Client(base_url=self.app.url, timeout=120) as c:
            while not self.stop.is_set():
                eid, p = items[i % len(items)]
                t0 = time.monotonic()
                r, attempts = request(c, self.replies, "POST", "/v1/chat/completions",
                                      json=self._body(p["prompt"]))
                used = _routed(r, "expert_ids") + _routed(r, "skipped")
                rec = {"t": t0, "t_end": time.monotonic(), "expert": eid, "attempts": attempts,
                       "outcome": _classify(r), "routed": used,
                       "needs_lost": any(self._node_of(i) == self.victim for i in used)}
                with self._lock:
                    self.records.append(rec)
                i += self.chat_workers

    def _node_of(self, eid: int) -> int | None:
        p = self.planted.get(int(eid))
        return None if p is None else p["node"]

    def _body(self, prompt: str) -> dict[str, Any]:
        return {"model": self.model_id, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}

    def _phase(self, name: str, seconds: float) -> None:
        t_end = time.monotonic() + seconds
        with tqdm(total=int(seconds), unit="s", desc=name, disable=None, leave=False) as bar:
            while (now := time.monotonic()) < t_end:
                time.sleep(min(1.0, t_end - now))
                bar.n = min(bar.total, int(seconds - (t_end - time.monotonic())))
                bar.refresh()

    # -- 4-6. kill, restart, recover --------------------------------------------------------------------

    def _kill(self) -> None:
        self.before_kill = self._placement()
        self.t["kill"] = time.monotonic()
        n = self.cluster.kill_node(self.victim)
        self.say(f"killed node {self.victim}: {n} processes (its shards {self.spec.shards_of(self.victim)}, "
                 "its replica)")

    def _wait_node_dead(self) -> None:
        """Until the GCS declares the killed node dead (its health check), so that the restarted node
        is a new node whose address cannot answer for the old one."""
        import ray

        port = self.cluster.nodes[self.victim].ports["node_manager"]
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not any(n["Alive"] and int(n.get("NodeManagerPort", -1)) == port for n in ray.nodes()):
                self.t["node_dead"] = time.monotonic()
                dt = self.t["node_dead"] - self.t["kill"]
                self.say(f"the GCS declared node {self.victim} dead {dt:.1f} s after the kill")
                return
            time.sleep(0.25)
        raise RuntimeError(f"node {self.victim} still listed alive {RECOVERY_TIMEOUT_S:.0f} s after its kill")

    def _restart(self) -> None:
        self._wait_node_dead()
        self.t["restart"] = time.monotonic()
        st = self.cluster.start_node(self.victim)
        self.t["node_up"] = time.monotonic()
        self.say(f"node {self.victim} started again in {st.started_s:.1f} s on "
                 f"{self.spec.data_dir(self.victim)}")

    def _wait_recovered(self) -> None:
        """Until the lost shards answer from the restarted node, all replicas run again, and a request for
        each lost expert is routed and not degraded."""
        import ray

        rt = self.app.runtime
        lost = [eid for eid, p in self.planted.items() if p["node"] == self.victim]
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        with httpx.Client(base_url=self.app.url, timeout=60) as c:
            while time.monotonic() < deadline:
                try:
                    infos = ray.get([s.info.remote() for s in rt.shards], timeout=5)
                except Exception:
                    time.sleep(0.5)
                    continue
                node_pids = set(session_pids(self.cluster.nodes[self.victim].sid))
                mine = [inf for inf in infos if self.spec.node_of_shard(inf["index"]) == self.victim]
                if (all(inf["pid"] in node_pids for inf in mine)
                        and self._replicas_running() >= self.spec.workers
                        and all(self._routed_ok(c, eid) for eid in lost)):
                    self.t["recovered"] = time.monotonic()
                    self.say(f"recovered {self.t['recovered'] - self.t['kill']:.1f} s after the kill")
                    return
                time.sleep(0.5)
        self.say(f"NOT recovered within {RECOVERY_TIMEOUT_S:.0f} s")

    def _routed_ok(self, c: httpx.Client, eid: int) -> bool:
        body = self._body(self.planted[eid]["prompt"])
        r, _ = request(c, self.replies, "POST", "/v1/chat/completions", json=body)
        return _classify(r) == "answered" and eid in _routed(r, "expert_ids")

    def _replicas_running(self) -> int:
        from ray import serve

        try:
            app = serve.status().applications[self.app.name]
            states = app.deployments["ModelServer"].replica_states
            return int(sum(v for k, v in states.items() if getattr(k, "value", k) == "RUNNING"))
        except Exception:
            return 0

    def _placement(self) -> dict[str, Any]:
        """Which node runs what: the store actors and Serve replicas found among each node's processes."""
        out: dict[str, Any] = {}
        for n, st in sorted(self.cluster.nodes.items()):
            titles = [_title(pid) for pid in session_pids(st.sid)] if st.sid else []
            out[str(n)] = {kind: sum(t.startswith(pre) or pre in t for t in titles)
                           for kind, pre in ACTOR_TITLES.items()}
        return out

    # -- 7. verify --------------------------------------------------------------------------------------

    def _read_back_live(self) -> dict[int, str | None]:
        """sha256 of each planted expert as the shard actors return it now (None: missing or failed)."""
        client = self.app.runtime.client()
        raws = client.fetch_raw(list(self.planted))
        return {eid: (hashlib.sha256(b).hexdigest() if b is not None else None) for eid, b in raws.items()}

    def _read_back_disk(self) -> dict[int, str | None]:
        """The same from the LMDB files (through the mounts), with no process holding them."""
        from srmoa_dist.experts.store import ShardedExpertStore

        out: dict[int, str | None] = {}
        with ShardedExpertStore(self.cfg.shards_dir, self.cfg.store, readonly=True) as store:
            for eid in self.planted:
                try:
                    out[eid] = hashlib.sha256(store.get_raw_many([eid])[0]).hexdigest()
                except Exception:
                    out[eid] = None
        return out

    def _down(self) -> None:
        import ray

        from srmoa_dist.serve import local

        try:
            self.placement_end = self._placement()
            if self.app is not None:
                local.stop(self.app)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            self.cluster.down()

    # -- report -----------------------------------------------------------------------------------------

    def _report(self, live: dict[int, str | None], disk: dict[int, str | None]) -> dict[str, Any]:
        t0, kill = self.replies.t0, self.t["kill"]
        end = self.t.get("recovered", max([r["t_end"] for r in self.records], default=kill))
        during = [r for r in self.records if r["t_end"] >= kill and r["t"] <= end]
        lost_ids = sorted(eid for eid, p in self.planted.items()
                          if live.get(eid) != p["sha256"] or disk.get(eid) != p["sha256"])
        counts = Counter(r["outcome"] for r in during)
        lost_node = [r for r in during if r["needs_lost"]]
        doc: dict[str, Any] = {
            "benchmark": "cluster", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "model": self.cfg.model.name_or_path, "address": self.cluster.address(),
            "nodes": [{"index": n, "role": st.role, "resources": st.resources, "start_s": st.started_s,
                       "data_dir": str(self.spec.data_dir(n))}
                      for n, st in sorted(self.cluster.nodes.items())],
            "shards_by_node": {str(n): self.spec.shards_of(n) for n in range(self.spec.workers + 1)},
            "placement_before_kill": self.before_kill, "placement_end": self.placement_end,
            "experts": len(self.planted),
            "experts_by_node": dict(Counter(str(p["node"]) for p in self.planted.values())),
            "cache_experts": self.cfg.runtime.cache_experts, "chat_workers": self.chat_workers,
            "max_tokens": self.max_tokens, "warm_s": self.warm_s, "outage_s": self.outage_s,
            "killed_node": self.victim,
            "answered": counts.get("answered", 0), "degraded": counts.get("degraded", 0),
            "failed": counts.get("failed", 0),
            "outage_needing_lost_node": dict(Counter(r["outcome"] for r in lost_node)),
            "outage_other": dict(Counter(r["outcome"] for r in during if not r["needs_lost"])),
            "outage_retried": sum(r["attempts"] > 1 for r in during),
            "totals": dict(Counter(r["outcome"] for r in self.records)),
            "lost_experts": len(lost_ids), "lost_ids": lost_ids,
            "node_dead_after_s": self.t["node_dead"] - kill,
            "node_restart_s": self.t["node_up"] - self.t["restart"],
            "recovery_s": (self.t["recovered"] - kill) if "recovered" in self.t else None,
            "recovery_after_restart_s": (self.t["recovered"] - self.t["restart"]) if "recovered" in self.t
            else None,
            "timeline": [(r["t"] - t0, r["t_end"] - t0, r["outcome"], r["needs_lost"]) for r in self.records],
            "events": {k: v - t0 for k, v in self.t.items()},
        }
        doc["recovered"] = doc["recovery_s"] is not None
        return doc


def _classify(r: httpx.Response | None) -> str:
    if r is None or r.status_code >= 300:
        return "failed"
    try:
        routing = r.json().get("routing") or {}
    except ValueError:
        return "failed"
    return "degraded" if routing.get("degraded") else "answered"


def _prompt(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" (part {i // len(TOPICS) + 1})")
    return PROMPT.format(topic=topic)


def _routed(r: httpx.Response | None, field: str) -> list[int]:
    """The reply's routing.<field> ids (expert_ids: used; skipped: routed but unavailable)."""
    if r is None:
        return []
    try:
        return [int(i) for i in (r.json().get("routing") or {}).get(field, [])]
    except (ValueError, AttributeError):
        return []


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def run_cluster_bench(out: Path, *, cfg: SrmoaConfig | None = None, model: str | None = None,
                      workers: int = 2, shards: int = 4, base_port: int = 26000, warm_s: float = 10.0,
                      outage_s: float = 20.0, chat_workers: int = 2, max_tokens: int = 8, experts: int = 16,
                      cache_experts: int = 0, root: Path | None = None,
                      say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) in a fresh temp dir; write the JSON to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # short: Ray's unix sockets live under the node temp dirs (108-byte path limit)
    tmp = Path(tempfile.mkdtemp(prefix="srmoa-cb-")) if root is None else Path(root)
    cfg = cfg or SrmoaConfig()
    if model:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, name_or_path=model))
    data_dir = tmp / "store"
    cfg = cfg.replace(data_dir=str(data_dir),
                      keystore=dataclasses.replace(cfg.keystore, index="exact", device="cpu"),
                      runtime=dataclasses.replace(cfg.runtime, cache_experts=cache_experts))
    link_shared_model_cache(data_dir, cfg.model.name_or_path)
    spec = ClusterSpec(root=str(tmp / "c"), workers=workers, shards=shards, base_port=base_port)
    try:
        doc = ClusterRun(cfg, spec, warm_s=warm_s, outage_s=outage_s, chat_workers=chat_workers,
                         max_tokens=max_tokens, experts=experts, say=say).run()
    finally:
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    say(json.dumps({k: doc[k] for k in ("shards_by_node", "experts_by_node", "answered", "degraded", "failed",
                                        "outage_needing_lost_node", "outage_other", "lost_experts",
                                        "node_restart_s", "recovery_s")}, indent=1))
    return doc


__all__ = ["ClusterRun", "run_cluster_bench"]
