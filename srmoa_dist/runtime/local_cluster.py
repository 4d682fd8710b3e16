"""A multi-node Ray cluster on this one machine: a head and N worker nodes started with `ray start`.

Each node is its own `ray start` session (`setsid`): its own `--temp-dir` and a data directory that
stands in for the node's local disk, its own ports (`PortPlan`), and its own custom resources:

    head      srmoa_node_0, srmoa_keystore, srmoa_store, srmoa_ingress   (key store, trainer, HTTP ingress)
    worker w  srmoa_node_w, srmoa_replica, srmoa_shards: n, srmoa_shard_i for its shards i (i % N == w - 1)

so that `runtime.bootstrap.placement` pins shard actor i to the worker that holds it (and the key
store and trainer to the head), and ModelServer replicas asking for one `srmoa_replica` land one on
each worker. `mount_shards(data_dir)` links `data_dir/shards/shard-00i` to the owning node's data
directory (the stand-in for a node-local volume mounted at the store path, as k8s/README.md does it).

Everything started is stopped by process id: each node's session id is recorded in `root/cluster.json`,
and `kill_node` / `down` SIGKILL every process of that session (raylet, agents, workers; Ray's worker
processes make their own process groups, but keep the session). `ray stop` is never used: it would
stop every other Ray cluster of the machine too. Node death is detected by the GCS health check,
shortened here (`HEALTH_CHECK`) from Ray's ~30 s default.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
                "RAY_health_check_failure_threshold": "5", "RAY_health_check_initial_delay_ms": "1000"}
DEAD_AFTER_S = 10.0      # > period * threshold + timeout of HEALTH_CHECK
NODE_PORTS = ("node_manager", "object_manager", "dashboard_agent_listen", "dashboard_agent_grpc",
              "metrics_export", "runtime_env_agent", "ray_client_server", "dashboard")


@dataclass(frozen=True)
class ClusterSpec:
    """What `up` starts. Ports: the GCS at base_port, node n's ports from base_port + 10 + 10 n, its
    worker ports from base_port + 100 + 100 n (keep base_port + 100 (workers + 2) below 32768, the
    kernel's ephemeral range, and away from other clusters on the machine)."""

    root: str                       # state dir: cluster.json, node-<n>/{ray,data}, logs
    workers: int = 2
    shards: int = 4                 # store.n_shards of the store this cluster will hold
    base_port: int = 26000
    head_cpus: int = 1              # `ray start --num-cpus` takes an integer
    worker_cpus: int = 1
    object_store_mb: int = 100      # per node (Ray's minimum is 78)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.shards < self.workers:
            raise ValueError(f"shards must be >= workers ({self.workers}) so every worker holds one, "
                             f"got {self.shards}")
        top = self.base_port + 100 * (self.workers + 2)
        if not 1024 < self.base_port or top >= 32768:
            raise ValueError(f"base_port must leave 1025..32767 for the cluster's ports "
                             f"(base_port + {100 * (self.workers + 2)}), got {self.base_port}")
        if self.object_store_mb < 78:
            raise ValueError(f"object_store_mb must be >= 78 (Ray's minimum), got {self.object_store_mb}")
        for name in ("head_cpus", "worker_cpus"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer (ray start --num-cpus), got {v!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.base_port}"

    def shards_of(self, node: int) -> list[int]:
        """Shard indices held by worker `node` (1..workers); none on the head (0)."""
        return [i for i in range(self.shards) if node > 0 and i % self.workers == node - 1]

    def node_of_shard(self, shard: int) -> int:
        return shard % self.workers + 1

    def resources(self, node: int) -> dict[str, float]:
        if node == 0:
            # srmoa_store: the trainer takes 1, store-side tasks (the layout check) 1 each, as in k8s
            return {"srmoa_node_0": 1, "srmoa_keystore": 1, "srmoa_store": 100, "srmoa_ingress": 1}
        mine = self.shards_of(node)
        return {f"srmoa_node_{node}": 1, "srmoa_replica": 1, "srmoa_shards": len(mine),
                **{f"srmoa_shard_{i}": 1 for i in mine}}

    def ports(self, node: int) -> dict[str, int]:
        first = self.base_port + 10 + 10 * node
        out = {name: first + j for j, name in enumerate(NODE_PORTS)}
        out["min_worker"] = self.base_port + 100 + 100 * node
        out["max_worker"] = out["min_worker"] + 99
        return out

    def node_dir(self, node: int) -> Path:
        return Path(self.root) / f"node-{node}"

    def data_dir(self, node: int) -> Path:
        """The stand-in for node `node`'s local disk."""
        return self.node_dir(node) / "data"


@dataclass
class NodeState:
    index: int
    role: str                       # head | worker
    sid: int | None = None          # session id of the node's processes (its `ray start` pid)
    resources: dict[str, float] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    started_s: float | None = None  # seconds `ray start` took


class LocalCluster:
    """Start, stop, kill and restart the nodes of one `ClusterSpec`; state in `root/cluster.json`."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.root = Path(spec.root)
        self.nodes: dict[int, NodeState] = {}
        if (self.root / STATE_FILE).exists():
            self._load()

    @classmethod
    def open(cls, root: str | os.PathLike) -> LocalCluster:
        """The cluster whose state is under `root` (ValueError when there is none)."""
        path = Path(root) / STATE_FILE
        if not path.exists():
            raise ValueError(f"no local cluster state at {path}: run `srmoa cluster up --root {root}` first")
        doc = json.loads(path.read_text())
        return cls(ClusterSpec(**doc["spec"]))

    # -- lifecycle --------------------------------------------------------------------------------------

    def up(self) -> dict[str, Any]:
        """Start the head, then every worker (each waits until `ray start` reports it up)."""
        if any(self.alive(n) for n in self.nodes):
            raise RuntimeError(f"the cluster under {self.root} is already running; `down` it first")
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = {}
        for n in range(self.spec.workers + 1):
            self.start_node(n)
        return self.describe()

    def down(self) -> None:
        """Kill every node, workers first, by the session ids recorded at start."""
        for n in sorted(self.nodes, reverse=True):
            self.kill_node(n)
        self._save()

    def start_node(self, n: int) -> NodeState:
        if not 0 <= n <= self.spec.workers:
            raise ValueError(f"node must be in 0..{self.spec.workers}, got {n}")
        if n in self.nodes and self.alive(n):
            raise RuntimeError(f"node {n} is already running (session {self.nodes[n].sid})")
        s = self.spec
        state = NodeState(index=n, role="head" if n == 0 else "worker", resources=s.resources(n),
                          ports=s.ports(n))
        s.data_dir(n).mkdir(parents=True, exist_ok=True)
        tmp = s.node_dir(n) / "ray"
        tmp.mkdir(parents=True, exist_ok=True)
        p = state.ports
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--disable-usage-stats",
               "--num-cpus", str(s.head_cpus if n == 0 else s.worker_cpus),
               "--object-store-memory", str(s.object_store_mb * 2**20),
               "--temp-dir", str(tmp), "--resources", json.dumps(state.resources),
               "--node-manager-port", str(p["node_manager"]),
               "--object-manager-port", str(p["object_manager"]),
               "--dashboard-agent-listen-port", str(p["dashboard_agent_listen"]),
               "--dashboard-agent-grpc-port", str(p["dashboard_agent_grpc"]),
               "--metrics-export-port", str(p["metrics_export"]),
               "--runtime-env-agent-port", str(p["runtime_env_agent"]),
               "--min-worker-port", str(p["min_worker"]), "--max-worker-port", str(p["max_worker"])]
        if n == 0:
            cmd += ["--head", "--port", str(s.base_port), "--include-dashboard=false",
                    "--dashboard-port", str(p["dashboard"]),
                    "--ray-client-server-port", str(p["ray_client_server"])]
        else:
            cmd += ["--address", self.address()]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               "SRMOA_NODE": str(n), "SRMOA_NODE_DATA_DIR": str(s.data_dir(n)), **HEALTH_CHECK}
        env.pop("RAY_ADDRESS", None)
        logf = s.node_dir(n) / "ray-start.log"
        t0 = time.monotonic()
        with open(logf, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=str(s.node_dir(n)))
            state.sid = proc.pid
            self.nodes[n] = state
            self._save()
            rc = proc.wait(timeout=180)
        state.started_s = time.monotonic() - t0
        self._save()
        if rc != 0:
            tail = logf.read_text(errors="replace")[-3000:]
            self.kill_node(n)
            raise RuntimeError(f"`ray start` of node {n} failed (exit {rc}); its log {logf} ends:\n{tail}")
        log.info("node %d (%s) up in %.1f s, session %d", n, state.role, state.started_s, state.sid)
        return state

    def kill_node(self, n: int) -> int:
        """SIGKILL every process of node n's session (raylet, agents, workers); how many were killed."""
        state = self.nodes.get(n)
        if state is None or state.sid is None:
            return 0
        killed = 0
        for _ in range(20):                  # processes forked while we kill are caught next round
            pids = session_pids(state.sid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        log.info("node %d: killed %d process(es) of session %d", n, killed, state.sid)
        return killed

    def restart_node(self, n: int) -> NodeState:
        """Kill node n if it still runs, then start it again on the same data directory. A node that
        was running is given `DEAD_AFTER_S` first: the GCS must declare the old node dead before a
        new one answers its health check on the same address."""
        if self.kill_node(n):
            time.sleep(DEAD_AFTER_S)
        return self.start_node(n)

    # -- state ------------------------------------------------------------------------------------------

    def address(self) -> str:
        """The GCS address of the head, as Ray advertises it (the machine's interface address)."""
        ip = _head_ip(self.spec.node_dir(0) / "ray")
        return f"{ip or self.spec.host}:{self.spec.base_port}"

    def alive(self, n: int) -> bool:
        st = self.nodes.get(n)
        return st is not None and st.sid is not None and bool(session_pids(st.sid))

    def describe(self) -> dict[str, Any]:
        return {"address": self.address(), "root": str(self.root),
                "nodes": [{**asdict(st), "alive": self.alive(n), "data_dir": str(self.spec.data_dir(n)),
                           "shards": self.spec.shards_of(n)} for n, st in sorted(self.nodes.items())]}

    def mount_shards(self, data_dir: str | os.PathLike) -> dict[int, str]:
        """Link data_dir/shards/shard-00i to its worker's data directory; shard -> target. A shard dir
        that is already a real directory (a store made without this cluster) is refused."""
        shards = Path(data_dir) / "shards"
        shards.mkdir(parents=True, exist_ok=True)
        out: dict[int, str] = {}
        for i in range(self.spec.shards):
            target = self.spec.data_dir(self.spec.node_of_shard(i)) / "shards" / f"shard-{i:03d}"
            target.mkdir(parents=True, exist_ok=True)        # a dangling link would fail the shard's mkdir
            link = shards / f"shard-{i:03d}"
            if link.is_symlink():
                if Path(os.readlink(link)) != target:
                    raise ValueError(f"{link} points at {os.readlink(link)}, not at node "
                                     f"{self.spec.node_of_shard(i)}'s {target}")
            elif link.exists():
                raise ValueError(f"{link} is a directory of its own: mount_shards needs a store whose "
                                 "shards live on the cluster's nodes (start from an empty data_dir)")
            else:
                link.symlink_to(target, target_is_directory=True)
            out[i] = str(target)
        return out

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {"spec": asdict(self.spec), "nodes": {str(n): asdict(st) for n, st in self.nodes.items()}}
        tmp = self.root / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.root / STATE_FILE)

    def _load(self) -> None:
        doc = json.loads((self.root / STATE_FILE).read_text())
        self.nodes = {int(n): NodeState(**st) for n, st in doc.get("nodes", {}).items()}


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is `sid`, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == sid:   # state, ppid, pgrp, session
            out.append(int(d.name))
    return out


def _head_ip(temp_dir: Path) -> str | None:
    """The node IP the head advertises (Ray binds the machine's interface, whatever the host says)."""
    f = temp_dir / "ray_current_cluster"
    try:
        return f.read_text().strip().rsplit(":", 1)[0] or None
    except OSError:
        return None


def remove(root: str | os.PathLike) -> None:
    """Delete a stopped cluster's state and node directories."""
    cluster = LocalCluster.open(root)
    if any(cluster.alive(n) for n in cluster.nodes):
        raise RuntimeError(f"the cluster under {root} still runs; `down` it first")
    shutil.rmtree(root, ignore_errors=True)


__all__ = ["ClusterSpec", "LocalCluster", "NodeState", "session_pids", "remove", "HEALTH_CHECK", "STATE_FILE"]
