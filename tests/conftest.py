"""Shared fixtures: the distributed worker pools, the reference-data folder and skip rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.harness import DistributedPool

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("M2_REFERENCE_DIR", REPO.parent / "shared" / "reference" / "m2_encoder"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference/m2_encoder, or skip with the reason when it is absent."""
    if not (REFERENCE_DIR / "SPEC.md").is_file():
        pytest.skip(f"reference data not found at {REFERENCE_DIR} (set M2_REFERENCE_DIR to its location)")
    return REFERENCE_DIR


MAX_IDLE_POOLS = 2
"""Pools kept alive at once. An idle pool is not free: each worker holds a hundred gloo threads that wake up
now and then, and twenty idle workers took a core of the two away from the tests that ran."""


@pytest.fixture(scope="session")
def dist_pool():
    """`dist_pool(n)` → a DistributedPool of n gloo ranks, kept for the session while it is among the
    MAX_IDLE_POOLS most recently used sizes."""
    pools: dict[int, DistributedPool] = {}  # in order of last use

    def get(world_size: int) -> DistributedPool:
        pool = pools.pop(world_size, None) or DistributedPool(world_size)
        pools[world_size] = pool
        while len(pools) > MAX_IDLE_POOLS:
            pools.pop(next(iter(pools))).close()
        return pool

    yield get
    for pool in pools.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu tests run on a lent GPU via tests/gpu/run.sh)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
