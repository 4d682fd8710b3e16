"""`srmoa cluster up|down|status|kill-node N|restart-node N` and `srmoa bench cluster|peer`.

The cluster commands drive `runtime.local_cluster` (several Ray nodes on this machine, each stopped by
its own process ids); `scripts/cluster.sh` is a thin wrapper over them. Registered on the `srmoa`
command by `cli.py`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

cluster_app = typer.Typer(help="A head and worker Ray nodes on this machine (stand-ins for a cluster).",
                          no_args_is_help=True)
DEFAULT_ROOT = Path("/tmp/srmoa-cluster")
ROOT_HELP = "State dir of the cluster: cluster.json, node-<n>/ (each node's Ray temp dir and data dir)."


def _say(msg: str) -> None:
    typer.echo(f"[srmoa] {msg}", err=True)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _open(root: Path):
    from srmoa_dist.runtime.local_cluster import LocalCluster

    try:
        return LocalCluster.open(root)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@cluster_app.command("up")
def up(root: Path = typer.Option(DEFAULT_ROOT, help=ROOT_HELP),
       workers: int = typer.Option(2, min=1, help="Worker nodes beside the head."),
       shards: int = typer.Option(4, min=1, help="store.n_shards of its store (spread over the workers)."),
       base_port: int = typer.Option(26000, help="GCS port; the nodes' ports follow it (see ClusterSpec)."),
       object_store_mb: int = typer.Option(100, help="Object store of each node (MB)."),
       verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Start the head and the workers; print the cluster (address, nodes, resources) as JSON."""
    from srmoa_dist.runtime.local_cluster import ClusterSpec, LocalCluster

    _logging(verbose)
    try:
        spec = ClusterSpec(root=str(root.resolve()), workers=workers, shards=shards, base_port=base_port,
                           object_store_mb=object_store_mb)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    doc = LocalCluster(spec).up()
    typer.echo(json.dumps(doc, indent=1))
    _say(f"attach with: RAY_ADDRESS={doc['address']} RAY_AUTH_MODE=disabled srmoa serve "
         f"--data-dir DATA (DATA/shards linked to the nodes by `srmoa cluster mount --data-dir DATA`)")


@cluster_app.command("down")
def down(root: Path = typer.Option(DEFAULT_ROOT, help=ROOT_HELP)) -> None:
    """Kill every node of the cluster by the process ids it started."""
    _open(root).down()
    _say("cluster stopped")


@cluster_app.command("status")
def status(root: Path = typer.Option(DEFAULT_ROOT, help=ROOT_HELP)) -> None:
    """The cluster's address and nodes (alive or not, resources, data dirs) as JSON."""
    typer.echo(json.dumps(_open(root).describe(), indent=1))


@cluster_app.command("kill-node")
def kill_node(node: int = typer.Argument(..., help="Node index (0 is the head)."),
              root: Path = typer.Option(DEFAULT_ROOT, help=ROOT_HELP)) -> None:
    """SIGKILL the node's raylet and every process of it."""
    c = _open(root)
    if node not in c.nodes:
        raise typer.BadParameter(f"node must be one of {sorted(c.nodes)}, got {node}")
    _say(f"node {node}: killed {c.kill_node(node)} process(es)")


@cluster_app.command("restart-node")
def restart_node(node: int = typer.Argument(..., help="Node index (0 is the head)."),
                 root: Path = typer.Option(DEFAULT_ROOT, help=ROOT_HELP)) -> None:
    """Kill the node if it runs, then start it again on its data directory."""
    c = _open(root)
    if node not in c.nodes:
        raise typer.BadParameter(f"node must be one of {sorted(c.nodes)}, got {node}")
    st = c.restart_node(node)
    _say(f"node {node} back in {st.started_s:.1f} s")


@cluster_app.command("mount")
def mount(data_dir: Path = typer.Option(..., help="The store's data_dir (empty or made by this command)."),
          root: Path = typer.Option(DEFAULT_ROOT, help=ROOT_HELP)) -> None:
    """Link DATA_DIR/shards/shard-00i to the data dir of the worker that holds shard i."""
    try:
        out = _open(root).mount_shards(data_dir)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(json.dumps(out, indent=1))


