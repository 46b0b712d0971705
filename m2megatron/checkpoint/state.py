"""What goes into a checkpoint: the sharded state dict of the model and the per-rank state (the optimizer's
part is in optimizer_state.py).

Storage keys are layout-free: Megatron modules name their ShardedTensors by global parameter names
(layers carry global numbers, TP slices carry global offsets), and the optimizer names its state
after the parameter it belongs to. That is what lets a checkpoint load at another TP/PP/DP.

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
from megatron.core.utils import unwrap_model

from m2megatron.parallel import rng

RNG_KEY = "m2.rank_state.rng"
USER_KEY = "m2.rank_state.user"
COMMON_KEY = "m2"


def grid(layout) -> tuple[int, int, int]:
    return layout.pipeline_parallel, layout.tensor_parallel, layout.data_parallel


def coordinates(groups) -> tuple[int, int, int]:
    return groups.pp_rank, groups.tp_rank, groups.dp_rank


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
