"""The fine-tuning controls of `finetune.*` (config/finetune.py) on this rank's parameters, by name.

A parameter's place is (part, group, groups of the part): the vision tower and the text tower are each
[embedding, layer 0, ..., layer L-1, head], the head being the tower's final LayerNorm and its projection;
the VL block is [layer 0, ..., layer V-1, final LayerNorm]. Layer names carry the global layer index on
every pipeline stage, so every layout places a parameter the same way.

- Locking sets `requires_grad=False` before Megatron's DDP is built: DDP then gives the parameter no
  gradient buffer, and Megatron's optimizer (plain and distributed) leaves it out of its parameter groups,
  so it gets no optimizer state and no fp32 main copy.
- LR multipliers go into Megatron's parameter groups through `get_megatron_optimizer`'s `config_overrides`:
  `max_lr` and `min_lr` scaled (what Megatron-Core 0.16's OptimizerParamScheduler reads per group, so every
  value of the warm-up and decay is scaled) and `lr_mult` (what Megatron matches groups by in checkpoints).
"""

from __future__ import annotations

import logging
import re

import torch
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from m2megatron.config.finetune import PARTS, FinetuneConfig, part_groups
from m2megatron.config.model import ModelConfig

log = logging.getLogger(__name__)
_TOWER = re.compile(r"(vision|text)_(embedding|layers\.(\d+)|final_norm|projection)\.")
_VL = re.compile(r"vl_(layers\.(\d+)|final_norm)\.")
_PART = {"vision": "image", "text": "text"}


def local_name(name: str) -> str:
    """The parameter's name in the stage module (DDP's `module.` prefixes removed)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def place(name: str, cfg: ModelConfig) -> tuple[str, int, int] | None:
    """(part, group, number of groups) of a parameter of the M2 stage module; None for the logit scale."""
    name = local_name(name)
    if m := _TOWER.match(name):
        groups = part_groups("image", cfg.num_layers, cfg.num_vl_layers)
        kind, layer = m.group(2), m.group(3)
        group = 0 if kind == "embedding" else int(layer) + 1 if layer is not None else groups - 1
        return _PART[m.group(1)], group, groups
    if m := _VL.match(name):
        groups = part_groups("vl", cfg.num_layers, cfg.num_vl_layers)
        return "vl", (int(m.group(2)) if m.group(2) is not None else groups - 1), groups
    if name == "logit_scale":
        return None
    raise ValueError(f"finetune: parameter {name!r} belongs to no part of the model (image, text, vl)")


def is_locked(name: str, cfg: ModelConfig, ft: FinetuneConfig) -> bool:
    """Whether `finetune.lock_*` freezes this parameter (its part is locked and it is below the top
    `lock_*_unlocked_groups` groups)."""
    where = place(name, cfg)
    if where is None:
        return False
    part, group, groups = where
    return group < ft.locked_groups(part, groups)


def lr_mult(name: str, cfg: ModelConfig, ft: FinetuneConfig) -> float:
    """The part's multiplier times, in a tower, layer_decay ** (groups above this one)."""
    where = place(name, cfg)
    return 1.0 if where is None else _mult(ft, *where)


def _mult(ft: FinetuneConfig, part: str, group: int, groups: int) -> float:
    mult = getattr(ft, f"{part}_lr_mult")
    return mult if part == "vl" else mult * getattr(ft, f"{part}_layer_decay") ** (groups - 1 - group)


def lock_parameters(modules: list[torch.nn.Module], cfg: ModelConfig, ft: FinetuneConfig) -> int:
    """Set requires_grad=False on every locked parameter (before DDP); return how many elements were locked."""
    if not ft.locks_anything:
        return 0
    locked = total = 0
    for module in modules:
        for name, param in module.named_parameters():
            total += param.numel()
            if is_locked(name, cfg, ft):
                param.requires_grad_(False)
                locked += param.numel()
    kept = {part: getattr(ft, f"lock_{part}_unlocked_groups") for part in PARTS if getattr(ft, f"lock_{part}")}
    parts = ", ".join(part + (f" (its top {n} groups trainable)" if n else "") for part, n in kept.items())
    log.info("finetune: locked %s: %d of this rank's %d parameters", parts, locked, total)
    return locked


def lr_overrides(cfg: ModelConfig, ft: FinetuneConfig, lr: float, min_lr: float) -> dict:
    """Megatron `config_overrides` giving each parameter its multiplier: one ParamKey per distinct value.

    The same keys on every rank (Megatron aligns the parameter groups over ranks): the values come from the
    config, not from the parameters this rank holds.
    """
    counts = {part: part_groups(part, cfg.num_layers, cfg.num_vl_layers) for part in PARTS}
    values = sorted({_mult(ft, part, g, n) for part, n in counts.items() for g in range(n)} - {1.0})
    overrides = {}
    for value in values:
        def matches(param, name, value=value):
            return lr_mult(name, cfg, ft) == value

        key = ParamKey(with_name_predicate=ParamWithNamePredicate(name=f"m2_lr_mult_{value!r}", fn=matches))
        overrides[key] = {"lr_mult": value, "max_lr": lr * value, "min_lr": min_lr * value}
    return overrides
