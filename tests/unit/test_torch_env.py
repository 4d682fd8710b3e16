"""runtime/torch_env.py: a model process's OpenMP/MKL start-up environment."""

from __future__ import annotations

import os

import pytest

from srmoa_dist.config import RuntimeConfig, SrmoaConfig
from srmoa_dist.runtime.torch_env import torch_runtime_env, torch_threads


def test_threads_from_the_config_else_every_core():
    assert torch_threads(SrmoaConfig(runtime=RuntimeConfig(torch_threads=3))) == 3
    assert torch_threads(SrmoaConfig()) == len(os.sched_getaffinity(0))


def test_runtime_env_sets_openmp_mkl_and_malloc_arenas():
    env = torch_runtime_env(SrmoaConfig(runtime=RuntimeConfig(torch_threads=2)))
    assert env == {"env_vars": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "256"}}
    env = torch_runtime_env(SrmoaConfig(runtime=RuntimeConfig(torch_threads=2, malloc_arenas=0)))
    assert "MALLOC_ARENA_MAX" not in env["env_vars"]        # 0: glibc's own default


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True])
def test_malloc_arenas_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="runtime.malloc_arenas"):
        RuntimeConfig(malloc_arenas=bad)
