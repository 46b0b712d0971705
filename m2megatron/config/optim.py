"""Optimizer and learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer (Megatron-Core's get_megatron_optimizer); adam is AdamW with decoupled weight decay."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-5
    """Learning rate at the end of the decay (from optim.decay_steps on); unused by lr_schedule=constant."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to optim.lr over this many steps. With decay_steps unset and a run shorter than
    this (train.train_steps <= warmup_steps) it is cut to train_steps - 1; an explicit decay_steps must exceed it."""
    lr_schedule: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    """After the warm-up (Megatron-Core's OptimizerParamScheduler `lr_decay_style`): constant holds optim.lr;
    linear and cosine decay to min_lr at decay_steps; wsd (warmup-stable-decay) holds optim.lr, then decays
    to min_lr over the last wsd_decay_steps steps before decay_steps. After decay_steps the LR stays at min_lr."""
    decay_steps: int | None = None
    """Length of the schedule in steps, warm-up included (Megatron's lr_decay_steps): the LR reaches min_lr here.
    None: train.train_steps (Megatron-LM's default too). Set it to stop or extend a run without changing the
    schedule's shape; a resume continues the checkpoint's schedule unless override_schedule_on_resume."""
    wsd_decay_steps: int | None = None
    """lr_schedule=wsd: steps of the final decay (Megatron's wsd_decay_steps); required for wsd."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """lr_schedule=wsd: shape of the final decay (Megatron's lr_wsd_decay_style)."""
    override_schedule_on_resume: bool = False
    """On resume, take the schedule from these optim.* settings (lr, min_lr, warmup_steps, lr_schedule,
    decay_steps, weight_decay) instead of the checkpoint's, keeping the checkpoint's step count: for extending a
    run (Megatron-LM's --override-opt_param-scheduler). False (the default, Megatron's
    --use-checkpoint-opt_param-scheduler): the checkpoint's schedule continues."""
    weight_decay: float = 0.05
    """Weight decay (not applied to norms, biases, position tables, the cls token or the logit scale)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.98
    """Adam beta2."""
    adam_eps: float = 1e-6
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    initial_loss_scale: float = 2.0 ** 32
    """train.precision=fp16: the dynamic loss scale to start from."""
    min_loss_scale: float = 1.0
    """train.precision=fp16: the smallest loss scale dynamic scaling may reach."""
    loss_scale_window: int = 1000
    """train.precision=fp16: steps without overflow before the loss scale grows."""
    hysteresis: int = 2
    """train.precision=fp16: overflowing steps tolerated before the loss scale shrinks."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr: {self.min_lr} is above optim.lr={self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps: must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ConfigError(f"optim.decay_steps: {self.decay_steps} must exceed "
                              f"optim.warmup_steps={self.warmup_steps}")
        if self.lr_schedule == "wsd":
            self._check_wsd()
        elif self.wsd_decay_steps is not None:
            raise ConfigError(f"optim.wsd_decay_steps: only for optim.lr_schedule=wsd (got {self.lr_schedule})")

    def _check_wsd(self) -> None:
        if self.wsd_decay_steps is None or self.wsd_decay_steps < 1:
            raise ConfigError("optim.wsd_decay_steps: optim.lr_schedule=wsd needs the length of its final decay "
                              f"(a positive number of steps), got {self.wsd_decay_steps}")
        if self.decay_steps is not None and self.wsd_decay_steps > self.decay_steps - self.warmup_steps:
            raise ConfigError(f"optim.wsd_decay_steps: {self.wsd_decay_steps} is longer than the steps after the "
                              f"warm-up (decay_steps - warmup_steps = {self.decay_steps - self.warmup_steps})")
