"""SIGKILL during a save leaves the previous checkpoint loadable, and `latest` never names an incomplete one.

Each crash point runs in its own process (forked from the test harness's preloaded forkserver): it saves
step 1 normally, then replaces the function the save path calls at that point by one that SIGKILLs the
process (`_arm`), and saves step 2.
"""

import contextlib
import os
import signal

import pytest
import torch.distributed as dist

from m2megatron.checkpoint import load_checkpoint, save_checkpoint
from m2megatron.checkpoint.atomic import LATEST, complete_checkpoints, resolve
from m2megatron.parallel import Layout, build_groups
from tests.checkpoint_toy import build_toy
from tests.harness import start_fresh_process

pytestmark = pytest.mark.distributed

CRASH_POINTS = ("after_shards", "before_rename", "before_latest", "after_latest")
"""In the order a save reaches them: shards written (no manifest yet), manifest written (not renamed),
renamed to iter_N (`latest` not rewritten), `latest` rewritten."""


def _sigkill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    """Make the next save SIGKILL this process at `point`, by replacing the function it calls there."""
    from m2megatron.checkpoint import atomic, save

    if point == "after_shards":
        save.own_file_checksums = _sigkill  # the first thing a save does once every shard is written
    elif point == "before_rename":
        atomic.publish = _sigkill
    elif point == "before_latest":
        atomic.write_latest = _sigkill
    else:
        write_latest = atomic.write_latest

        def write_then_die(*args, **kwargs):
            write_latest(*args, **kwargs)
            _sigkill()

        atomic.write_latest = write_then_die


def _crash_run(root: str, point: str) -> None:
    from m2megatron.config.parallel import ParallelConfig
    from m2megatron.parallel.bootstrap import initialize, local_rank_env

    # One rank: an in-process store, no port to race for.
    initialize(ParallelConfig(timeout_s=120), local_rank_env(0, 1, store=dist.HashStore()), megatron_state=False)
    groups = build_groups(Layout(world_size=1))
    chunks, opt, sched = build_toy(groups)
    save_checkpoint(root, 1, chunks, opt, sched, groups=groups)
    _arm(point)
    save_checkpoint(root, 2, chunks, opt, sched, groups=groups)
    raise SystemExit("crash point was not reached")


def _load_then_save(root: str):
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=2))
    chunks, opt, sched = build_toy(groups)
    step = load_checkpoint(root, chunks, opt, sched, groups=groups).step
    save_checkpoint(root, 3, chunks, opt, sched, groups=groups)
    return step


def test_sigkill_during_save_keeps_previous_checkpoint_loadable(dist_pool, tmp_path):
    procs = {point: start_fresh_process(_crash_run, str(tmp_path / point), point, log_path=tmp_path / f"{point}.log")
             for point in CRASH_POINTS}
    for point, proc in procs.items():
        try:
            proc.join(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this run's own session only
        log = (tmp_path / f"{point}.log").read_text(errors="replace")[-3000:]
        assert proc.exitcode == -signal.SIGKILL, f"{point}: exit {proc.exitcode}\n{log}"
    pool = dist_pool(2)
    # point -> (complete checkpoints after the crash, what `latest` names)
    expected = {"after_shards": ([1], 1), "before_rename": ([1], 1), "before_latest": ([1, 2], 1),
                "after_latest": ([1, 2], 2)}
    for point in CRASH_POINTS:
        root = tmp_path / point
        complete, latest = expected[point]
        assert [p.name for p in complete_checkpoints(root)] == [f"iter_{s:07d}" for s in complete], point
        assert (root / LATEST).read_text().strip() == f"iter_{latest:07d}", point
        assert resolve(root).name == f"iter_{latest:07d}", point
        assert pool.run(_load_then_save, str(root)) == [latest, latest], point
        assert (root / LATEST).read_text().strip() == "iter_0000003"
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp.")], f"{point}: stale temp left"

