"""The training run: steps, batch sizes, precision, logging and where the run directory is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = "runs/tiny"
    """Run directory: resolved config, logs, metrics, TensorBoard events and checkpoints."""
    train_steps: int = 300
    """Optimizer steps to train."""
    micro_batch_size: int = 32
    """Samples per data-parallel rank per microbatch (b)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all data-parallel ranks; None = micro_batch_size × DP ×
    loss.accumulation_steps."""
    seed: int = 1234
    """Seed of initialisation, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp16", "bf16-autocast"] = "fp32"
    """Numerics as Megatron does them. fp32: everything fp32 (the CPU default). bf16 / fp16: parameters and
    the stage-to-stage activations in that dtype, fp32 main gradients in DDP and an optimizer with fp32 main
    weights (fp16 adds dynamic loss scaling, optim.*loss_scale*). bf16-autocast: fp32 parameters, gradients
    and activations between stages, the forward under torch.autocast(bf16)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: selective recomputes core attention only (Megatron's selective); full recomputes
    whole layers (train.recompute_method, train.recompute_num_layers)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """Full recompute: uniform checkpoints groups of recompute_num_layers layers over the whole stack; block
    recomputes the first recompute_num_layers layers of each stage's stack and keeps the others."""
    recompute_num_layers: int = 1
    """Full recompute: layers per checkpointed group (uniform) or layers recomputed per stage stack (block)."""
    log_interval: int = 10
    """Steps between log lines, metrics.jsonl records and TensorBoard points."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a NaN/Inf loss or gradient (each is skipped and logged)."""
    exit_interval: int | None = None
    """Stop after every step that is a multiple of this, with a checkpoint, as Megatron-LM's --exit-interval
    (the LR schedule still runs over train_steps; restart the run to go on). None: never."""
    exit_duration_minutes: float | None = None
    """Wall-clock budget in minutes, counted from the start of each rank's process: once it is used up, stop
    at the next step boundary, save and mark the run for a requeue as a preemption does (docs/SLURM.md), as
    Megatron-LM's --exit-duration-in-mins. Set it below the job's time limit by at least one step and one
    save. None: no budget."""
    eval_at_end: bool = True
    """Run zero-shot retrieval on the held-out set when training finishes and write results.json."""

    def validate(self) -> None:
        for name in ("train_steps", "micro_batch_size", "log_interval", "recompute_num_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ConfigError(f"train.exit_interval: must be >= 1 or null, got {self.exit_interval}")
        if self.exit_duration_minutes is not None and not self.exit_duration_minutes > 0:
            raise ConfigError(f"train.exit_duration_minutes: must be > 0 or null, got {self.exit_duration_minutes}")
