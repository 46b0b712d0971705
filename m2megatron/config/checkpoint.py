"""Distributed checkpoints: where, how often, how many, and what a start from one takes over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from m2megatron.config.base import ConfigError

WEIGHTS_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
"""A released M2-Encoder checkpoint or a consolidated file: weights only, no optimizer or schedule."""


def is_weights_file(path: str | None) -> bool:
    """`checkpoint.load` names a single weights file (not one of our checkpoint directories)."""
    return path not in (None, "auto") and Path(path).suffix in WEIGHTS_FILE_SUFFIXES


@dataclass(kw_only=True)
class CheckpointConfig:
    save_dir: str | None = None
    """Checkpoint directory; None = run_dir/checkpoints."""
    save_interval: int = 0
    """Steps between checkpoints; 0 saves only at the end (and on a preemption signal)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a newer one is visible."""
    load: str | None = "auto"
    """Checkpoint to start from: 'auto' resumes from save_dir/latest if present, a path loads that,
    None starts fresh. A path may also be a single weights file (a released M2-Encoder .ckpt/.pt/.pth, or a
    consolidated .safetensors) with load_mode weights or finetune: the model's sizes then come from the file.
    A checkpoint of this run's own save_dir always wins: a preempted or requeued run resumes its own
    progress, whatever load names."""
    load_mode: Literal["resume", "weights", "finetune"] = "resume"
    """What a start from checkpoint.load takes over. resume: everything (model, optimizer, LR schedule, step,
    data position, RNG streams). weights: the model weights only; the optimizer (zero moments), LR schedule,
    step 0, data order and RNG start fresh, so the optimizer kind may differ. finetune: the model weights and
    the optimizer state (moments, fp32 main weights, Adam's own step count); the step counter, LR schedule
    (warm-up again, the current optim.* settings), data order and RNG start fresh. Resumes of this run's
    own checkpoints are always full resumes. A single weights file holds no optimizer state: finetune from one
    is the same as weights."""
    async_save: bool = False
    """Write checkpoints in the background while training continues."""

    @property
    def starts_from_file(self) -> bool:
        """The run starts from a single weights file (load names one, load_mode weights or finetune)."""
        return self.load_mode != "resume" and is_weights_file(self.load)

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")
        if self.save_interval < 0:
            raise ConfigError("checkpoint.save_interval: must be >= 0")
        if self.load_mode not in ("resume", "weights", "finetune"):
            raise ConfigError(f"checkpoint.load_mode: {self.load_mode!r} is not one of resume, weights, finetune")
        if self.load_mode != "resume" and self.load in (None, "auto"):
            raise ConfigError(f"checkpoint.load_mode: {self.load_mode} needs checkpoint.load to name the checkpoint "
                              f"to start from (got {self.load!r})")
        if self.load_mode == "resume" and is_weights_file(self.load):
            raise ConfigError(f"checkpoint.load: {self.load} is a single weights file, which cannot be resumed; "
                              "start from it with checkpoint.load_mode=weights (or finetune)")
