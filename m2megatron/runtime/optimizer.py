"""Megatron-Core's optimizer and LR schedule, with our parameter groups.

No weight decay on norms, biases, position tables, the cls token and the logit scale: these are the
1-D parameters plus the position tables, matched by name so the rule survives renames of layers.
Per-parameter learning-rate multipliers (finetune.*) come in as more `config_overrides`
(runtime/finetune.py); parameters with requires_grad=False (locked) are left out by Megatron.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from m2megatron.config.optim import OptimConfig

_NO_DECAY_NAME_PARTS = ("position", "cls_token", "logit_scale")


def no_weight_decay(param: torch.nn.Parameter, name: str) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(p in name for p in _NO_DECAY_NAME_PARTS)


def megatron_optimizer_config(cfg: OptimConfig, *, distributed: bool,
                              params_dtype: torch.dtype = torch.float32) -> OptimizerConfig:
    """Megatron's optimizer config. bf16 / fp16 parameters get Megatron's mixed-precision optimizer: fp32 main
    weights (sharded over DP with the distributed optimizer) stepped from the fp32 main gradients, then copied
    back; fp16 adds dynamic loss scaling."""
    return OptimizerConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        sgd_momentum=0.0,
        clip_grad=cfg.clip_grad,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        initial_loss_scale=cfg.initial_loss_scale,
        min_loss_scale=cfg.min_loss_scale,
        loss_scale_window=cfg.loss_scale_window,
        hysteresis=cfg.hysteresis,
        use_distributed_optimizer=distributed,
    )


def build_optimizer(model_chunks: list, cfg: OptimConfig, pg_collection, *, distributed: bool = False,
                    params_dtype: torch.dtype = torch.float32, param_overrides: dict | None = None):
    """A MegatronOptimizer over all chunks' trainable parameters, weight decay off where it should be.
    `param_overrides`: more Megatron `config_overrides` (ParamKey → group settings), e.g. LR multipliers."""
    overrides = {
        ParamKey(with_name_predicate=ParamWithNamePredicate(name="m2_no_weight_decay", fn=no_weight_decay)):
            {"wd_mult": 0.0},
        **(param_overrides or {}),
    }
    return get_megatron_optimizer(
        megatron_optimizer_config(cfg, distributed=distributed, params_dtype=params_dtype),
        model_chunks,
        config_overrides=overrides,
        use_gloo_process_groups=False,
        pg_collection=pg_collection,
    )


def build_scheduler(optimizer, cfg: OptimConfig, train_steps: int) -> OptimizerParamScheduler:
    """Linear warm-up from 0, then cosine decay to min_lr at the last step; constant weight decay."""
    warmup = min(cfg.warmup_steps, max(train_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(train_steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant",
    )
