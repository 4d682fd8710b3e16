"""`srmoa bench chaos`: kill -9 under load, then every edit invariant checked against the files on disk.

One local Ray cluster and the app on a fresh store (as `srmoa serve` starts it). For `minutes`:

- steady chat load: `chat_workers` clients, each sending short chats back to back; a 503 (Retry-After)
  or a dropped connection is retried (up to `RETRIES` times), as an OpenAI client does;
- a stream of feedback edits: one fact at a time through `POST /v1/feedback`, polled until done;
- every `kill_interval_s` (a uniform draw) a `kill -9` of one component, the kinds taken in turn in a
  shuffled order so every kind is hit (a run too short for one kill of each goes on until each was
  killed once): a shard actor, the key-store actor, the trainer actor, or the
  ModelServer replica's process. Its PID comes from the component itself (`ShardActor.info`,
  `KeyStoreActor.info`, `TrainerActor.stats`, the replica's pid in `GET /readyz`); its recovery time
  is from the kill until it answers from a new process and `/readyz` is 200 again (for the trainer:
  also its start-up edit recovery done). The next kill waits for the recovery.

Then the load stops, the edit in flight finishes, the trainer settles, the cluster is shut down, and the
files are opened directly: the LMDB shards (every record's crc), the key store (snapshot + WAL) and the
edit ledger, checked by `ttt.recovery.audit`: each edit the ledger calls committed or verified has its
expert at that version and its key, pinned; no pinned slot without such an edit; nothing in flight.

The JSON: `kills` (count), `kill_events`, `lost_experts`, `lost_keys`, `corrupt_experts`,
`orphaned_slots`, `in_flight`, `replies` (chat requests by outcome: 2xx at once, retried then 2xx,
4xx, 5xx, no_reply), `non_json_replies` (over every HTTP reply, chats, feedback and polls),
`recovery_s_p50` / `recovery_s_p99`, the edits' outcomes and `meets_targets`; a timeline PNG beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from srmoa_dist.bench.entity_facts import make_entity_facts
from srmoa_dist.bench.model_cache import link_shared_model_cache
from srmoa_dist.bench.ttt_bench import bench_store_config
from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

TARGETS = {"lost_experts": 0, "lost_keys": 0, "orphaned_slots": 0, "non_json_replies": 0,
           "recovery_s_p99": 30.0}
KINDS = ("shard", "keystore", "trainer", "replica")
RETRIES = 8
RECOVERY_TIMEOUT_S = 180.0
MAX_OVERRUN_S = 300.0       # how long past `minutes` a short run may go on to hit every kind once
CHAT = "Tell me one short fact about the number {i}."


class Replies:
    """Every HTTP reply of the run (thread-safe): chat outcomes, the timeline, non-JSON bodies."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self._lock = threading.Lock()
        self.chat: Counter[str] = Counter()
        self.other: Counter[str] = Counter()
        self.non_json = 0
        self.non_json_examples: list[str] = []
        self.timeline: list[tuple[float, float, str]] = []      # chat (start, end, outcome), run seconds

    def saw(self, r: httpx.Response) -> None:
        """One reply: is its body JSON (an SSE stream is never asked for here)?"""
        try:
            r.json()
        except ValueError:
            with self._lock:
                self.non_json += 1
                if len(self.non_json_examples) < 5:
                    self.non_json_examples.append(f"{r.request.method} {r.request.url.path} -> "
                                                  f"{r.status_code}: {r.text[:200]!r}")

    def chat_done(self, start: float, outcome: str) -> None:
        with self._lock:
            self.chat[outcome] += 1
            self.timeline.append((start - self.t0, time.monotonic() - self.t0, outcome))

    def other_done(self, outcome: str) -> None:
        with self._lock:
            self.other[outcome] += 1


def _outcome(status: int | None, attempts: int) -> str:
    if status is None:
        return "no_reply"
    if status < 300:
        return "2xx" if attempts == 1 else "retried"
    return "4xx" if status < 500 else "5xx"


