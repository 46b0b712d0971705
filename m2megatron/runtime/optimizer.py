"""Megatron-Core's optimizer and LR schedule (constant, linear, cosine or WSD after a linear warm-up), with our
parameter groups.

No weight decay on norms, biases, position tables, the cls token and the logit scale: these are the
1-D parameters plus the position tables, matched by name so the rule survives renames of layers.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from m2megatron.config.base import ConfigError
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
                    params_dtype: torch.dtype = torch.float32):
    """A MegatronOptimizer over all chunks' parameters, weight decay off where it should be."""
    overrides = {
        ParamKey(with_name_predicate=ParamWithNamePredicate(name="m2_no_weight_decay", fn=no_weight_decay)):
            {"wd_mult": 0.0}
    }
    return get_megatron_optimizer(
        megatron_optimizer_config(cfg, distributed=distributed, params_dtype=params_dtype),
        model_chunks,
        config_overrides=overrides,
        use_gloo_process_groups=False,
        pg_collection=pg_collection,
    )


_MEGATRON_DECAY_STYLE = {"constant": "constant", "linear": "linear", "cosine": "cosine", "wsd": "WSD"}


def schedule_steps(cfg: OptimConfig, train_steps: int) -> tuple[int, int]:
    """(warm-up, decay) steps: optim.decay_steps, or train.train_steps when unset (warm-up cut below it)."""
    if cfg.decay_steps is not None:
        return cfg.warmup_steps, cfg.decay_steps
    warmup = min(cfg.warmup_steps, max(train_steps - 1, 0))
    return warmup, max(train_steps, warmup + 1)


def build_scheduler(optimizer, cfg: OptimConfig, train_steps: int) -> OptimizerParamScheduler:
    """Megatron's OptimizerParamScheduler: linear warm-up from 0, then optim.lr_schedule until the schedule's
    end (schedule_steps); constant weight decay. On resume the checkpoint's schedule wins unless
    optim.override_schedule_on_resume (Megatron's use-checkpoint / override switches)."""
    warmup, decay = schedule_steps(cfg, train_steps)
    if cfg.lr_schedule == "wsd" and cfg.wsd_decay_steps > decay - warmup:
        raise ConfigError(f"optim.wsd_decay_steps: {cfg.wsd_decay_steps} is longer than the {decay - warmup} steps "
                          f"after the warm-up of a {decay}-step schedule (optim.decay_steps or train.train_steps)")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=_MEGATRON_DECAY_STYLE[cfg.lr_schedule],
        wsd_decay_steps=cfg.wsd_decay_steps,
        lr_wsd_decay_style=cfg.wsd_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not cfg.override_schedule_on_resume,
        override_opt_param_scheduler=cfg.override_schedule_on_resume,
    )