def bench_cluster(
    out: Path = typer.Option(Path("results/bench_cluster.json"), help="JSON file of the figures."),
    model: str | None = typer.Option(None, help="Base model of the served app (default: the config's)."),
    config: Path | None = typer.Option(None, help="A YAML config to start from (default: the defaults)."),
    workers: int = typer.Option(2, min=1, help="Worker nodes beside the head."),
    shards: int = typer.Option(4, min=1, help="Shard actors, spread over the workers."),
    base_port: int = typer.Option(26000, help="GCS port of the bench's cluster (its nodes' ports follow)."),
    warm_s: float = typer.Option(10.0, min=0.5, help="Steady load before the kill (seconds)."),
    outage_s: float = typer.Option(20.0, min=0.5, help="Load with the node dead, before its restart."),
    chat_workers: int = typer.Option(2, min=1, help="Clients sending chats back to back."),
    max_tokens: int = typer.Option(8, min=1),
    experts: int = typer.Option(16, min=1, help="Planted experts (one per chat prompt)."),
    cache_experts: int = typer.Option(0, min=0, help="Replica expert cache (0: each fetch reads its shard)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Kill a worker node (raylet and every process of it) under chat load on a head + workers cluster
    of this machine; count answered / degraded / failed replies, time the recovery, read every expert back."""
    from srmoa_dist.bench.cluster_bench import run_cluster_bench
    from srmoa_dist.config import SrmoaConfig

    _logging(verbose)
    cfg = SrmoaConfig.load_yaml(config) if config is not None else None
    try:
        doc = run_cluster_bench(out, cfg=cfg, model=model, workers=workers, shards=shards,
                                base_port=base_port, warm_s=warm_s, outage_s=outage_s,
                                chat_workers=chat_workers,
                                max_tokens=max_tokens, experts=experts, cache_experts=cache_experts, say=_say)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not doc["recovered"] or doc["lost_experts"]:
        _say("the node did not recover, or experts were lost (see the JSON)")
        raise typer.Exit(1)


def bench_peer(
    out: Path = typer.Option(Path("results/bench_peer.json"), help="JSON file of the figures."),
    model: str | None = typer.Option(None, help="Base model (default: the config's, smollm2)."),
    config: Path | None = typer.Option(None, help="A YAML config to start from (its expert section: "
                                                  "rank, alpha, target_modules; form is set to lora)."),
    adapters: int = typer.Option(8, min=1, help="Adapters in the PeftModel (row b of a batch gets b % N)."),
    batch_sizes: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    new_tokens: int = typer.Option(32, min=1, help="Tokens decoded per sequence (exactly)."),
    repeats: int = typer.Option(3, min=1, help="Timed rounds per batch size (paths alternate)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """The same LoRA adapters in one PEFT PeftModel (mixed-adapter batches) vs the routed fusion path,
    in one process: tokens/s at each batch size and their ratio."""
    from srmoa_dist.bench.peer_bench import run_peer_bench
    from srmoa_dist.config import SrmoaConfig

    _logging(verbose)
    try:
        sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--batch-sizes must be comma-separated integers, "
                                 f"got {batch_sizes!r}") from None
    cfg = SrmoaConfig.load_yaml(config) if config is not None else None
    try:
        doc = run_peer_bench(out, cfg=cfg, model=model, adapters=adapters, batch_sizes=sizes,
                             new_tokens=new_tokens, repeats=repeats, say=_say)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(json.dumps({"agreement": doc["agreement"], "fusion_vs_peft": doc["fusion_vs_peft"]}, indent=1))


def register_benches(bench_app: typer.Typer) -> None:
    """Add `bench cluster` and `bench peer` to the `srmoa bench` group."""
    bench_app.command("cluster")(bench_cluster)
    bench_app.command("peer")(bench_peer)


__all__ = ["cluster_app", "register_benches"]
