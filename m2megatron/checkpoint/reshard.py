"""Offline resharding: load a checkpoint at layout B (resharding on load) and save it again at B.

Tensor keys in our checkpoints are already layout-free, so any checkpoint of the plain optimizer loads
at any layout without this step. Resharding offline still helps when:
- the distributed optimizer's dp_reshardable state must move to another DP size before a run starts,
- the files should be written by B's ranks (each rank of B then reads mostly its own files),
- the per-rank state grid should match B (the saved rank states are kept in extra_state).

Every rank of B rebuilds the model and optimizer with a *builder* (the stage runtime from the saved
RunConfig; tests pass their own), so per-rank memory is this rank's shard of model and optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from m2megatron.checkpoint import atomic, manifest
from m2megatron.checkpoint.load import load_checkpoint
from m2megatron.checkpoint.save import save_checkpoint

log = logging.getLogger(__name__)


def build_m2_from_config(config: dict, groups):
    """This rank's M2 stage chunks + DDP + optimizer + scheduler, from a saved RunConfig dict (the runtime)."""
    from m2megatron.config.base import update_dataclass
    from m2megatron.config.run import RunConfig
    from m2megatron.runtime import build_stages

    stages = build_stages(update_dataclass(RunConfig(), config), groups, training=True, init=False)
    return stages.chunks, stages.optimizer, stages.scheduler


Builder = Callable[[dict, object], tuple]
"""(saved config dict, groups) → (model chunks, optimizer, scheduler) at the groups' layout."""


def reshard(src: str | Path, dst_root: str | Path, groups, *, build: Builder = build_m2_from_config,
            with_optimizer: bool = True, keep_last: int = 1) -> Path:
    """Collective over B's ranks (`groups`): load `src` and save it under `dst_root` at B's layout."""
    path = atomic.resolve(src)
    meta = manifest.read(path)
    chunks, opt, sched = build(meta["config"], groups)
    if not with_optimizer or meta["optimizer"]["kind"] == "none":
        opt = sched = None
    loaded = load_checkpoint(path, chunks, opt, sched if meta["has_scheduler"] else None, groups=groups,
                             config=meta["config"], restore_rng=True)
    extra = dict(loaded.extra_state)
    extra["resharded_from"] = {"path": str(path), "layout": meta["layout"]}
    rank_state = loaded.rank_state
    if not loaded.same_layout:
        # B's ranks cannot inherit A's per-rank state one to one; keep all of it for the data loader.
        extra["saved_rank_states"] = {",".join(map(str, k)): v for k, v in loaded.saved_rank_states.items()}
        rank_state = {}
    return save_checkpoint(dst_root, loaded.step, chunks, opt, sched if meta["has_scheduler"] else None,
                           groups=groups, config=meta["config"], extra_state=extra, rank_state=rank_state,
                           keep_last=keep_last)


def reshard_on_this_rank(src: str, dst: str, tp: int, pp: int, with_optimizer: bool,
                         build: Builder = build_m2_from_config) -> None:
    """Per-rank body of tools/reshard_checkpoint.py (module-level, so spawned ranks can import it)."""
    import time

    import torch.distributed as dist

    from m2megatron.parallel import Layout, build_groups

    started = time.perf_counter()
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    out = reshard(src, dst, groups, build=build, with_optimizer=with_optimizer)
    if dist.get_rank() == 0:
        print(f"resharded to {out} (TP {tp} × PP {pp} × DP {groups.layout.data_parallel}) in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
