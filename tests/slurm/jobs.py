"""Submit run configs through the real submit helper and follow the jobs with scontrol."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from tests.slurm.cluster import LocalSlurm

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def recipe(run_dir: Path, **launch) -> dict:
    """A tiny-preset recipe for 2 ranks on the local cluster, run by this test session's Python."""
    settings = {"nodes": 1, "procs_per_node": 2, "time": "10", "venv": sys.prefix, "signal_seconds": 0}
    settings.update(launch)
    return {"train": {"run_dir": str(run_dir)}, "launch": settings}


def submit(cluster: LocalSlurm, config: dict, *args: str) -> dict:
    """Write `config` as a recipe beside its run dir and run `python -m m2megatron.launch.submit` on it."""
    run_dir = Path(config["train"]["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    # The tiny recipes are not what the layout check is for (it has its own test); it would add a process start.
    proc = cluster.run(sys.executable, "-m", "m2megatron.launch.submit", "--no-layout-check", "--config", str(path),
                       *args, timeout=120,
                       check=False, cwd=REPO)
    assert proc.returncode == 0, f"submit failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job_info(cluster: LocalSlurm, job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (first record; {} when unknown)."""
    out = cluster.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout.strip()
    fields = {}
    for word in out.splitlines()[0].split() if out else []:
        key, sep, value = word.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


def job_ended(cluster: LocalSlurm, job_id: str) -> bool:
    """The job reached a final state, or slurmctld no longer knows it."""
    return job_info(cluster, job_id).get("JobState", "COMPLETED") in FINAL_STATES


def wait_job(cluster: LocalSlurm, job_id: str, timeout: float = 300) -> dict[str, str]:
    """Poll until the job reaches a final state (a requeue passes through PENDING, which is not final)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(cluster, job_id)
        if not info:
            raise AssertionError(f"job {job_id} is not known to slurmctld (purged, or never submitted)")
        if info.get("JobState") in FINAL_STATES:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {info}")
        time.sleep(0.5)


def wait_until(predicate, what: str, timeout: float = 180, cluster: LocalSlurm | None = None,
               job_id: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if cluster is not None and job_id is not None and job_ended(cluster, job_id):
            raise AssertionError(f"job {job_id} ended before: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")
        time.sleep(0.3)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def batch_log(run_dir: Path, job_id: str, tail: int = 4000) -> str:
    """The job's batch output, then the end of each of its step logs (per node / rank), for a failure message."""
    logs = run_dir / "logs"
    parts = [p.read_text(errors="replace") for p in logs.glob(f"*-{job_id}.out")]
    for path in sorted(logs.glob(f"*-{job_id}.*/*.log")):
        parts.append(f"--- {path.relative_to(logs)} (end) ---\n{path.read_text(errors='replace')[-tail:]}")
    return "\n".join(parts)
