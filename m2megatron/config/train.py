"""The training run: steps, batch sizes, precision, logging and where the run directory is."""

from __future__ import annotations

from dataclasses import dataclass

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
    bf16: bool = False
    """bf16 autocast of the forward on GPU (fp32 parameters, gradients and optimizer); no effect on CPU."""
    recompute: bool = False
    """Full activation recompute of every transformer layer."""
    log_interval: int = 10
    """Steps between log lines, metrics.jsonl records and TensorBoard points."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive steps with a NaN/Inf loss or gradient (each is skipped and logged)."""
    eval_at_end: bool = True
    """Run zero-shot retrieval on the held-out set when training finishes and write results.json."""

    def validate(self) -> None:
        for name in ("train_steps", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
