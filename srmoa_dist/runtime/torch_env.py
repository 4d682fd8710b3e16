"""The start-up environment of a Ray process that runs the model: OpenMP and MKL sized to its threads.

Ray starts a worker whose task or actor asks for less than one CPU with OMP_NUM_THREADS=1. libgomp and MKL
read it once, when the process starts; `torch.set_num_threads` later raises torch's thread count, but the
threads then work against each other. Measured on this 2-core machine, one SmolLM2 training step (8 rows
of 70 tokens, forward + backward) took 3.0 s in a plain process, 7.6 s in a Ray actor's thread and 12.8 s
on the actor's main thread, and 3.2 s in the same actor started with OMP_NUM_THREADS=2. So every actor and
task that runs the model (the trainer, the model-server replicas, the adapter export) is started with
these variables set to its thread count: `runtime.torch_threads`, else the cores of the machine that
creates it (on a cluster whose nodes differ, set `runtime.torch_threads`).
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
    """A Ray `runtime_env` whose process starts with OpenMP and MKL at `torch_threads(cfg)` threads."""
    n = str(torch_threads(cfg))
    return {"env_vars": {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}}


__all__ = ["torch_runtime_env", "torch_threads"]
