"""The sbatch templates render to valid bash with the right directives, for every kind and launch mode,
including the documented multi-node H100/H200 example; the batch script's requeue logic runs against fake
Slurm commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from m2megatron.config import ConfigError, load_config
from m2megatron.config.launch import LaunchConfig
from m2megatron.launch.render import SOURCE_ROOT, default_spec, fill, render

pytestmark = pytest.mark.unit

EXAMPLE = SOURCE_ROOT / "launch" / "examples" / "m2-10b_h100.yaml"


def directives(script: str) -> dict[str, str]:
    """'#SBATCH --key=value' lines → {key: value} ('' for flags)."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def render_kind(kind: str, launch: LaunchConfig, run_dir: Path = Path("/runs/r1")) -> str:
    args = ["--in", "/ckpt", "--out", "/ckpt2"] if kind == "reshard" else None
    return render(default_spec(kind, launch, run_dir, run_dir / "code", args), launch)


def test_h100_example_is_a_valid_10b_layout_for_24_nodes_and_renders_a_valid_sbatch_file(tmp_path):
    cfg = load_config(EXAMPLE)
    world = cfg.launch.world_size()
    cfg.validate(world_size=world)
    assert (world, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
            cfg.parallel.data_parallel(world)) == (192, 8, 3, 8)
    script = render_kind("train", cfg.launch)
    bash_syntax_ok(script, tmp_path)
    d = directives(script)
    assert (d["nodes"], d["ntasks-per-node"], d["gpus-per-node"], d["signal"], d["time"]) == (
        "24", "1", "8", "B:USR1@600", "2-00:00:00")
    assert "requeue" in d and "exclusive" in d and d["partition"] == "h100"
    assert "--nproc-per-node=8" in script and '--node-rank="$SLURM_NODEID"' in script
    for setting in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_SOCKET_IFNAME='^lo,docker0'", "NCCL_NVLS_ENABLE=1"):
        assert f"export {setting}" in script


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
@pytest.mark.parametrize("kind", ["train", "eval", "reshard"])
def test_every_kind_and_mode_renders_to_valid_bash_with_no_placeholder_left(tmp_path, kind, mode):
    launch = LaunchConfig(mode=mode, nodes=2, procs_per_node=4, gpus_per_node=4, cpus_per_task=8,
                          account="acct", container_mounts=["/data:/data"], env=["A=1 2"], setup=["true"])
    script = render_kind(kind, launch)
    bash_syntax_ok(script, tmp_path)
    assert "{{" not in script and "}}" not in script
    d = directives(script)
    assert d["ntasks-per-node"] == ("4" if mode == "srun" else "1") and d["account"] == "acct"
    assert ("signal" in d) == (kind == "train") and ("requeue" in d) == (kind == "train")
    assert "RUN_DIR=/runs/r1" in script and "export A='1 2'" in script
    log = "rank-%t.log" if mode == "srun" else "node-%n.log"
    assert f'--output="$LOG_DIR/{log}"' in script and "--cpus-per-task=8" in script.split("srun ", 1)[1]


def test_srun_mode_runs_the_module_once_per_rank_from_the_venv():
    launch = LaunchConfig(mode="srun", procs_per_node=2, venv="/opt/venv", train_args=["--config", "{run_dir}/c.yaml"])
    script = render_kind("train", launch, Path("/runs/a"))
    assert "exec /opt/venv/bin/python -m m2megatron.train --config /runs/a/c.yaml" in script
    assert "source /opt/venv/bin/activate" in script and "torch.distributed.run" not in script


def test_container_runs_through_pyxis_with_the_run_dir_mounted():
    launch = LaunchConfig(container="nvcr.io#nvidia/pytorch:25.01-py3", venv="/ignored")
    script = render_kind("eval", launch, Path("/runs/a"))
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in script
    assert "--container-mounts=/runs/a:/runs/a" in script and "/ignored" not in script


def test_a_run_dir_with_white_space_is_refused_by_name():
    with pytest.raises(ValueError, match="train.run_dir"):
        render_kind("train", LaunchConfig(), Path("/runs/my run"))


def test_fill_rejects_missing_and_unused_placeholders():
    assert fill("a {{x}} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(ValueError, match="without a value.*'y'"):
        fill("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(ValueError, match="without a placeholder.*'z'"):
        fill("{{x}}", {"x": "1", "z": "2"})


@pytest.mark.parametrize("override,message", [
    ("--launch.time=soon", "launch.time"), ("--launch.env=NOEQUALS", "launch.env"),
    ("--launch.nodes=0", "launch.nodes"), ("--launch.train_module=a b", "launch.train_module"),
    ("--launch.mode=mpirun", "launch.mode")])
def test_bad_launch_settings_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override]).validate()


# ---------------------------------------------------------------- the batch script's requeue logic
FAKE_SLURM = {
    # the job step: what the trainer would leave behind
    "srun": '#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\n[ -n "${FAKE_PREEMPT:-}" ] && echo \'{"step": 7}\' '
            '> "$RUN_DIR/PREEMPTED"\nexit "${FAKE_RC:-0}"\n',
    "scontrol": '#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n[ "$1 $2" = "show hostnames" ] && echo node7\n'
                'exit 0\n',
    "scancel": '#!/bin/bash\necho "scancel $*" >> "$FAKE_LOG"\n',
}


def run_batch_script(tmp_path: Path, launch: LaunchConfig, **env: str) -> tuple[int, str, Path]:
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (run_dir / "code").mkdir(parents=True)
    script = tmp_path / "train.sbatch"
    script.write_text(render(default_spec("train", launch, run_dir, run_dir / "code"), launch))
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[7-8]",
                "SLURM_NNODES": "2", "FAKE_LOG": str(tmp_path / "calls.log"), **env}
    proc = subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
    return proc.returncode, calls + proc.stdout + proc.stderr, run_dir


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_preempted_step_makes_the_batch_script_requeue_its_job(tmp_path):
    rc, out, run_dir = run_batch_script(tmp_path, LaunchConfig(), FAKE_PREEMPT="1", SLURM_RESTART_COUNT="2")
    assert rc == 0, out
    assert "scontrol requeue 42" in out and "master node7:20042" in out
    assert not (run_dir / "PREEMPTED").exists()
    assert (run_dir / "logs" / "train-42.2" / "PREEMPTED.json").read_text().strip() == '{"step": 7}'


@pytest.mark.parametrize("launch,env", [(LaunchConfig(requeue=False), {}),
                                        (LaunchConfig(max_requeues=2), {"SLURM_RESTART_COUNT": "2"})])
def test_no_requeue_when_disabled_or_past_the_limit(tmp_path, launch, env):
    rc, out, _ = run_batch_script(tmp_path, launch, FAKE_PREEMPT="1", **env)
    assert rc == 0 and "scontrol requeue" not in out and "not requeueing" in out, out


def test_a_failing_step_fails_the_job_without_requeue(tmp_path):
    rc, out, _ = run_batch_script(tmp_path, LaunchConfig(), FAKE_RC="3")
    assert rc == 3 and "scontrol requeue" not in out, out
    assert re.search(r"srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 .* bash -c m2_task", out)
