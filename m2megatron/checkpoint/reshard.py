"""Offline resharding: load a checkpoint at layout B (resharding on load) and save it again at B.

Tensor keys in our checkpoints are already layout-free, so any checkpoint of the plain optimizer loads
at any layout without this step. Resharding offline still helps when:
- the distributed optimizer's dp_reshardable state must move to another DP size before a run starts,
- the files should be written by B's ranks (each rank of B then reads mostly its own files),
- the per-rank state grid should match B (the saved rank states are kept in extra_state).

Every rank of B rebuilds the model and optimizer with a *builder* ('m2' from the saved RunConfig, or
'toy' for tests and the benchmark), so per-rank memory is this rank's shard of model and optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from m2megatron.checkpoint import atomic, manifest
from m2megatron.checkpoint.load import load_checkpoint
from m2megatron.checkpoint.save import save_checkpoint

log = logging.getLogger(__name__)


def build_toy_from_config(config: dict, groups):
    from m2megatron.checkpoint.toy import build_toy

    toy = dict((config or {}).get("toy") or {})
    return build_toy(groups, **toy)


def build_m2_from_config(config: dict, groups):
    """M2Encoder stage for this rank + DDP + optimizer + scheduler, from a saved RunConfig dict."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from m2megatron.config.base import update_dataclass
    from m2megatron.config.run import RunConfig
    from m2megatron.models import M2Encoder, default_layer_ranges
    from m2megatron.train.optimizer import build_optimizer, build_scheduler

    cfg = update_dataclass(RunConfig(), config)
    pp = groups.layout.pipeline_parallel
    stage = M2Encoder(cfg.model, groups, pre_process=groups.is_first_stage, post_process=groups.is_last_stage,
                      layer_range=default_layer_ranges(cfg.model.num_layers, pp)[groups.pp_rank])
    distributed = cfg.parallel.distributed_optimizer
    ddp = DistributedDataParallel(stage.config, DistributedDataParallelConfig(use_distributed_optimizer=distributed),
                                  stage, pg_collection=groups.collection)
    opt = build_optimizer([ddp], cfg.optim, groups.collection, distributed=distributed)
    return [ddp], opt, build_scheduler(opt, cfg.optim, cfg.train.train_steps)


BUILDERS: dict[str, Callable] = {"m2": build_m2_from_config, "toy": build_toy_from_config}


def reshard(src: str | Path, dst_root: str | Path, groups, *, builder: str = "m2", with_optimizer: bool = True,
            keep_last: int = 1) -> Path:
    """Collective over B's ranks (`groups`): load `src` and save it under `dst_root` at B's layout."""
    path = atomic.resolve(src)
    meta = manifest.read(path)
    chunks, opt, sched = BUILDERS[builder](meta["config"], groups)
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


def reshard_on_this_rank(src: str, dst: str, tp: int, pp: int, builder: str, with_optimizer: bool) -> None:
    """Per-rank body of tools/reshard_checkpoint.py (module-level, so spawned ranks can import it)."""
    import time

    import torch.distributed as dist

    from m2megatron.parallel import Layout, build_groups

    started = time.perf_counter()
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp))
    out = reshard(src, dst, groups, builder=builder, with_optimizer=with_optimizer)
    if dist.get_rank() == 0:
        print(f"resharded to {out} (TP {tp} × PP {pp} × DP {groups.layout.data_parallel}) in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
