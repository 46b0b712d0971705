"""Render the sbatch templates of launch/templates/ from a run config.

A template is bash with `{{name}}` placeholders; every placeholder must be filled and every value
given must be used, so a typo fails at render time instead of on the cluster. Values that end up in
shell words are quoted with shlex here; the templates never quote them again.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from m2megatron.config.launch import LaunchConfig

SOURCE_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = SOURCE_ROOT / "launch" / "templates"
KINDS = ("train", "eval", "reshard")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One job to render: what runs, where, on how many nodes."""

    kind: Literal["train", "eval", "reshard"]
    run_dir: Path
    """Absolute run directory (config.yaml, logs/, checkpoints/)."""
    code_dir: Path
    """Absolute source tree the job runs from (the snapshot in run_dir/code, or the checkout)."""
    module: str
    args: tuple[str, ...]
    nodes: int
    time: str
    config_source: str = "a run config"
    """Shown in the script's header comment: which recipe the job came from."""

    @property
    def preemptible(self) -> bool:
        return self.kind == "train"


def fill(template: str, values: dict[str, str], name: str = "template") -> str:
    """Replace every {{key}}; raise ValueError on a missing or unused key."""
    used = set(_PLACEHOLDER.findall(template))
    missing = used - values.keys()
    unused = values.keys() - used
    if missing or unused:
        raise ValueError(f"{name}: placeholders without a value {sorted(missing)}, values without a "
                         f"placeholder {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def expand_args(args: list[str] | tuple[str, ...], run_dir: Path) -> tuple[str, ...]:
    """Replace {run_dir} in module arguments."""
    return tuple(a.replace("{run_dir}", str(run_dir)) for a in args)


def default_spec(kind: str, launch: LaunchConfig, run_dir: Path, code_dir: Path,
                 args: list[str] | None = None, config_source: str = "a run config") -> JobSpec:
    """The JobSpec of `kind` from the launch settings; `args` replaces the configured module arguments."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {list(KINDS)}")
    module = {"train": launch.train_module, "eval": launch.eval_module, "reshard": launch.reshard_module}[kind]
    if args is None:
        args = {"train": launch.train_args, "eval": launch.eval_args, "reshard": []}[kind]
    nodes = launch.eval_nodes if kind == "eval" else launch.nodes
    time = launch.eval_time if kind == "eval" else launch.time
    return JobSpec(kind=kind, run_dir=run_dir, code_dir=code_dir, module=module,  # type: ignore[arg-type]
                   args=expand_args(args, run_dir), nodes=nodes, time=time, config_source=config_source)


def sbatch_directives(spec: JobSpec, launch: LaunchConfig) -> list[str]:
    """The '#SBATCH' lines of a job."""
    if any(c.isspace() for c in str(spec.run_dir)):
        raise ValueError(f"train.run_dir: {str(spec.run_dir)!r} contains white space, which '#SBATCH --output' "
                         "cannot hold")
    name = launch.job_name or f"m2-{spec.kind}-{spec.run_dir.name}"
    opts = [f"--job-name={name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={launch.tasks_per_node}",
            f"--time={spec.time}", f"--output={spec.run_dir}/logs/%x-%j.out", "--open-mode=append"]
    if launch.gpus_per_node:
        opts.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.cpus_per_task:
        opts.append(f"--cpus-per-task={launch.cpus_per_task}")
    for flag in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(launch, flag) is not None:
            opts.append(f"--{flag}={getattr(launch, flag)}")
    if launch.exclusive:
        opts.append("--exclusive")
    if spec.preemptible:
        if launch.signal_seconds:
            opts.append(f"--signal=B:USR1@{launch.signal_seconds}")
        opts.append("--requeue" if launch.requeue else "--no-requeue")
    else:
        opts.append("--no-requeue")
    opts += launch.sbatch_extra
    for opt in opts:
        if any(c.isspace() for c in opt):
            raise ValueError(f"launch: sbatch option {opt!r} contains white space")
    return [f"#SBATCH {opt}" for opt in opts]


def srun_command(spec: JobSpec, launch: LaunchConfig) -> str:
    """`srun ... bash -c m2_task` for the job step, with one log file per rank (srun) or per node (torchrun)."""
    log = "rank-%t.log" if launch.mode == "srun" else "node-%n.log"
    opts = ["--kill-on-bad-exit=1", f"--nodes={spec.nodes}", f"--ntasks-per-node={launch.tasks_per_node}",
            f'--output="$LOG_DIR/{log}"']
    if launch.cpus_per_task:
        opts.append(f"--cpus-per-task={launch.cpus_per_task}")  # srun does not inherit it from sbatch (22.05+)
    if launch.container:
        mounts = [f"{spec.run_dir}:{spec.run_dir}", *launch.container_mounts]
        opts += [f"--container-image={shlex.quote(launch.container)}",
                 f"--container-mounts={shlex.quote(','.join(mounts))}",
                 f"--container-workdir={shlex.quote(str(spec.code_dir))}"]
    opts += [shlex.quote(o) for o in launch.srun_extra]
    return "srun " + " ".join(opts) + " bash -c m2_task"


def python_exe(launch: LaunchConfig) -> str:
    if launch.venv and not launch.container:
        return shlex.quote(str(Path(launch.venv) / "bin" / "python"))
    return "python3"


def task_function(spec: JobSpec, launch: LaunchConfig) -> str:
    """The bash function every Slurm task runs: the module itself, or torchrun spawning the node's ranks."""
    module = " ".join(shlex.quote(w) for w in ("-m", spec.module, *spec.args))
    lines = ["m2_task() {",
             "  # Ignore SIGUSR1 until Python installs its handler (SIG_IGN survives exec and torchrun's",
             "  # spawn); a rank started by a requeue can otherwise be killed by a signal that comes early.",
             "  trap '' USR1"]
    if launch.mode == "torchrun":
        lines += [f"  exec {python_exe(launch)} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" "
                  f"--node-rank=\"$SLURM_NODEID\" --nproc-per-node={launch.procs_per_node} \\",
                  '    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 \\',
                  '    --log-dir="${LOG_DIR:?}/torchrun-node$SLURM_NODEID" --redirects=3 --tee=3 \\',
                  f"    {module}"]
    else:
        lines.append(f"  exec {python_exe(launch)} {module}")
    lines.append("}")
    return "\n".join(lines)


def render(spec: JobSpec, launch: LaunchConfig) -> str:
    """The complete sbatch script of `spec`."""
    port = str(launch.master_port) if launch.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    venv = ""
    if launch.venv and not launch.container:
        venv = f"source {shlex.quote(str(Path(launch.venv) / 'bin' / 'activate'))}"
    env = "\n".join(f"export {e.split('=', 1)[0]}={shlex.quote(e.split('=', 1)[1])}" for e in launch.env)
    common = fill(_read("common.sh"), {
        "setup": "\n".join(launch.setup), "venv": venv, "master_port": port, "env": env,
        "task_function": task_function(spec, launch), "srun": srun_command(spec, launch)}, "common.sh")
    prologue = fill(_read("prologue.sh"), {"run_dir": shlex.quote(str(spec.run_dir)), "kind": spec.kind,
                                           "code_dir": shlex.quote(str(spec.code_dir))}, "prologue.sh")
    values = {"directives": "\n".join(sbatch_directives(spec, launch)), "config": spec.config_source,
              "prologue": prologue.rstrip("\n"), "common": common.rstrip("\n")}
    if spec.preemptible:
        values.update(requeue="1" if launch.requeue else "0", max_requeues=str(launch.max_requeues))
    return fill(_read(f"{spec.kind}.sbatch"), values, f"{spec.kind}.sbatch")


def _read(name: str) -> str:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"launch template {path} not found: the submit helper runs from a source checkout")
    return path.read_text()
