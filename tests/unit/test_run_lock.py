"""The run-directory lock: a live holder refuses a second trainer in one line naming it; a dead one is taken
over; a Slurm requeue of the same job is not refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2megatron.train.run_lock import LOCK_NAME, Holder, RunDirectoryInUse, RunLock, takeover_reason
from tests.harness import run_module

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_holder(directory: Path, age_s: float = 0.0, **fields) -> Holder:
    holder = dataclasses.replace(Holder.this_process(), **fields)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps(dataclasses.asdict(holder)))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return holder


def _pid_start(pid):
    from m2megatron.train.run_lock import _pid_start as start

    return start(pid)


def test_a_live_holder_is_refused_in_one_line_naming_host_pid_and_job(tmp_path, no_slurm, sleeper):
    _write_holder(tmp_path, pid=sleeper.pid, pid_start=_pid_start(sleeper.pid), job_id="4242", restart_count=1)
    with pytest.raises(RunDirectoryInUse) as refused:
        RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert "\n" not in message and f"{tmp_path} is in use by another trainer" in message
    assert f"host {Holder.this_process().host}, PID {sleeper.pid}, Slurm job 4242 (attempt 1)" in message
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid  # left alone


def test_the_lock_names_this_process_and_is_released(tmp_path, no_slurm):
    lock = RunLock(tmp_path).acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["job_id"] is None
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_heartbeat_refreshes_the_file(tmp_path, no_slurm):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (time.time() - 100, time.time() - 100))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 50
    lock.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, no_slurm):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_holder(tmp_path, pid=int(gone.stdout), pid_start=None)
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.me.token
    lock.release()


def test_a_reused_pid_does_not_keep_the_lock(tmp_path, no_slurm, sleeper):
    _write_holder(tmp_path, pid=sleeper.pid, pid_start=_pid_start(sleeper.pid) - 1)  # an older process had it
    RunLock(tmp_path).acquire().release()


def test_a_slurm_requeue_of_the_same_job_is_not_refused(tmp_path, monkeypatch, sleeper):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # The first attempt's rank 0 ran on another node and is still in its heartbeat window.
    _write_holder(tmp_path, host="node-a", boot_id="x", pid=sleeper.pid, job_id="77", restart_count=0)
    RunLock(tmp_path, job_state=lambda job: "RUNNING").acquire().release()


def _other_host(**fields) -> Holder:
    return dataclasses.replace(Holder.this_process(), host="node-b", boot_id="y", pid=12345, **fields)


def test_other_hosts_are_judged_by_heartbeat_and_slurm_state(no_slurm):
    me = Holder.this_process()
    running = lambda job: "RUNNING"  # noqa: E731
    assert takeover_reason(_other_host(job_id=None), me, 10.0) is None
    assert "heartbeat is 900s old" in takeover_reason(_other_host(job_id=None), me, 900.0)
    assert takeover_reason(_other_host(job_id="5"), me, 10.0, job_state=running) is None
    assert "has ended (COMPLETED)" in takeover_reason(_other_host(job_id="5"), me, 10.0,
                                                      job_state=lambda job: "COMPLETED")
    assert "has ended (GONE)" in takeover_reason(_other_host(job_id="5"), me, 10.0, job_state=lambda job: "GONE")
    # squeue cannot tell: the heartbeat decides
    assert takeover_reason(_other_host(job_id="5"), me, 10.0, job_state=lambda job: None) is None
    same_attempt = dataclasses.replace(me, job_id="5", restart_count=0)
    assert takeover_reason(_other_host(job_id="5", restart_count=0), same_attempt, 10.0, job_state=running) is None


def test_a_second_trainer_is_refused_before_it_writes_anything(tmp_path, sleeper):
    run_dir = tmp_path / "run"
    _write_holder(run_dir, pid=sleeper.pid, pid_start=_pid_start(sleeper.pid), job_id=None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'kernels'}"
    run = run_module("m2megatron.train", f"--train.run_dir={run_dir}", "--train.train_steps=1", cwd=REPO, env=env)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"PID {sleeper.pid}, no Slurm job" in last
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
