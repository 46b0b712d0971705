"""The training step's own cost per step (collectives, host syncs), async saves that never fork the trainer,
and the run controls train.exit_interval / train.exit_duration_minutes."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import sys

import pytest
import torch
import torch.distributed as dist

from m2megatron.config import load_config
from tests.distributed.test_trainer import SMALL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


REDISPATCH = "m2megatron.compat.cpu"
"""Its TorchFunctionMode calls each intercepted function again: one call shows up twice, once from there."""


def _caller_module() -> str:
    return sys._getframe(2).f_globals.get("__name__", "")


def _counting(calls: list, name: str, real):
    def counted(*args, **kwargs):
        calls.append((name, _caller_module()))
        return real(*args, **kwargs)
    return counted


def _patched(obj, name: str, calls: list):
    real = getattr(obj, name)
    setattr(obj, name, _counting(calls, name, real))
    return real


def _step_cost_and_forks(run_dir: str) -> dict:
    """Per step: the all-reduces and host syncs our code makes; over the whole run: processes started."""
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}", "--train.train_steps=3",
                                         "--train.log_interval=100", "--train.eval_at_end=false",
                                         "--checkpoint.async_save=true", "--checkpoint.save_interval=1"])
    trainer = Trainer(cfg, progress=False)  # device, process groups, model, optimizer: initialized from here on
    started: list = []
    real_fork = _patched(os, "fork", started)
    real_start = _patched(multiprocessing.process.BaseProcess, "start", started)
    per_step, calls = [], []
    real_step = trainer.train_step

    def counted_step():
        del calls[:]
        patched = [(dist, "all_reduce", _patched(dist, "all_reduce", calls)),
                   (torch.Tensor, "item", _patched(torch.Tensor, "item", calls)),
                   (torch.Tensor, "tolist", _patched(torch.Tensor, "tolist", calls))]
        try:
            return real_step()
        finally:
            for obj, name, real in patched:
                setattr(obj, name, real)
            per_step.append([c for c in calls if c[1].startswith("m2megatron.") and c[1] != REDISPATCH])

    trainer.train_step = counted_step
    try:
        trainer.fit()
    finally:
        os.fork, multiprocessing.process.BaseProcess.start = real_fork, real_start
        trainer.close()
    return {"per_step": per_step, "started": [name for name, _ in started],
            "saved": sorted(p.name for p in (trainer.checkpointer.root).glob("iter_*"))}


def test_a_step_makes_one_all_reduce_and_one_host_sync_and_async_saves_never_fork(dist_pool, tmp_path):
    results = dist_pool(2).run(_step_cost_and_forks, str(tmp_path / "run"))
    for result in results:
        assert len(result["per_step"]) == 3
        for calls in result["per_step"]:  # the finite flag and the stop flag travel together
            assert sorted(name for name, _ in calls) == ["all_reduce", "tolist"], calls
            assert {module for _, module in calls} == {"m2megatron.runtime.train_step"}, calls
        assert result["started"] == []  # no fork, no new process after the trainer's device initialization
    assert results[0]["saved"] == ["iter_0000002", "iter_0000003"]  # async saves published (keep_last=2)


def _controlled_runs(root: str) -> dict:
    """A straight 4-step run; one stopped by exit_interval=2 and restarted; one out of its time budget."""
    from pathlib import Path

    from m2megatron.train.preemption import read_preempted
    from m2megatron.train.run import train_and_evaluate

    def run(name, *extra):
        cfg = load_config(overrides=SMALL + [f"--train.run_dir={root}/{name}", "--train.train_steps=4",
                                             "--train.log_interval=1", "--train.eval_at_end=true", *extra])
        return train_and_evaluate(cfg)

    def losses(name):
        lines = open(f"{root}/{name}/metrics.jsonl").read().splitlines()
        return {r["step"]: (r["loss"], r["lr"]) for r in map(json.loads, lines) if "loss" in r}

    root = Path(root)
    run("straight", "--train.eval_at_end=false")
    first = run("interval", "--train.exit_interval=2")  # stops after step 2, no eval
    checkpoints_after_first = sorted(p.name for p in (root / "interval" / "checkpoints").glob("iter_*"))
    run("interval", "--train.exit_interval=2", "--train.eval_at_end=false")
    timed = run("timed", "--train.exit_duration_minutes=1e-9")
    marker = read_preempted(root / "timed")
    return {"first": first, "checkpoints": checkpoints_after_first, "straight": losses("straight"),
            "interval": losses("interval"), "timed": timed, "timed_steps": sorted(losses("timed")),
            "marker": marker, "interval_marker": read_preempted(root / "interval")}


def test_exit_interval_stops_with_a_checkpoint_and_exit_duration_asks_for_a_requeue(dist_pool, tmp_path):
    (result,) = dist_pool(1).run(_controlled_runs, str(tmp_path))
    assert result["first"] is None  # stopped early: no end-of-training eval
    assert result["checkpoints"] == ["iter_0000002"]
    assert result["interval"] == result["straight"]  # same losses and LR: the schedule ran over train_steps
    assert result["interval_marker"] is None  # an exit_interval stop is not a preemption
    assert result["timed"] is None and result["timed_steps"] == [1]
    assert result["marker"]["step"] == 1 and result["marker"]["reason"] == "train.exit_duration_minutes"
    assert result["marker"]["checkpoint"].endswith("iter_0000001")
