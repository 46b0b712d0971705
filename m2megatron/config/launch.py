"""Slurm launch settings, read by `python -m m2megatron.launch.submit` (docs/SLURM.md). The trainer ignores them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from m2megatron.config.base import ConfigError, require_at_least

_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(kw_only=True)
class LaunchConfig:
    mode: Literal["torchrun", "srun"] = "torchrun"
    """How ranks start: 'torchrun' = one Slurm task per node running torchrun, which spawns procs_per_node
    ranks; 'srun' = one Slurm task per rank (rank from SLURM_PROCID)."""
    nodes: int = 1
    """Nodes of the training job (sbatch --nodes)."""
    procs_per_node: int = 1
    """Ranks per node, one per GPU on GPU nodes. World size = nodes × procs_per_node."""
    gpus_per_node: int = 0
    """GPUs requested per node (sbatch --gpus-per-node); 0 requests none."""
    gpu_memory_gib: float = 79.6
    """Usable memory per GPU in GiB, for the dry run's check (what torch sees on an H100 80 GB; 139.8 on an
    H200 141 GB)."""
    cpus_per_task: int | None = None
    """CPUs per Slurm task (sbatch and srun --cpus-per-task); in torchrun mode the task is the whole node.
    None: site default."""
    mem: str | None = None
    """Memory per node (sbatch --mem), e.g. '0' for all of it or '900G'; None: site default."""
    time: str = "01:00:00"
    """Time limit (sbatch --time): minutes, HH:MM:SS or D-HH:MM:SS."""
    partition: str | None = None
    """Slurm partition; None: the cluster's default."""
    account: str | None = None
    """Slurm account to charge; None: the user's default."""
    qos: str | None = None
    """Slurm quality of service; None: the default."""
    constraint: str | None = None
    """Node feature constraint (sbatch --constraint), e.g. 'h100'."""
    exclusive: bool = False
    """Ask for whole nodes (sbatch --exclusive)."""
    job_name: str | None = None
    """Job name; None: 'm2-<kind>-<run directory name>'."""
    venv: str | None = None
    """Virtual environment whose bin/python runs the job on every node; None: python3 from PATH (or the container's)."""
    container: str | None = None
    """Container image for every task (pyxis/enroot srun --container-image); None runs on the host."""
    container_mounts: list[str] = field(default_factory=list)
    """Extra pyxis mounts 'SRC:DST'; the run directory is always mounted at its own path."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run at the top of every batch script, e.g. 'module load cuda/12.4'."""
    env: list[str] = field(default_factory=list)
    """'KEY=VALUE' exported in every batch script before the ranks start (NCCL settings, OMP_NUM_THREADS)."""
    master_port: int | None = None
    """Rendezvous port; None: 20000 + job id % 20000 (the same rule as m2megatron.parallel.bootstrap)."""
    signal_seconds: int = 300
    """Seconds before the time limit at which Slurm sends SIGUSR1 to the batch shell (--signal=B:USR1@N),
    which asks the trainer to checkpoint and requeue; 0 disables it."""
    requeue: bool = True
    """Requeue the training job after a preemption checkpoint (sbatch --requeue + scontrol requeue)."""
    max_requeues: int = 20
    """Stop requeueing after this many restarts of one job (SLURM_RESTART_COUNT)."""
    snapshot: bool = True
    """Copy the source tree into run_dir/code at submission and run every attempt from that copy."""
    sbatch_extra: list[str] = field(default_factory=list)
    """Extra sbatch options written verbatim as '#SBATCH <option>' lines, e.g. '--reservation=big'."""
    srun_extra: list[str] = field(default_factory=list)
    """Extra srun options for the job step, e.g. '--cpu-bind=none'."""
    train_module: str = "m2megatron.train"
    """Module the training job runs with python -m."""
    train_args: list[str] = field(default_factory=lambda: ["--config", "{run_dir}/config.yaml"])
    """Arguments of the training module; {run_dir} is replaced by the absolute run directory."""
    eval_module: str = "m2megatron.eval.retrieval"
    """Module the chained eval job runs with python -m."""
    eval_args: list[str] = field(default_factory=lambda: [
        "--config", "{run_dir}/config.yaml", "--checkpoint", "{run_dir}/checkpoints", "--out", "{run_dir}/eval"])
    """Arguments of the eval module; {run_dir} is replaced by the absolute run directory."""
    eval_nodes: int = 1
    """Nodes of the chained eval job (it uses procs_per_node ranks per node)."""
    eval_time: str = "00:30:00"
    """Time limit of the chained eval job."""
    reshard_module: str = "m2megatron.checkpoint.reshard"
    """Module the offline reshard job runs with python -m; its arguments come after '--' on the submit command
    line: SRC DST --tp T --pp P [--vp V] [--no-optimizer] ({run_dir} is replaced; the ranks are the job's)."""

    @property
    def tasks_per_node(self) -> int:
        """Slurm tasks per node: 1 torchrun agent per node, or one task per rank."""
        return 1 if self.mode == "torchrun" else self.procs_per_node

    def world_size(self, nodes: int | None = None) -> int:
        return (self.nodes if nodes is None else nodes) * self.procs_per_node

    def validate(self) -> None:
        require_at_least("launch", self, ("nodes", "procs_per_node", "eval_nodes"), 1)
        if self.gpu_memory_gib <= 0:
            raise ConfigError(f"launch.gpu_memory_gib: must be positive, got {self.gpu_memory_gib}")
        require_at_least("launch", self, ("gpus_per_node", "signal_seconds", "max_requeues"), 0)
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"launch.cpus_per_task: must be >= 1 or null, got {self.cpus_per_task}")
        for name in ("time", "eval_time"):
            if not _TIME.match(getattr(self, name)):
                raise ConfigError(f"launch.{name}: {getattr(self, name)!r} is not a Slurm time "
                                  "(minutes, HH:MM:SS or D-HH:MM:SS)")
        bad = [e for e in self.env if not _ENV.match(e)]
        if bad:
            raise ConfigError(f"launch.env: {bad[0]!r} is not of the form KEY=VALUE")
        if self.master_port is not None and not 1024 <= self.master_port <= 65535:
            raise ConfigError(f"launch.master_port: {self.master_port} is not in 1024..65535")
        for name in ("train_module", "eval_module", "reshard_module"):
            if not re.match(r"^[A-Za-z_][\w.]*$", getattr(self, name)):
                raise ConfigError(f"launch.{name}: {getattr(self, name)!r} is not a Python module name")
