"""The Slurm reshard job: a trained tiny checkpoint (TP1·PP1·DP2) is resharded to TP1·PP2 by
`python -m m2megatron.launch.submit --kind reshard` (the real module and arguments, 2 srun ranks), and a
training job at PP2 resumes from it. The three jobs are queued at once, chained with afterok."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.slurm.jobs import batch_log, read_jsonl, recipe, submit, wait_job

pytestmark = pytest.mark.slurm

TRAINED_STEPS = 4


def _recipe(run_dir: Path, train_steps: int, **sections) -> dict:
    config = recipe(run_dir, mode="srun")
    config.update(model={"preset": "tiny"},
                  train={"run_dir": str(run_dir), "train_steps": train_steps, "micro_batch_size": 8,
                         "global_batch_size": 16, "log_interval": 1, "eval_at_end": False, "tensorboard": False},
                  data={"synthetic_train_samples": 256, "synthetic_eval_samples": 64})
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def test_reshard_job_writes_the_new_layout_and_training_resumes_there(slurm_cluster, slurm_runs_dir):
    from m2megatron.checkpoint import manifest
    from m2megatron.checkpoint.atomic import resolve

    trained, resumed = slurm_runs_dir / "reshard" / "trained", slurm_runs_dir / "reshard" / "resumed"
    train_job = submit(slurm_cluster, _recipe(trained, TRAINED_STEPS))["job_ids"]["train"]
    reshard_job = submit(slurm_cluster, _recipe(trained, TRAINED_STEPS), "--kind", "reshard", "--after", train_job,
                         "--", "{run_dir}/checkpoints", "{run_dir}/resharded", "--tp", "1", "--pp", "2"
                         )["job_ids"]["reshard"]
    resume = _recipe(resumed, TRAINED_STEPS + 2, parallel={"pipeline_parallel": 2},
                     checkpoint={"load": str(trained / "resharded")})
    resume_job = submit(slurm_cluster, resume, "--after", reshard_job)["job_ids"]["train"]

    assert wait_job(slurm_cluster, train_job, timeout=600)["JobState"] == "COMPLETED", batch_log(trained, train_job)
    info = wait_job(slurm_cluster, reshard_job, timeout=600)
    assert info["JobState"] == "COMPLETED", batch_log(trained, reshard_job)
    meta = manifest.read(resolve(trained / "resharded"))
    assert meta["step"] == TRAINED_STEPS and meta["layout"]["pipeline_parallel"] == 2
    assert meta["layout"]["world_size"] == 2 and meta["config"]["parallel"]["pipeline_parallel"] == 2
    logs = sorted((trained / "logs" / f"reshard-{reshard_job}.0").glob("rank-*.log"))
    assert [p.name for p in logs] == ["rank-0.log", "rank-1.log"] and "resharded to" in logs[0].read_text()

    info = wait_job(slurm_cluster, resume_job, timeout=600)
    assert info["JobState"] == "COMPLETED", batch_log(resumed, resume_job)
    records = [r for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [TRAINED_STEPS + 1, TRAINED_STEPS + 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    rank0 = (resumed / "logs" / f"train-{resume_job}.0" / "rank-0.log").read_text()
    assert f"resumed from {trained / 'resharded'}" in rank0
