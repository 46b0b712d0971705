"""Shared fixtures: the distributed worker pools, the reference-data folder and skip rules."""

from __future__ import annotations

import importlib.util
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
"""Pools kept alive at once. An idle worker is not free (its gloo threads wake up now and then, ~0.03 of a core
each), and a pool forked from the harness's forkserver restarts in ~0.2 s, so two are plenty."""


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


LONGEST_FIRST = [
    "tests/slurm/", "tests/distributed/test_eval_docs.py", "tests/distributed/test_checkpoint_dist_optimizer.py",
    "tests/distributed/test_layout_change.py",
    "tests/distributed/test_rng_streams.py", "tests/distributed/test_trainer.py",
    "tests/distributed/test_checkpoint_crash.py", "tests/distributed/test_checkpoint_resume.py",
    "tests/distributed/test_checkpoint_tools.py", "tests/distributed/test_data_position.py",
    "tests/distributed/test_errors_under_torchrun.py", "tests/unit/test_dry_run.py",
]
"""Groups that take longest (seconds to minutes on 2 cores), started first so that the two xdist workers
of `make test` finish together. Everything else keeps its collection order behind them."""


def _group(nodeid: str) -> str:
    # The Slurm tier shares one local cluster per session: one worker runs all of it. Elsewhere a file's
    # tests stay together, so its module-scoped fixtures (a trained run, shards) are built once.
    return "tests/slurm/" if nodeid.startswith("tests/slurm/") else nodeid.split("::")[0]


def _rank(group: str) -> int:
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu tests run on a lent GPU via tests/gpu/run.sh)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
    items.sort(key=lambda item: _rank(_group(item.nodeid)))  # stable: collection order within a rank


if importlib.util.find_spec("xdist") is not None:
    def pytest_xdist_make_scheduler(config, log):
        """xdist's scope scheduler with our groups as scopes (its own `loadgroup` marks are ignored under
        pytest 9.2: xdist 3.8 renames items through `_nodeid`, which pytest no longer reads)."""
        from xdist.scheduler import LoadScopeScheduling

        class GroupScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return _group(nodeid)

        return GroupScheduling(config, log)