def request(c: httpx.Client, replies: Replies, method: str, path: str,
            **kw: Any) -> tuple[httpx.Response | None, int]:
    """One request, retried on 503 / 429 (after Retry-After, at most 2 s) and on a dropped connection;
    (the last reply or None, attempts). Every reply is checked for a JSON body."""
    r: httpx.Response | None = None
    for attempt in range(1, RETRIES + 1):
        try:
            r = c.request(method, path, **kw)
        except httpx.HTTPError:
            r = None
            time.sleep(1.0)
            continue
        replies.saw(r)
        if r.status_code not in (429, 503):
            return r, attempt
        time.sleep(min(2.0, float(r.headers.get("retry-after") or 1)))
    return r, RETRIES


class ChaosRun:
    """One run: start, load + edits + kills, drain, shut down, check the files. Read `run` top down."""

    def __init__(self, cfg: SrmoaConfig, minutes: float, *, kill_interval_s: tuple[float, float] = (10, 30),
                 chat_workers: int = 2, max_tokens: int = 8, seed: int = 0,
                 say: Callable[[str], None] = print) -> None:
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        lo, hi = kill_interval_s
        if not 0 < lo <= hi:
            raise ValueError(f"kill_interval_s must be 0 < min <= max, got {kill_interval_s}")
        self.cfg, self.minutes, self.kill_interval_s = cfg, float(minutes), (float(lo), float(hi))
        self.chat_workers, self.max_tokens, self.say = int(chat_workers), int(max_tokens), say
        self.rng = random.Random(seed)
        self.seed = seed
        self.stop = threading.Event()
        self.stop_edits = threading.Event()
        self.kills: list[dict[str, Any]] = []
        self.edits: list[dict[str, Any]] = []
        self.app: Any = None
        self.replies = Replies(time.monotonic())

    def run(self) -> dict[str, Any]:
        from srmoa_dist.serve import local

        self.app = local.start(self.cfg, host="127.0.0.1", port=0, say=self.say)
        self.replies = Replies(time.monotonic())
        try:
            self.model_id = httpx.get(f"{self.app.url}/v1/models", timeout=60).json()["data"][0]["id"]
            threads = [threading.Thread(target=self._chat_load, args=(w,), daemon=True)
                       for w in range(self.chat_workers)]
            threads.append(threading.Thread(target=self._edit_stream, daemon=True))
            for t in threads:
                t.start()
            self._kill_loop()
            self._drain(threads)
        finally:
            local.stop(self.app)
        disk = check_on_disk(self.cfg)
        return self._report(disk)

    # -- load ---------------------------------------------------------------------------------------------

    def _chat_load(self, worker: int) -> None:
        i = worker
        with httpx.Client(base_url=self.app.url, timeout=120) as c:
            while not self.stop.is_set():
                body = {"model": self.model_id, "max_tokens": self.max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": CHAT.format(i=i)}]}
                t = time.monotonic()
                r, attempts = request(c, self.replies, "POST", "/v1/chat/completions", json=body)
                self.replies.chat_done(t, _outcome(None if r is None else r.status_code, attempts))
                i += self.chat_workers

    def _edit_stream(self) -> None:
        facts = [f for e in make_entity_facts(200, 2, self.seed) for f in e.facts]
        with httpx.Client(base_url=self.app.url, timeout=120) as c:
            for f in facts:
                if self.stop_edits.is_set():
                    return
                t = time.monotonic()
                r, attempts = request(c, self.replies, "POST", "/v1/feedback",
                                      json={"prompt": f.question, "correct_answer": f.answer})
                self.replies.other_done(_outcome(None if r is None else r.status_code, attempts))
                if r is None or r.status_code != 202:
                    self.edits.append({"t": t - self.replies.t0, "job": "not_accepted",
                                       "status_code": None if r is None else r.status_code})
                    continue
                job = self._wait_job(c, r.json()["job_id"])
                res = job.get("result") or {}
                self.edits.append({"t": t - self.replies.t0, "seconds": time.monotonic() - t,
                                   "job": job.get("status"), "edit": res.get("status"),
                                   "expert_id": res.get("expert_id"), "error": job.get("error")})

    def _wait_job(self, c: httpx.Client, job_id: str, timeout_s: float = 900.0) -> dict[str, Any]:
        t0 = time.monotonic()
        job: dict[str, Any] = {"status": "unknown"}
        while time.monotonic() - t0 < timeout_s:
            r, attempts = request(c, self.replies, "GET", f"/v1/feedback/{job_id}")
            self.replies.other_done(_outcome(None if r is None else r.status_code, attempts))
            if r is not None and r.status_code == 200:
                job = r.json()
                if job["status"] not in ("pending", "running"):
                    return job
            time.sleep(0.5)
        return job

    # -- kills --------------------------------------------------------------------------------------------

    def _kill_loop(self) -> None:
        t_end = self.replies.t0 + self.minutes * 60
        order: list[str] = []
        first_cycle = set(KINDS)     # a short run overruns `minutes` until every kind was hit once
        bar = tqdm(total=int(self.minutes * 60), unit="s", desc="chaos", disable=None)
        try:
            while True:
                wait = self.rng.uniform(*self.kill_interval_s)
                over = time.monotonic() + wait >= t_end
                if over and (not first_cycle or time.monotonic() > t_end + MAX_OVERRUN_S):
                    self._sleep_until(t_end, bar)
                    return
                self._sleep_until(time.monotonic() + wait, bar)
                if not order:
                    order = list(KINDS)
                    self.rng.shuffle(order)
                kind = order.pop()
                if self._kill_and_recover(kind):
                    first_cycle.discard(kind)
                bar.set_postfix(kills=len(self.kills))
        finally:
            bar.close()

    def _sleep_until(self, t: float, bar: Any) -> None:
        while (now := time.monotonic()) < t:
            time.sleep(min(1.0, t - now))
            bar.n = min(bar.total, int(time.monotonic() - self.replies.t0))
            bar.refresh()

    def _kill_and_recover(self, kind: str) -> bool:
        """Kill one `kind` and wait for its recovery; False when there was nothing to kill."""
        victim = self._victim(kind)
        if victim is None:
            self.say(f"no {kind} to kill (it did not answer); skipped")
            return False
        name, pid, alive = victim
        t = time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.say(f"{name} (pid {pid}) was already gone; skipped")
            return False
        rec: dict[str, Any] = {"t": t - self.replies.t0, "kind": kind, "target": name, "pid": pid}
        while time.monotonic() - t < RECOVERY_TIMEOUT_S:
            new = alive()
            if new is not None and new != pid and self._ready():
                rec.update(new_pid=new, recovery_s=time.monotonic() - t)
                break
            time.sleep(0.25)
        else:
            rec.update(new_pid=None, recovery_s=None)
        self.kills.append(rec)
        got = f"back in {rec['recovery_s']:.1f} s" if rec["recovery_s"] is not None else "NOT back"
        self.say(f"kill -9 {name} (pid {pid}) at {rec['t']:.0f} s: {got}")
        return True

    def _victim(self, kind: str) -> tuple[str, int, Callable[[], int | None]] | None:
        """(name, pid now, a function giving the pid of the live process or None)."""
        import ray

        rt = self.app.runtime

        def actor_pid(ref_fn: Callable[[], Any], needs_recovery: bool = False) -> Callable[[], int | None]:
            def pid() -> int | None:
                try:
                    info = ray.get(ref_fn(), timeout=5)
                except Exception:
                    return None
                if needs_recovery and not info.get("recovered", True):
                    return None
                return int(info["pid"])
            return pid

        if kind == "shard":
            i = self.rng.randrange(len(rt.shards))
            h = rt.shards[i]
            name, alive = f"shard-{i}", actor_pid(lambda: h.info.remote())
        elif kind == "keystore":
            name, alive = "keystore", actor_pid(lambda: rt.keystore.info.remote())
        elif kind == "trainer":
            name, alive = "trainer", actor_pid(lambda: rt.trainer.stats.remote(), needs_recovery=True)
        else:
            name, alive = "ModelServer replica", self._replica_pid
        pid = alive()
        return None if pid is None else (name, pid, alive)

    def _replica_pid(self) -> int | None:
        try:
            r = httpx.get(f"{self.app.url}/readyz", timeout=10)
            return int(r.json()["checks"]["model"]["pid"]) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.app.url}/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    # -- end ----------------------------------------------------------------------------------------------

    def _drain(self, threads: list[threading.Thread]) -> None:
        """Stop the load, let the edit in flight finish, wait until the trainer is idle and recovered."""
        import ray

        self.say("stopping the load; waiting for the edit in flight and the trainer to settle ...")
        self.stop.set()
        self.stop_edits.set()
        for t in threads:
            t.join(timeout=900)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                st = ray.get(self.app.runtime.trainer.stats.remote(), timeout=10)
                if st.get("recovered", True) and not st.get("running") and not st.get("queued"):
                    return
            except Exception:
                pass
            time.sleep(1.0)
        self.say("the trainer did not settle in 300 s; checking the files as they are")

    def _report(self, disk: dict[str, Any]) -> dict[str, Any]:
        rec = [k["recovery_s"] for k in self.kills if k["recovery_s"] is not None]
        pct = lambda q: float(np.percentile(rec, q)) if rec else None  # noqa: E731
        doc: dict[str, Any] = {
            "benchmark": "chaos", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "model": self.cfg.model.name_or_path, "minutes": self.minutes,
            "kill_interval_s": list(self.kill_interval_s), "chat_workers": self.chat_workers,
            "kills": len(self.kills), "kills_by_kind": dict(Counter(k["kind"] for k in self.kills)),
            "not_recovered": sum(k["recovery_s"] is None for k in self.kills),
            "recovery_s_p50": pct(50), "recovery_s_p99": pct(99),
            "recovery_s_max": max(rec) if rec else None,
            "replies": {k: int(self.replies.chat.get(k, 0))
                        for k in ("2xx", "retried", "4xx", "5xx", "no_reply")},
            "other_replies": dict(self.replies.other),
            "non_json_replies": self.replies.non_json, "non_json_examples": self.replies.non_json_examples,
            "edits": {"posted": len(self.edits),
                      **Counter(str(e.get("edit") or e["job"]) for e in self.edits)},
            **{k: disk[k] for k in ("lost_experts", "lost_keys", "corrupt_experts", "orphaned_slots",
                                    "in_flight")},
            "disk": disk, "kill_events": self.kills, "edit_events": self.edits,
            "timeline": self.replies.timeline, "targets": TARGETS,
        }
        doc["meets_targets"] = bool(
            doc["lost_experts"] == doc["lost_keys"] == doc["orphaned_slots"] == doc["corrupt_experts"] == 0
            and doc["non_json_replies"] == 0 and doc["replies"]["no_reply"] == 0 and doc["not_recovered"] == 0
            and (doc["recovery_s_p99"] or 0.0) < TARGETS["recovery_s_p99"])
        return doc


