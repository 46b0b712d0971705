"""The launch templates on a real local Slurm: both launch modes, per-rank logs, the code snapshot and the
resolved config, then preemption → checkpoint → requeue → resume, and the chained eval job.

The payloads are the launcher self-test and tests/slurm/fake_trainer.py / fake_eval.py, which keep the
trainer's and eval's run-directory contract; tests/slurm/test_train_on_slurm.py repeats the end-to-end
checks with the real entry points. All runs are submitted at once by the `runs` fixture, so their waits
(scheduling, the requeue hold) overlap; each test then checks one run.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.slurm.jobs import batch_log, job_ended, job_info, read_jsonl, recipe, submit, wait_job

pytestmark = pytest.mark.slurm

MODES = ("srun", "torchrun")
# srun mode: the signal goes to the ranks, as `scancel --signal=USR1 JOB` sends it.
# torchrun mode: it goes to the batch shell, as `--signal=B:USR1@N` sends it before the time limit; the
# shell's trap passes it on to every process of the job step (torchrun itself ignores it).
PREEMPT_SIGNAL = {"srun": ["--signal=USR1"], "torchrun": ["--batch", "--signal=USR1"]}
TRAIN_STEPS = 20
PREEMPT_AFTER_STEPS = 3


@pytest.fixture(scope="module")
def runs(slurm_cluster, slurm_runs_dir):
    """{(what, mode): (run_dir, job ids)}; every preemption run gets its signal after a few steps."""
    base = slurm_runs_dir / "mechanics"
    runs = {}
    for mode in MODES:
        run_dir = base / f"selftest-{mode}"
        runs["selftest", mode] = run_dir, submit(slurm_cluster, recipe(
            run_dir, mode=mode, train_module="m2megatron.parallel.selftest", train_args=[]))["job_ids"]
    for mode in MODES:
        run_dir = base / f"preempt-{mode}"
        config = recipe(run_dir, mode=mode, train_module="tests.slurm.fake_trainer",
                        eval_module="tests.slurm.fake_eval", signal_seconds=60, env=["M2_FAKE_STEP_S=0.25"])
        config["train"]["train_steps"] = TRAIN_STEPS
        runs["preempt", mode] = run_dir, submit(slurm_cluster, config, "--eval")["job_ids"]
        assert job_info(slurm_cluster, runs["preempt", mode][1]["eval"])["JobState"] == "PENDING"
    send_preemption_signals(slurm_cluster, {mode: runs["preempt", mode] for mode in MODES})
    return runs


def send_preemption_signals(cluster, preempt_runs: dict, timeout: float = 300) -> None:
    """scancel each training job once its metrics.jsonl has PREEMPT_AFTER_STEPS steps."""
    pending = dict(preempt_runs)
    deadline = time.monotonic() + timeout
    while pending:
        for mode, (run_dir, jobs) in list(pending.items()):
            if len(read_jsonl(run_dir / "metrics.jsonl")) >= PREEMPT_AFTER_STEPS:
                cluster.run("scancel", *PREEMPT_SIGNAL[mode], jobs["train"])
                del pending[mode]
            elif job_ended(cluster, jobs["train"]):
                raise AssertionError(f"{mode} training ended before its preemption signal:\n"
                                     f"{explain(run_dir, jobs['train'], mode)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no training steps within {timeout:.0f} s in {sorted(pending)}")
        time.sleep(0.3)


def rank_logs(run_dir, job_id, mode, attempt=0) -> dict[int, str]:
    """Rank → its log: srun writes rank-<r>.log, torchrun <log-dir>/<id>/attempt_0/<local rank>/stdout.log."""
    log_dir = run_dir / "logs" / f"train-{job_id}.{attempt}"
    if mode == "srun":
        return {int(p.stem.split("-")[1]): p.read_text() for p in log_dir.glob("rank-*.log")}
    return {int(p.parent.name): p.read_text() for p in log_dir.glob("torchrun-node0/*/attempt_0/*/stdout.log")}


def explain(run_dir, job_id, mode) -> str:
    return f"batch log:\n{batch_log(run_dir, job_id)}\nrank logs:\n{rank_logs(run_dir, job_id, mode)}"


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_start_with_master_from_nodelist_one_log_each_and_a_code_snapshot(slurm_cluster, runs, mode):
    run_dir, jobs = runs["selftest", mode]
    job = jobs["train"]
    info = wait_job(slurm_cluster, job, timeout=300)
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


@pytest.mark.parametrize("mode", MODES)
def test_usr1_checkpoints_requeues_and_resumes_without_lost_steps_then_chained_eval_runs(slurm_cluster, runs, mode):
    run_dir, jobs = runs["preempt", mode]
    train, evaluation = jobs["train"], jobs["eval"]
    info = wait_job(slurm_cluster, train, timeout=300)
    assert info["JobState"] == "COMPLETED", explain(run_dir, train, mode)
    assert info["Restarts"] == "1", explain(run_dir, train, mode)

    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1)), "a step was lost or repeated"
    preempted = json.loads((run_dir / "logs" / f"train-{train}.0" / "PREEMPTED.json").read_text())
    first = [r["step"] for r in records if r["attempt"] == 0]
    assert preempted["step"] == first[-1] and preempted["reason"] in ("SIGUSR1", "request file")
    assert [r["step"] for r in records if r["attempt"] == 1][0] == preempted["step"] + 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{TRAIN_STEPS}"
    assert not (run_dir / "PREEMPTED").exists()

    ev = wait_job(slurm_cluster, evaluation, timeout=180)
    assert ev["JobState"] == "COMPLETED", batch_log(run_dir, evaluation)
    assert json.loads((run_dir / "eval" / "results.json").read_text()) == {"checkpoint_step": TRAIN_STEPS}
    assert ev["StartTime"] >= info["EndTime"]
