"""The `srmoa` command."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(help="srmoa-dist: a distributed store of frozen LoRA experts behind a frozen LLM.",
                  no_args_is_help=True, add_completion=False)
bench_app = typer.Typer(help="Benchmarks that print and save their figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--experts must be comma-separated integers, got {text!r}") from None
    if not sizes or any(n <= 0 for n in sizes):
        raise typer.BadParameter(f"--experts must be positive integers, got {text!r}")
    return sizes


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
