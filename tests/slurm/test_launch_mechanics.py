"""The launch templates on a real local Slurm: both launch modes, per-rank logs, the code snapshot and the
resolved config, then preemption → checkpoint → requeue → resume, and the chained eval job.

The payloads are the launcher self-test and tests/slurm/fake_trainer.py / fake_eval.py, which keep the
trainer's and eval's run-directory contract; tests/slurm/test_train_on_slurm.py repeats the end-to-end
checks with the real entry points.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.slurm.jobs import batch_log, job_info, read_jsonl, recipe, submit, wait_job, wait_until

pytestmark = pytest.mark.slurm


def rank_logs(run_dir, job_id, mode, attempt=0) -> dict[int, str]:
    """Rank → its log text: srun writes rank-<r>.log, torchrun <log-dir>/<id>/attempt_0/<local rank>/stdout.log."""
    log_dir = run_dir / "logs" / f"train-{job_id}.{attempt}"
    if mode == "srun":
        return {int(p.stem.split("-")[1]): p.read_text() for p in log_dir.glob("rank-*.log")}
    return {int(p.parent.name): p.read_text() for p in log_dir.glob("torchrun-node0/*/attempt_0/*/stdout.log")}


def explain(run_dir, job_id, mode) -> str:
    return f"batch log:\n{batch_log(run_dir, job_id)}\nrank logs:\n{rank_logs(run_dir, job_id, mode)}"


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_two_ranks_start_with_master_from_nodelist_one_log_each_and_a_code_snapshot(slurm_cluster, tmp_path, mode):
    run_dir = tmp_path / f"selftest-{mode}"
    out = submit(slurm_cluster, recipe(run_dir, mode=mode, train_module="m2megatron.parallel.selftest",
                                       train_args=[]))
    job = out["job_ids"]["train"]
    info = wait_job(slurm_cluster, job, timeout=240)
    assert info["JobState"] == "COMPLETED", explain(run_dir, job, mode)

    logs = rank_logs(run_dir, job, mode)
    assert sorted(logs) == [0, 1], explain(run_dir, job, mode)
    for rank in (0, 1):
        assert f"rank {rank}/2: tp=0 dp={rank} pp=0" in logs[rank] and "all_reduce=2" in logs[rank]
    port = 20000 + int(job) % 20000
    assert f"master {slurm_cluster.node}:{port}" in batch_log(run_dir, job)

    snapshot = json.loads((run_dir / "code" / "SNAPSHOT.json").read_text())
    assert snapshot["files"] > 10 and (run_dir / "code" / "m2megatron" / "launch" / "render.py").is_file()
    assert f"code {run_dir / 'code'}" in batch_log(run_dir, job)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["run_dir"] == str(run_dir) and resolved["launch"]["mode"] == mode


# srun mode: the signal goes to the ranks, as `scancel --signal=USR1 JOB` sends it.
# torchrun mode: it goes to the batch shell, as `--signal=B:USR1@N` sends it before the time limit; the
# shell's trap passes it on to every process of the job step (torchrun itself ignores it).
@pytest.mark.parametrize("mode,scancel_args", [("srun", ["--signal=USR1"]),
                                               ("torchrun", ["--batch", "--signal=USR1"])])
def test_usr1_checkpoints_requeues_and_resumes_without_lost_steps_then_chained_eval_runs(
        slurm_cluster, tmp_path, mode, scancel_args):
    run_dir = tmp_path / f"preempt-{mode}"
    config = recipe(run_dir, mode=mode, train_module="tests.slurm.fake_trainer", eval_module="tests.slurm.fake_eval",
                    signal_seconds=60, env=["M2_FAKE_STEP_S=0.3"])
    config["train"]["train_steps"] = 30
    out = submit(slurm_cluster, config, "--eval")
    train, evaluation = out["job_ids"]["train"], out["job_ids"]["eval"]
    assert job_info(slurm_cluster, evaluation)["JobState"] == "PENDING"

    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: len(read_jsonl(metrics)) >= 3, "3 training steps", cluster=slurm_cluster, job_id=train)
    slurm_cluster.run("scancel", *scancel_args, train)
    info = wait_job(slurm_cluster, train, timeout=300)
    assert info["JobState"] == "COMPLETED", explain(run_dir, train, mode)
    assert info["Restarts"] == "1", explain(run_dir, train, mode)

    records = read_jsonl(metrics)
    assert [r["step"] for r in records] == list(range(1, 31)), "a step was lost or repeated across the requeue"
    preempted = json.loads((run_dir / "logs" / f"train-{train}.0" / "PREEMPTED.json").read_text())
    first = [r["step"] for r in records if r["attempt"] == 0]
    assert preempted["step"] == first[-1] and preempted["reason"] in ("SIGUSR1", "request file")
    assert [r["step"] for r in records if r["attempt"] == 1][0] == preempted["step"] + 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-30"
    assert not (run_dir / "PREEMPTED").exists()

    ev = wait_job(slurm_cluster, evaluation, timeout=180)
    assert ev["JobState"] == "COMPLETED", batch_log(run_dir, evaluation)
    assert json.loads((run_dir / "eval" / "results.json").read_text()) == {"checkpoint_step": 30}
    assert ev["StartTime"] >= info["EndTime"]
