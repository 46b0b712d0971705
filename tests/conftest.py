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


@pytest.fixture(scope="session")
def dist_pool():
    """`dist_pool(n)` → a DistributedPool of n gloo ranks, started once per session and size."""
    pools: dict[int, DistributedPool] = {}

    def get(world_size: int) -> DistributedPool:
        if world_size not in pools:
            pools[world_size] = DistributedPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu tests run on a lent GPU via tests/gpu/run.sh)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
