"""The dry run: every rank class of a full-scale layout built on the meta device under a fake process group, its
built sizes beside the memory planner's, and one line per problem. Each run is its own process (the fake
world is process-wide), as a user runs it: `python -m m2megatron.train --dry-run ...` (forked from the test
harness's preloaded forkserver, tests.harness.run_module).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import run_module

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
TEN_B_1024 = ["--preset", "m2-10b", "--parallel.tensor_parallel=4", "--parallel.distributed_optimizer=true",
              "--train.precision=bf16", "--train.micro_batch_size=32", "--launch.gpus_per_node=8",
              "--parallel.loss_group_size=2"]


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return run_module("m2megatron.train", "--dry-run", *args, cwd=REPO, timeout=300)


def _summary(out: str) -> dict[str, float]:
    line = next(line for line in out.splitlines() if line.startswith("dry_run "))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


def test_the_shipped_256_gpu_10b_recipe_builds_every_rank_class_within_the_planners_tolerance():
    run = _dry_run("--config", "launch/examples/m2-10b_h100_256.yaml", "--all-ranks", "--no-data-check")  # no /data
    assert run.returncode == 0, run.stdout + run.stderr
    summary = _summary(run.stdout)
    assert summary["problems"] == 0 and summary["ranks_visited"] == 2  # one per pipeline rank
    assert summary["worst_planner_diff"] <= 0.15 and summary["peak_gib"] < 79.6
    assert "virtual stages [0, 2, 4, 6]" in run.stdout and "pipeline bubble" in run.stdout


def test_a_1024_rank_10b_layout_builds_and_matches_the_planner():
    run = _dry_run("--world-size", "1024", "--all-ranks", *TEN_B_1024)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = _summary(run.stdout)
    assert summary["problems"] == 0 and summary["ranks_visited"] == 1  # PP=1: one rank class
    assert summary["worst_planner_diff"] <= 0.15  # the planner's stated tolerance
    assert "dp group (256)" in run.stdout and "loss group (2): [0, 4]; spans node(s) [0]" in run.stdout
    for line in ("parameters", "gradients", "optimizer", "activations_per_microbatch"):
        assert re.search(rf"^\s+{line}\s+[\d.]+\s+[\d.]+\s+[+-][\d.]+%$", run.stdout, re.M), line


@pytest.mark.parametrize("args,reason", [
    # G·TP = 4 fits a node of 6 GPUs, but the loss group of ranks [4, 6] straddles the node boundary 5 | 6.
    (["--world-size", "24", "--parallel.tensor_parallel=2", "--parallel.loss_group_size=2",
      "--launch.procs_per_node=6"],
     "loss groups of G=2 cross a node boundary although G·TP = 4 ≤ 6 GPUs per node"),
    # 10B without the distributed optimizer at TP1: fp32 Adam states alone exceed an 80 GB GPU.
    (["--world-size", "8", "--preset", "m2-10b", "--train.precision=bf16", "--train.micro_batch_size=2"],
     "problem: memory: rank 0 (pp 0) needs"),
])
def test_a_wrong_layout_fails_with_a_one_line_reason(args, reason):
    run = _dry_run("--all-ranks", *args)
    assert run.returncode == 1, run.stdout + run.stderr
    assert reason in run.stdout, run.stdout
    assert len([line for line in run.stdout.splitlines() if line.startswith("problem: ")]) == 1