def check_on_disk(cfg: SrmoaConfig) -> dict[str, Any]:
    """The edit invariants on the files of a store no process has open: every record's crc, then
    `ttt.recovery.audit` over the shards, the key store (snapshot + WAL) and the ledger."""
    from srmoa_dist.experts.shard import CorruptExpertError
    from srmoa_dist.experts.store import ShardedExpertStore
    from srmoa_dist.routing.keystore import KeyStore
    from srmoa_dist.ttt.ledger import LIVE, EditLedger
    from srmoa_dist.ttt.recovery import audit

    ledger = EditLedger(cfg.ledger_dir)
    live = {r.expert_id for r in ledger.list(LIVE)}
    corrupt: list[int] = []
    with ShardedExpertStore(cfg.shards_dir, cfg.store, readonly=True) as store:
        n_experts = len(store)
        for shard in store.shards:
            for i in shard.ids():
                try:
                    shard.get_raw_many([i], verify=True)
                except CorruptExpertError:
                    corrupt.append(int(i))
        with KeyStore.open(cfg.keystore_dir, cfg.keystore, cfg.gravity) as ks:
            a = audit(store, ks, ledger)
            n_keys = len(ks)
    return {"experts": n_experts, "keys": n_keys, "ledger_entries": len(ledger),
            "ledger_statuses": dict(Counter(r.status for r in ledger.list())),
            "live_edits": len(live), "corrupt_experts": len(corrupt), "corrupt_ids": corrupt,
            "corrupt_live": sorted(set(corrupt) & live),
            "lost_experts": len(a.lost_experts), "lost_keys": len(a.lost_keys),
            "orphaned_slots": len(a.orphaned_slots), "in_flight": len(a.in_flight), "audit": a.to_json()}


