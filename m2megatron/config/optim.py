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
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
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
