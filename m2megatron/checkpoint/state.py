"""What goes into a checkpoint: the sharded state dict of model, optimizer and per-rank state.

Storage keys are layout-free: Megatron modules name their ShardedTensors by global parameter names
(layers carry global numbers, TP slices carry global offsets), and the plain optimizer names its
state after the parameter it belongs to. That is what lets a checkpoint load at another TP/PP/DP.

Per-rank non-tensor state (RNG streams, the data loader's position) is stored as ShardedObjects
indexed by the rank's (pp, tp, dp) coordinates in a (PP, TP, DP) grid, so each rank's state has its
own key and the grid's shape records the layout that wrote it. At the same layout every rank gets
its own state back; at another layout the grid does not fit, and the loader gets every saved rank's
state to redistribute (see dist.load_checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from m2megatron.parallel import rng

RNG_KEY = "m2.rank_state.rng"
USER_KEY = "m2.rank_state.user"
COMMON_KEY = "m2"
DIST_OPT_FORMAT = "dp_reshardable"


def grid(layout) -> tuple[int, int, int]:
    return layout.pipeline_parallel, layout.tensor_parallel, layout.data_parallel


def coordinates(groups) -> tuple[int, int, int]:
    return groups.pp_rank, groups.tp_rank, groups.dp_rank


def optimizer_kind(optimizer) -> str:
    """'distributed' (Megatron DistributedOptimizer inside), 'plain', or 'none'."""
    if optimizer is None:
        return "none"
    parts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return "distributed" if any(isinstance(p, DistributedOptimizer) for p in parts) else "plain"


def sharding_metadata(groups, optimizer) -> dict:
    """The `metadata` argument of every sharded_state_dict call (model and optimizer)."""
    meta = {"dp_cp_group": groups.collection.dp_cp}
    if optimizer_kind(optimizer) == "distributed":
        # The default format cannot be saved by torch_dist in 0.16.1 (notes row g).
        meta["distrib_optim_sharding_type"] = DIST_OPT_FORMAT
    return meta


def model_sharded_state_dict(model_chunks: list, metadata: dict) -> dict:
    """{'model': chunk-0 state} or {'model': {'chunk0': ..., 'chunk1': ...}} for virtual pipeline stages.

    Wrappers (DDP, Float16Module) are peeled off first, so keys are the same with and without them.
    """
    model_chunks = unwrap_model(model_chunks)
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict(prefix="", metadata=metadata)}
    return {"model": {f"chunk{i}": c.sharded_state_dict(prefix="", metadata=metadata)
                      for i, c in enumerate(model_chunks)}}


def load_model_state(model_chunks: list, loaded: dict) -> None:
    model_chunks = unwrap_model(model_chunks)
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"], strict=True)
        return
    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)


# --- per-rank objects ------------------------------------------------------------------------------

def rank_object(key: str, data, grid_shape: tuple, coords: tuple) -> ShardedObject:
    return ShardedObject(key, data, tuple(grid_shape), tuple(coords), replica_id=0)


def all_grid_coords(grid_shape: tuple) -> list[tuple[int, int, int]]:
    pp, tp, dp = grid_shape
    return [(p, t, d) for p in range(pp) for t in range(tp) for d in range(dp)]


def rng_to_safe(state: dict) -> dict:
    """rng.capture() with the numpy array made a tensor, so weights_only loading can read it back."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                    float(cached))
    return out


def rng_from_safe(state: dict) -> dict:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    out["python"] = _tuples(state["python"])
    return out


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def capture_rng() -> dict:
    return rng_to_safe(rng.capture())


def restore_rng(state: dict) -> None:
    rng.restore(rng_from_safe(state))


def model_tensor_shapes(model_state: dict) -> dict[str, dict]:
    """{storage key: {'shape', 'dtype'}} of every ShardedTensor in this rank's model state."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for value in nested_values(model_state):
        if isinstance(value, ShardedTensor):
            out[value.key] = {"shape": list(value.global_shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return out


def gather_model_tensor_shapes(model_state: dict) -> dict[str, dict]:
    """The union over all ranks of model_tensor_shapes (a collective on the default group)."""
    import torch.distributed as dist

    mine = model_tensor_shapes(model_state)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict[str, dict] = {}
    for part in parts:
        merged.update(part)
    return dict(sorted(merged.items()))


def ensure_optimizer_state(optimizer) -> None:
    """Give a never-stepped torch Adam (inside any Megatron optimizer) its initial state: zero moments, step 0.

    Needed on both sides: a save before the first step would otherwise store no moments, which a later
    load then asks for; and without TE/apex, DistributedOptimizer.state_dict() (called while building
    the load state dict) asserts that every parameter has a 'step'. Zero moments and step 0 are exactly
    what Adam starts from, so this changes no numbers.
    """
    parts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for part in parts:
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def restore_optimizer_steps(optimizer) -> None:
    """After a load, give every parameter of a DistributedOptimizer's torch Adam its own, correct 'step'.

    Without TE/apex, DistributedOptimizer (0.16.1) keeps the step in its param_groups in the checkpoint,
    but does not reliably put it back into torch Adam's per-parameter state (found by the exact-resume
    test: the step stayed at its pre-load value), and where it does, it assigns ONE tensor to all
    parameters, which Adam then increments once per parameter per step.
    """
    parts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for part in parts:
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
