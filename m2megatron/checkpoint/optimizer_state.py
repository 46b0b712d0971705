"""The optimizer's part of a checkpoint: Megatron-Core's formats, and what makes them work with torch Adam
(CPU hosts, GPU hosts without Transformer Engine) and with TE's FusedAdam (NGC GPU hosts).

Formats, all stored under layout-free keys named after the model parameter:

- plain Megatron optimizer (FP32Optimizer, Float16OptimizerWithFloat16Params): one ShardedTensor per state
  tensor, `optimizer.state.exp_avg.<param key>` and `.exp_avg_sq.`, plus `optimizer.state.fp32_param.<key>`
  (the fp32 main weights) for bf16/fp16 parameters. Reshards over TP, PP and DP.
- DistributedOptimizer, `fully_reshardable` (what we write; Megatron-LM's `--dist-ckpt-optim-fully-reshardable`):
  at save, each DP group all-gathers its shards of the main weights and Adam moments and stores them per
  parameter in the parameter's own shape and TP sharding, `optimizer.state.param.<key>` (the fp32 main
  weights, also for bf16/fp16 parameters), `.exp_avg.` and `.exp_avg_sq.`; at load every rank reads the
  slices of its parameters (the fully parallel loader splits the reading over DP) and keeps its DP range.
  Reshards over TP, PP and DP. The step and hyper-parameters are in common.pt.
- DistributedOptimizer, `dp_reshardable` (written before issue 15): the flat DP buckets; they load at
  another DP size but only at the saved TP×PP.

Megatron-Core 0.16.1 with torch Adam has three gaps, closed here:
- a never-stepped optimizer has no state, which save and load both need (`ensure_state`);
- the fully reshardable load copies every per-parameter state of the inner optimizer from the checkpoint,
  torch Adam's own `step` included, which is not in it (KeyError 'step'; `fully_reshardable_load`);
- after a distributed-optimizer load, torch Adam's per-parameter steps are wrong (`restore_adam_steps`).
TE's FusedAdam keeps its step in the param groups and its moments per parameter; it needs only the first.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

FULLY_RESHARDABLE = "fully_reshardable"
DP_RESHARDABLE = "dp_reshardable"
DIST_OPT_FORMATS = (FULLY_RESHARDABLE, DP_RESHARDABLE)
"""Distributed-optimizer formats we load."""
WRITE_FORMAT = FULLY_RESHARDABLE
"""The distributed-optimizer format new checkpoints are written in (tests set dp_reshardable to make an
old-style checkpoint)."""


def parts(optimizer) -> list:
    """The Megatron optimizers inside `optimizer` (a ChainedOptimizer holds several)."""
    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def kind(optimizer) -> str:
    """'distributed' (Megatron DistributedOptimizer inside), 'plain', or 'none'."""
    if optimizer is None:
        return "none"
    return "distributed" if any(isinstance(p, DistributedOptimizer) for p in parts(optimizer)) else "plain"


def sharding_metadata(groups, optimizer, dist_opt_format: str | None = None) -> dict:
    """The `metadata` argument of every sharded_state_dict call (model and optimizer); the distributed
    optimizer's format is WRITE_FORMAT unless given (a load names the saved one)."""
    meta = {"dp_cp_group": groups.collection.dp_cp}
    if kind(optimizer) == "distributed":
        meta["distrib_optim_sharding_type"] = dist_opt_format or WRITE_FORMAT
    return meta


def _inner_optimizers(optimizer):
    for part in parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            yield part, inner


def _is_torch_adam(inner) -> bool:
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW)


def ensure_state(optimizer) -> None:
    """Give a never-stepped Adam (inside any Megatron optimizer) its initial state: zero moments (and step 0).

    Needed on both sides: a save before the first step would store no moments, which a later load asks
    for; and the distributed optimizer's state_dict / fully reshardable gather read every parameter's
    moments. Zero moments are exactly what Adam starts from, so no number changes. torch Adam gets a
    per-parameter `step` of 0; TE's FusedAdam builds its own state (`initialize_state`: moments, and the
    master weights when it keeps them) and keeps its step in the param groups, where it is absent until
    the first step; other fused Adams get zero moments.
    """
    for _, inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if inner.state[p]:
                    continue
                if _is_torch_adam(inner):
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
                elif hasattr(inner, "initialize_state"):  # TE FusedAdam
                    _te_initialize_state(inner, p)
                elif "betas" in group:  # another fused Adam (apex): moments only
                    inner.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _te_initialize_state(inner, param) -> None:
    """TE FusedAdam's own state initialization, as its first step would do it."""
    remainders = bool(getattr(inner, "store_param_remainders", False)) and param.dtype == torch.bfloat16
    try:
        inner.initialize_state(param, remainders)
    except TypeError:  # TE < 2.1: initialize_state(param)
        inner.initialize_state(param)


