"""The run lock is taken by global rank 0 only, and a refusal reaches every rank with the same message."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.distributed


def _lock(directory: str) -> tuple[str, bool]:
    from m2megatron.train.run_lock import LOCK_NAME, RunDirectoryInUse, lock_run_directories

    try:
        locks = lock_run_directories([directory, directory])  # the same directory twice: one lock
    except RunDirectoryInUse as exc:
        return f"refused: {exc}", False
    holds = bool(locks)
    exists = os.path.exists(os.path.join(directory, LOCK_NAME))
    dist.barrier()
    for lock in locks:
        lock.release()
    return f"held={holds} exists={exists}", holds


def test_rank_zero_holds_the_lock_and_a_refusal_reaches_every_rank(dist_pool, tmp_path):
    pool = dist_pool(2)
    assert pool.run(_lock, str(tmp_path)) == [("held=True exists=True", True), ("held=False exists=True", False)]
    # A holder that is alive on this host: the pytest process itself.
    import dataclasses
    import json

    from m2megatron.train.run_lock import LOCK_NAME, Holder

    holder = dataclasses.replace(Holder.this_process(), job_id=None)
    (tmp_path / LOCK_NAME).write_text(json.dumps(dataclasses.asdict(holder)))
    results = pool.run(_lock, str(tmp_path))
    assert results[0] == results[1] and results[0][0].startswith("refused: ")
    assert f"PID {os.getpid()}" in results[0][0]
