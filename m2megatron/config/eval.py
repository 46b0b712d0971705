"""Standalone evaluation: retrieval and zero-shot classification (docs/EVAL.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 64
    """Images or texts per feature-extraction batch per data-parallel rank (with PP > 1: per pipeline microbatch)."""
    reference_text_preprocessing: bool = True
    """Lower-case every eval text (captions, prompts) and turn curly double quotes into straight ones, as the
    reference eval does."""
    on_bad_input: Literal["error", "skip"] = "error"
    """A malformed caption line, missing image or empty caption list: stop with an error naming the file and
    line (error), or drop the sample, log it and count it in the results (skip). Undecodable images always stop."""
    decoder: Literal["pil", "dali", "auto"] = "pil"
    """Image decoder: PIL reproduces the reference's bicubic squash exactly; DALI (or auto) is faster on GPU."""
    num_workers: int = 4
    """Image-decoding threads per rank."""
    templates: str = "en"
    """Zero-shot prompt templates: 'en' (the 80 English ImageNet templates), 'zh' (Chinese templates) or a
    file with one template per line containing '{}'."""
    output_dir: str | None = None
    """Where results.json and results.md go; None = <train.run_dir>/eval."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 1:
            raise ConfigError(f"eval.num_workers: must be >= 1, got {self.num_workers}")
