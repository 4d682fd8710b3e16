"""The start-up environment of a Ray process that runs the model: OpenMP and MKL sized to its threads,
and enough malloc arenas for its threads.

Ray starts a worker whose task or actor asks for less than one CPU with OMP_NUM_THREADS=1. libgomp and MKL
read it once, when the process starts; `torch.set_num_threads` later raises torch's thread count, but the
threads then work against each other. Measured on this 2-core machine, one SmolLM2 training step (8 rows
of 70 tokens, forward + backward) took 3.0 s in a plain process, 7.6 s in a Ray actor's thread and 12.8 s
on the actor's main thread, and 3.2 s in the same actor started with OMP_NUM_THREADS=2. So every actor and
task that runs the model (the trainer, the model-server replicas, the adapter export) is started with
these variables set to its thread count: `runtime.torch_threads`, else the cores of the machine that
creates it (on a cluster whose nodes differ, set `runtime.torch_threads`).

**malloc arenas.** glibc gives each thread that allocates a malloc arena of its own, up to 8 per core
(16 here); a Ray worker already runs some 40 threads (gRPC, asio, its task pool), so the torch threads
end up sharing arenas with them and with each other, and every tensor allocated or freed takes a
contended lock. An SR-TTT step (many small tensors: one layer at a time, the experts' hooks, bf16
casts under autocast) then made ~40,000 futex sleeps a second per thread and ran 0.63 s in the trainer
actor against 0.32 s in a plain process; with MALLOC_ARENA_MAX=256 it ran 0.35 s (2026-12-07, 2-core
Xeon, `srmoa bench feedback`). So the same processes start with `runtime.malloc_arenas` (0 leaves
glibc's default). An arena costs address space, not memory, until a thread allocates in it.
"""

from __future__ import annotations

import os
from typing import Any

from srmoa_dist.config import SrmoaConfig


def torch_threads(cfg: SrmoaConfig) -> int:
    """The torch threads of a model process: `runtime.torch_threads`, else every core here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(cfg.runtime.torch_threads or cores)


def torch_runtime_env(cfg: SrmoaConfig) -> dict[str, Any]:
    """A Ray `runtime_env` whose process starts with OpenMP and MKL at `torch_threads(cfg)` threads and
    glibc's malloc at `runtime.malloc_arenas` arenas."""
    n = str(torch_threads(cfg))
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    if cfg.runtime.malloc_arenas:
        env["MALLOC_ARENA_MAX"] = str(cfg.runtime.malloc_arenas)
    return {"env_vars": env}


__all__ = ["torch_runtime_env", "torch_threads"]
