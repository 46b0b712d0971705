"""Typed, documented configuration: one dataclass per concern, presets, YAML recipes, CLI overrides."""

from m2megatron.config.base import ConfigError, field_docs
from m2megatron.config.checkpoint import CheckpointConfig
from m2megatron.config.data import DataConfig
from m2megatron.config.eval import EvalConfig
from m2megatron.config.logging import LoggingConfig
from m2megatron.config.loss import LossConfig
from m2megatron.config.model import PRESETS, ModelConfig, count_parameters, preset
from m2megatron.config.optim import OptimConfig
from m2megatron.config.parallel import ParallelConfig
from m2megatron.config.run import RunConfig, load_config, parse_overrides
from m2megatron.config.train import TrainConfig

__all__ = [
    "PRESETS", "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "count_parameters", "field_docs",
    "load_config", "parse_overrides", "preset",
]