def plot_timeline(doc: dict[str, Any], path: Path) -> None:
    """Chat requests over time (by outcome and latency), the kills and their recovery windows, edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"2xx": "tab:green", "retried": "tab:orange", "4xx": "tab:purple", "5xx": "tab:red",
               "no_reply": "black"}
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for kind, colour in colours.items():
        pts = [(s, e - s) for s, e, k in doc["timeline"] if k == kind]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=6, c=colour, label=f"chat {kind} ({len(pts)})")
    for k in doc["kill_events"]:
        ax.axvline(k["t"], color="tab:red", lw=0.8, alpha=0.7)
        if k["recovery_s"] is not None:
            ax.axvspan(k["t"], k["t"] + k["recovery_s"], color="tab:red", alpha=0.08)
        ax.annotate(k["kind"], (k["t"], 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    va="top", ha="right")
    for e in doc["edit_events"]:
        ax.plot([e["t"]], [0], marker="^", color="tab:blue", ms=6, clip_on=False)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("chat latency (s)")
    ax.set_title(f"chaos: {doc['kills']} kills, recovery p50 {doc['recovery_s_p50'] or 0:.1f} s / "
                 f"p99 {doc['recovery_s_p99'] or 0:.1f} s; lost experts {doc['lost_experts']}, keys "
                 f"{doc['lost_keys']}, orphaned slots {doc['orphaned_slots']} (edits: blue triangles)")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_chaos_bench(out: Path, minutes: float, *, cfg: SrmoaConfig | None = None, model: str | None = None,
                    data_dir: Path | None = None, kill_interval_s: tuple[float, float] = (10, 30),
                    chat_workers: int = 2, seed: int = 0,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); write the JSON to `out` (and a PNG beside)."""
    out = Path(out)
    tmp, cfg = bench_store_config("chaos", out, data_dir, cfg)
    if model:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, name_or_path=model))
    link_shared_model_cache(cfg.data_dir, cfg.model.name_or_path)
    try:
        doc = ChaosRun(cfg, minutes, kill_interval_s=kill_interval_s, chat_workers=chat_workers, seed=seed,
                       say=say).run()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    plot_timeline(doc, out.with_suffix(".png"))
    say(json.dumps({k: doc[k] for k in ("kills", "kills_by_kind", "recovery_s_p50", "recovery_s_p99",
                                        "replies", "non_json_replies", "edits", "lost_experts", "lost_keys",
                                        "corrupt_experts", "orphaned_slots", "in_flight", "meets_targets")},
                    indent=1))
    return doc


__all__ = ["ChaosRun", "Replies", "check_on_disk", "plot_timeline", "run_chaos_bench", "TARGETS", "KINDS"]
