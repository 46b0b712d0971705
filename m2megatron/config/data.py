"""Where training and eval data come from and how it is decoded and tokenized."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["synthetic", "webdataset"] = "synthetic"
    """Training data: the built-in synthetic bilingual scenes, or webdataset tar shards."""
    shards: list[str] = field(default_factory=list)
    """Webdataset shard paths or globs (source=webdataset)."""
    tokenizer: str | None = None
    """SentencePiece model path. None: the reference sp.model for released sizes; for the synthetic source a small model trained on its captions and cached in the run directory."""
    decoder: Literal["auto", "dali", "pil"] = "auto"
    """Image decoder: DALI (mixed on GPU, cpu otherwise) when installed (auto), or PIL."""
    num_workers: int = 1
    """Decoder threads per rank."""
    augment: bool = False
    """Training augmentation (random resized crop scale 0.8–1 and horizontal flip) instead of the eval squash."""
    synthetic_train_samples: int = 8192
    """Size of the synthetic training set (samples per epoch)."""
    synthetic_eval_samples: int = 256
    """Size of the held-out synthetic eval set (a seed disjoint from training)."""
    language: Literal["en", "zh", "both"] = "both"
    """Caption language of synthetic data: English, Chinese, or a random mix."""

    def validate(self) -> None:
        if self.source == "webdataset" and not self.shards:
            raise ConfigError("data.shards: source=webdataset needs at least one shard path")
        if self.num_workers < 1:
            raise ConfigError(f"data.num_workers: must be >= 1, got {self.num_workers}")