@contextlib.contextmanager
def fully_reshardable_load(optimizer):
    """Around `optimizer.load_state_dict` of a fully reshardable checkpoint with torch Adam inside.

    Megatron-Core 0.16.1 (and Megatron-LM main as of 2026-11) copies every per-parameter state tensor of
    the inner optimizer from the checkpoint, but the checkpoint has no per-parameter `step` (it keeps one
    in the param groups); torch Adam has one, so the load fails with KeyError 'step'. Here each
    DistributedOptimizer with torch Adam inside copies what the checkpoint holds and keeps its step (set
    from the param groups by Megatron's load_state_dict, then made per-parameter by restore_adam_steps).
    TE's FusedAdam has no per-parameter step and is left alone.
    """
    patched = []
    for part in parts(optimizer):
        if isinstance(part, DistributedOptimizer) and _is_torch_adam(part.optimizer):
            original = part._set_main_param_and_optimizer_states
            part._set_main_param_and_optimizer_states = _keeping_own_step(part, original)
            patched.append(part)
    try:
        yield
    finally:
        for part in patched:
            del part._set_main_param_and_optimizer_states  # back to the class's method


def _keeping_own_step(part: DistributedOptimizer, original):
    def set_main_param_and_optimizer_states(model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = part.model_param_group_index_map[model_param]
            main_param = part.optimizer.param_groups[group_index]["params"][group_order]
            step = part.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}  # copied onto itself
        original(model_param, tensors)
    return set_main_param_and_optimizer_states


def restore_adam_steps(optimizer) -> None:
    """After a load, give every parameter of a DistributedOptimizer's torch Adam its own, correct `step`.

    Without TE/apex, DistributedOptimizer (0.16.1) keeps the step in its param groups in the checkpoint,
    but does not reliably put it back into torch Adam's per-parameter state (found by the exact-resume
    test: the step stayed at its pre-load value), and where it does, it assigns ONE tensor to all
    parameters, which Adam then increments once per parameter per step.
    """
    for part in parts(optimizer):
        if not isinstance(part, DistributedOptimizer):
            continue
        for group in part.optimizer.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                param_state = part.optimizer.state[p]
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"] = torch.tensor(float(group["step"]), dtype=param_state["step"].dtype)


def fill_missing_common_step(optimizer_state) -> None:
    """Put back the Adam step that Megatron drops when it is 0 (a save before the first step).

    FP32Optimizer.sharded_state_dict stores the shared step only `if step:`, and a tensor 0 is falsy;
    torch Adam's load_state_dict then fails on the missing 'step'.
    """
    if isinstance(optimizer_state, list):
        for part in optimizer_state:
            fill_missing_common_step(part)
        return
    if not isinstance(optimizer_state, dict):
        return
    if "state" in optimizer_state and "param_groups" in optimizer_state:
        per_param = [v for k, v in optimizer_state["state"].items() if k != "common_step" and isinstance(v, dict)]
        if per_param and "common_step" not in optimizer_state["state"] and not any("step" in v for v in per_param):
            optimizer_state["state"]["common_step"] = torch.tensor(0.0)
        return
    for value in optimizer_state.values():
        fill_missing_common_step(value)


def load_loaded_state(optimizer, loaded_state, dist_opt_format: str | None) -> None:
    """Put a state loaded by dist_checkpointing into `optimizer` (under torch.no_grad)."""
    fill_missing_common_step(loaded_state)
    fix = fully_reshardable_load(optimizer) if dist_opt_format == FULLY_RESHARDABLE else contextlib.nullcontext()
    with fix:
        optimizer.load_state_dict(loaded_state)
    restore_adam_steps(optimizer)
