"""The whole run config: one slice per concern, loaded from presets, YAML recipes and dotted overrides.

Resolution order: dataclass defaults → model preset → YAML recipe → `--section.field=value` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from m2megatron.config.base import ConfigError, to_dict, update_dataclass
from m2megatron.config.checkpoint import CheckpointConfig
from m2megatron.config.data import DataConfig
from m2megatron.config.eval import EvalConfig
from m2megatron.config.finetune import FinetuneConfig
from m2megatron.config.launch import LaunchConfig
from m2megatron.config.logging import LoggingConfig
from m2megatron.config.loss import LossConfig
from m2megatron.config.model import ModelConfig, preset
from m2megatron.config.optim import OptimConfig
from m2megatron.config.parallel import ParallelConfig
from m2megatron.config.train import TrainConfig

FP8_TOKEN_MULTIPLE = 16  # FP8 GEMMs (cuBLASLt through Transformer Engine) need dims divisible by 16


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model sizes and layer implementation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / DP layout and loss groups."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources, decoding and tokenization."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive-loss mode."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch sizes, precision, logging."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Phase timers, stragglers, loss spikes, wandb."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint saving and loading."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Locked towers, per-tower learning-rate multipliers, layer-wise learning-rate decay."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Slurm launch settings (m2megatron.launch.submit); ignored by the trainer."""

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Raise ConfigError naming the first bad setting; return self for chaining."""
        self.model.validate()
        self.parallel.validate(world_size, self.model.num_attention_heads, self.model.num_layers)
        for part in (self.data, self.loss, self.optim, self.train, self.logging, self.checkpoint, self.eval,
                     self.launch):
            part.validate()
        self.finetune.validate(self.model.num_layers, self.model.num_vl_layers)
        if self.loss.accumulation_steps > 1 and self.parallel.virtual_pipeline:
            raise ConfigError("loss.accumulation_steps: not supported together with parallel.virtual_pipeline")
        if world_size is not None:
            self._check_interleaved_microbatches(world_size)
        self._check_fp8_token_counts()
        if world_size is not None and self.train.global_batch_size is not None:
            dp = self.parallel.data_parallel(world_size)
            per_step = self.train.micro_batch_size * dp
            if self.train.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size: {self.train.global_batch_size} is not a multiple of "
                    f"micro_batch_size×DP = {self.train.micro_batch_size}×{dp}"
                )
            accumulation, num = self.loss.accumulation_steps, self.train.global_batch_size // per_step
            if accumulation > 1 and num != accumulation:  # the accumulated step runs exactly A microbatches
                raise ConfigError(
                    f"loss.accumulation_steps: {accumulation} needs exactly {accumulation} microbatches per step "
                    f"and rank, but train.global_batch_size={self.train.global_batch_size} gives {num} at "
                    f"micro_batch_size×DP = {self.train.micro_batch_size}×{dp}; set train.global_batch_size="
                    f"{accumulation * per_step}")
        return self

    def _check_interleaved_microbatches(self, world_size: int) -> None:
        """The interleaved schedule runs microbatches in groups of PP: a step needs a whole number of them."""
        vp, pp = self.parallel.virtual_pipeline, self.parallel.pipeline_parallel
        if not vp or world_size % (self.parallel.tensor_parallel * pp):
            return
        num = self.num_microbatches(world_size)
        if num % pp:
            per_group = self.train.micro_batch_size * self.parallel.data_parallel(world_size) * pp
            raise ConfigError(
                f"train.global_batch_size: the interleaved pipeline (parallel.virtual_pipeline={vp}) runs "
                f"microbatches in groups of parallel.pipeline_parallel={pp}, but a step has {num} per rank; "
                f"set train.global_batch_size to a multiple of micro_batch_size×DP×PP = {per_group}")

    def _check_fp8_token_counts(self) -> None:
        """FP8 GEMMs (Transformer Engine) need the token count of each segment, tokens·batch, to be a multiple
        of 16: 197·b image tokens for ViT-B/16 at 224, so b must be a multiple of 16 there."""
        if self.model.fp8 == "none":
            return
        segments = {"image": self.model.num_image_tokens, "text": self.model.max_text_len}
        for setting, batch in (("train.micro_batch_size", self.train.micro_batch_size),
                               ("eval.batch_size", self.eval.batch_size)):
            for segment, tokens in segments.items():
                if tokens * batch % FP8_TOKEN_MULTIPLE:
                    step = FP8_TOKEN_MULTIPLE // math.gcd(tokens, FP8_TOKEN_MULTIPLE)
                    raise ConfigError(
                        f"{setting}: {batch} gives {tokens}·{batch} {segment} tokens, not a multiple of "
                        f"{FP8_TOKEN_MULTIPLE} as FP8 GEMMs need (model.fp8={self.model.fp8!r}); use a multiple "
                        f"of {step}")

    def num_microbatches(self, world_size: int) -> int:
        """Microbatches per optimizer step on each data-parallel rank."""
        dp = self.parallel.data_parallel(world_size)
        if self.train.global_batch_size is None:
            return self.loss.accumulation_steps
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save(self, run_dir: str | Path) -> Path:
        """Write the resolved config as config.yaml (and config.json) into `run_dir`."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        (run_dir / "config.json").write_text(json.dumps(self.to_dict(), indent=2))
        return run_dir / "config.yaml"


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ['--a.b=1', '--c.d', 'x'] into the nested dict {'a': {'b': 1}, 'c': {'d': 'x'}}."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"{arg}: expected an override of the form --section.field=value")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"{key}: missing a value")
            raw, i = args[i + 1], i + 1
        i += 1
        key = key.replace("-", "_")
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] | dict | None = None,
                preset_name: str | None = None) -> RunConfig:
    """Build a RunConfig from an optional preset, YAML recipe (path or dict) and overrides."""
    values: dict[str, Any] = {}
    if recipe is not None:
        if isinstance(recipe, dict):
            values = recipe
        else:
            path = Path(recipe)
            if not path.is_file():
                raise ConfigError(f"config: recipe file {path} does not exist")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"config: {path} must hold a mapping at the top level")
    extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    name = (
        preset_name
        or extra.get("model", {}).get("preset")
        or values.get("model", {}).get("preset")
        or "tiny"
    )
    cfg = RunConfig(model=preset(name))
    cfg = update_dataclass(cfg, values)
    cfg = update_dataclass(cfg, extra)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, preset=name))
