"""Offline resharding: load a checkpoint at layout B (resharding on load) and save it again at B.

    python -m m2megatron.checkpoint.reshard SRC DST --tp 1 --pp 2 [--world-size 2] [--no-optimizer]

Tensor keys in our checkpoints are layout-free, so any checkpoint (model, plain optimizer, and the
distributed optimizer's fully reshardable state) loads at any layout without this step. Resharding offline
still helps when:
- an older checkpoint's distributed-optimizer state (dp_reshardable buckets) must move to another DP size
  before a run starts,
- the files should be written by B's ranks (each rank of B then reads mostly its own files),
- the per-rank state should match B: RNG streams are re-derived for B's ranks from (seed, step), as a
  resume at B would, and the saved rank states are kept in extra_state for the data loader.

Every rank of B rebuilds the model and optimizer with a *builder* (the stage runtime from the saved
RunConfig; tests pass their own), so per-rank memory is this rank's shard of model and optimizer.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable
from pathlib import Path

from m2megatron.checkpoint import atomic, manifest
from m2megatron.checkpoint.load import load_checkpoint
from m2megatron.checkpoint.save import save_checkpoint
from m2megatron.config.base import InputError

log = logging.getLogger(__name__)


PROG = "python -m m2megatron.checkpoint.reshard"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


def argument_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The reshard tool's command line (its __main__, tools/reshard_checkpoint.py, the Slurm reshard job)."""
    p = _Parser(prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, or a root with a 'latest' pointer")
    p.add_argument("dst", help="root to write the resharded checkpoint into (iter_NNNNNNN + latest)")
    p.add_argument("--tp", type=int, default=1, help="target tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    p.add_argument("--vp", type=int, default=None, help="target virtual pipeline stages per rank")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks of the target layout: a plain start spawns them (default TP × PP); under torchrun or "
                        "srun the launcher's world size (must match if given)")
    p.add_argument("--no-optimizer", action="store_true", help="write model weights (and counters) only")
    return p


def check_job_arguments(args: list[str], world_size: int) -> argparse.Namespace:
    """The arguments of a reshard job of `world_size` ranks, checked before it is queued (InputError)."""
    parsed = argument_parser().parse_args(args)
    if parsed.world_size is not None and parsed.world_size != world_size:
        raise InputError(f"{PROG}: --world-size {parsed.world_size}, but the job starts {world_size} ranks "
                         "(launch.nodes × launch.procs_per_node)")
    if parsed.tp < 1 or parsed.pp < 1 or world_size % (parsed.tp * parsed.pp):
        raise InputError(f"{PROG}: --tp {parsed.tp} × --pp {parsed.pp} does not divide the job's {world_size} ranks")
    return parsed


def build_m2_from_config(config: dict, groups):
    """This rank's M2 stage chunks + DDP + optimizer + scheduler, from a saved RunConfig dict (the runtime)."""
    from m2megatron.config.base import update_dataclass
    from m2megatron.config.run import RunConfig
    from m2megatron.runtime import build_stages

    stages = build_stages(update_dataclass(RunConfig(), config), groups, training=True, init=False)
    return stages.chunks, stages.optimizer, stages.scheduler


Builder = Callable[[dict, object], tuple]
"""(saved config dict, groups) → (model chunks, optimizer, scheduler) at the groups' layout."""


def config_at_layout(config: dict | None, layout) -> dict | None:
    """The saved run config with its parallel sizes set to `layout` (what the resharded checkpoint holds)."""
    if not config or "parallel" not in config:
        return config
    config = copy.deepcopy(config)
    config["parallel"].update(tensor_parallel=layout.tensor_parallel, pipeline_parallel=layout.pipeline_parallel,
                              virtual_pipeline=layout.virtual_pipeline)
    return config


def reshard(src: str | Path, dst_root: str | Path, groups, *, build: Builder = build_m2_from_config,
            with_optimizer: bool = True, keep_last: int = 1) -> Path:
    """Collective over B's ranks (`groups`): load `src` and save it under `dst_root` at B's layout."""
    from m2megatron.parallel import seed_everything

    path = atomic.resolve(src)
    meta = manifest.read(path)
    config = config_at_layout(meta["config"], groups.layout)
    chunks, opt, sched = build(config, groups)
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
        seed = ((meta["config"] or {}).get("train") or {}).get("seed")
        if seed is not None:  # the streams a resume at B would re-derive (m2megatron.parallel.rng)
            seed_everything(seed, groups, step=loaded.step)
    return save_checkpoint(dst_root, loaded.step, chunks, opt, sched if meta["has_scheduler"] else None,
                           groups=groups, config=config, extra_state=extra, rank_state=rank_state,
                           keep_last=keep_last)


def reshard_on_this_rank(src: str, dst: str, tp: int, pp: int, with_optimizer: bool,
                         build: Builder = build_m2_from_config, vp: int | None = None) -> None:
    """Per-rank body of the reshard tool (module-level, so spawned ranks can import it)."""
    import time

    import torch.distributed as dist

    from m2megatron.parallel import Layout, build_groups

    started = time.perf_counter()
    groups = build_groups(Layout(world_size=dist.get_world_size(), tensor_parallel=tp, pipeline_parallel=pp,
                                 virtual_pipeline=vp))
    out = reshard(src, dst, groups, build=build, with_optimizer=with_optimizer)
    if dist.get_rank() == 0:
        print(f"resharded to {out} (TP {tp} × PP {pp} × DP {groups.layout.data_parallel}"
              f"{f' × VP {vp}' if vp else ''}) in {time.perf_counter() - started:.1f}s", flush=True)
