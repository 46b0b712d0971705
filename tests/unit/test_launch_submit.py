"""The submit helper prepares the run directory (resolved config with absolute paths, code snapshot,
rendered scripts, job record) and refuses bad requests with a message naming the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from m2megatron.cli import UserError
from m2megatron.config import ConfigError, load_config
from m2megatron.launch.snapshot import snapshot_code
from m2megatron.launch.submit import submit

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_writes_config_snapshot_scripts_and_a_job_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["--train.run_dir=runs/a", "--launch.mode=srun", "--launch.procs_per_node=2",
                                 "--launch.venv=venv", "--checkpoint.save_dir=ckpts"])
    result = submit(cfg, chain_eval=True, dry_run=True)
    run_dir = tmp_path / "runs" / "a"
    assert result.run_dir == run_dir and result.job_ids == {"train": None, "eval": None}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["run_dir"] == str(run_dir)
    assert saved["checkpoint"]["save_dir"] == str(tmp_path / "ckpts") and saved["launch"]["venv"] == str(
        tmp_path / "venv")
    assert (run_dir / "code" / "m2megatron" / "launch" / "submit.py").is_file()
    assert json.loads((run_dir / "code" / "SNAPSHOT.json").read_text())["source"] == str(REPO)
    train = (run_dir / "slurm" / "train.sbatch").read_text()
    assert f"--config {run_dir}/config.yaml" in train and f"CODE_DIR={run_dir}/code" in train
    evaluation = (run_dir / "slurm" / "eval.sbatch").read_text()
    assert f"--checkpoint {run_dir}/checkpoints --out {run_dir}/eval" in evaluation
    kinds = [json.loads(line)["kind"] for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert kinds == ["train", "eval"] and (run_dir / "logs").is_dir()


def test_snapshot_off_runs_from_the_source_tree(tmp_path):
    cfg = load_config(overrides=[f"--train.run_dir={tmp_path / 'r'}", "--launch.snapshot=false"])
    submit(cfg, dry_run=True)
    assert f"CODE_DIR={REPO}" in (tmp_path / "r" / "slurm" / "train.sbatch").read_text()
    assert not (tmp_path / "r" / "code").exists()


def test_layout_is_checked_against_the_job_world_size_before_anything_is_written(tmp_path):
    cfg = load_config(overrides=[f"--train.run_dir={tmp_path / 'r'}", "--parallel.tensor_parallel=4",
                                 "--launch.procs_per_node=2"])
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        submit(cfg, dry_run=True)
    assert not (tmp_path / "r").exists()


def test_reshard_needs_tool_arguments_and_eval_chains_only_after_training(tmp_path):
    cfg = load_config(overrides=[f"--train.run_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match="reshard"):
        submit(cfg, kind="reshard", dry_run=True)
    with pytest.raises(UserError, match="--eval"):
        submit(cfg, kind="eval", chain_eval=True, dry_run=True)
    with pytest.raises(UserError, match="unrecognized arguments: --to-tp"):
        submit(cfg, kind="reshard", module_args=["{run_dir}/checkpoints", "{run_dir}/b", "--to-tp", "2"],
               dry_run=True)
    with pytest.raises(UserError, match="--tp 2 × --pp 2 does not divide the job's 1 ranks"):
        submit(cfg, kind="reshard", module_args=["a", "b", "--tp", "2", "--pp", "2"], dry_run=True)
    result = submit(cfg, kind="reshard", module_args=["{run_dir}/checkpoints", "{run_dir}/resharded", "--pp", "1"],
                    dry_run=True)
    run_dir = tmp_path / "r"
    script = result.scripts["reshard"].read_text()
    assert ("exec python3 -m torch.distributed.run --nnodes=\"$SLURM_NNODES\"" in script
            and f"-m m2megatron.checkpoint.reshard {run_dir}/checkpoints {run_dir}/resharded --pp 1" in script)
    assert "--no-requeue" in script


def test_without_sbatch_on_path_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = load_config(overrides=[f"--train.run_dir={tmp_path / 'r'}", "--launch.snapshot=false"])
    with pytest.raises(UserError, match="sbatch not found"):
        submit(cfg)


def test_submit_passes_the_dependency_to_sbatch(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\necho "$*" >> "$(dirname "$0")/calls"\necho "$((100 + $(wc -l < '
                    '"$(dirname "$0")/calls")));cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    cfg = load_config(overrides=[f"--train.run_dir={tmp_path / 'r'}", "--launch.snapshot=false"])
    result = submit(cfg, chain_eval=True)
    assert result.job_ids == {"train": "101", "eval": "102"}
    calls = (fake.parent / "calls").read_text().splitlines()
    assert calls[0].startswith("--parsable ") and calls[1].startswith("--parsable --dependency=afterok:101 ")


def test_command_line_prints_one_json_line_and_reports_bad_settings_in_one_line(tmp_path):
    run = [sys.executable, "-m", "m2megatron.launch.submit", "--dry-run", "--no-layout-check",
           f"--train.run_dir={tmp_path / 'r'}", "--launch.snapshot=false"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["scripts"]["train"] == str(tmp_path / "r" / "slurm" / "train.sbatch")
    bad = subprocess.run(run + ["--launch.time=later"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: launch.time")


def test_snapshot_copies_what_git_knows_and_leaves_ignored_files_out(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / ".gitignore").write_text("runs/\n")
    (src / "runs").mkdir()
    (src / "runs" / "big.bin").write_text("data")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    record = snapshot_code(src, tmp_path / "dest")
    assert (tmp_path / "dest" / "pkg" / "a.py").read_text() == "x = 1\n"
    assert not (tmp_path / "dest" / "runs").exists() and record["files"] == 2 and record["dirty"]
    (src / "pkg" / "a.py").write_text("x = 2\n")
    snapshot_code(src, tmp_path / "dest")  # a second snapshot replaces the first
    assert (tmp_path / "dest" / "pkg" / "a.py").read_text() == "x = 2\n"


def test_a_training_job_whose_layout_does_not_fit_is_refused_before_sbatch(tmp_path):
    # 10B at TP1 without the distributed optimizer: the trainer's dry run finds the memory problem.
    run = [sys.executable, "-m", "m2megatron.launch.submit", "--dry-run", f"--train.run_dir={tmp_path / 'big'}",
           "--launch.snapshot=false", "--preset", "m2-10b", "--launch.procs_per_node=8", "--train.precision=bf16",
           "--train.micro_batch_size=2"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: the layout check refuses this job (--no-layout-check skips it):")
    assert "memory: rank 0 (pp 0) needs" in out.stderr
    assert "dry_run ranks_visited=1" in (tmp_path / "big" / "slurm" / "layout_check.txt").read_text()
