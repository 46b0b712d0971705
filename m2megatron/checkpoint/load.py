"""Load a distributed checkpoint at any TP/PP/DP layout, after refusing the ones we must not load.

Checks, in order, before any tensor is read: the saved model config matches the current one (each
differing field named); the model's tensor names and global shapes match; the optimizer state can
be resharded to this layout; every file is present with its recorded size (and CRC-32 with
`verify=True`); every pickle in the checkpoint loads with weights_only / the restricted unpickler.
Then Megatron's dist_checkpointing reads each rank's slices (resharding on load); with several
data-parallel replicas, Megatron's FullyParallelLoadStrategyWrapper splits the reading of what the
replicas share among them and exchanges it over the DP group.

The CRC pass reads every file exactly once per load, on one rank: the files are dealt out to the ranks
by size, so each rank reads about 1/world of the checkpoint for it. Sizes are checked for every file.
What this guarantees: a file that is missing, truncated, or has any byte changed since it was written
is refused, with its name, before anything is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

from m2megatron.checkpoint import atomic, manifest, optimizer_state, safety, state
from m2megatron.checkpoint.safety import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    step: int
    """The step the checkpoint was saved at (training resumes with step + 1)."""
    extra_state: dict
    """The `extra_state` dict given to save (the same on every rank)."""
    path: Path
    """The checkpoint directory that was loaded."""
    same_layout: bool
    """True when saved and loaded at the same TP/PP/DP/VPP layout."""
    rank_state: dict | None
    """This rank's own `rank_state` from save when the layout is the same; None after a layout change."""
    saved_rank_states: dict[tuple[int, int, int], dict] | None = None
    """After a layout change: every saving rank's `rank_state`, keyed by its (pp, tp, dp) coordinates."""
    rng_restored: bool = False
    """Whether this rank's RNG streams were restored (only at the same layout)."""
    meta: dict = field(default_factory=dict, repr=False)
    """The checkpoint's m2meta.json (layout, config, tensor shapes, files)."""

    @property
    def saved_layout(self) -> dict:
        return self.meta["layout"]


def load_checkpoint(path_or_root: str | Path, model_chunks: list, optimizer=None, scheduler=None, *, groups,
                    config=None, restore_rng: bool = True, verify: bool = True) -> LoadedCheckpoint:
    """Load into `model_chunks` (and `optimizer`, `scheduler` when given) at this rank's layout (collective).

    `path_or_root` is a checkpoint directory, or a root whose `latest` (else newest complete) one is used.
    `config` (RunConfig or dict) enables the architecture check against the saved config.
    """
    path = _agree_on_path(path_or_root)
    meta = manifest.read(path)
    _check_config(path, meta, config)
    dist_opt_format = meta["optimizer"].get("format") or optimizer_state.FULLY_RESHARDABLE
    metadata = optimizer_state.sharding_metadata(groups, optimizer, dist_opt_format)
    sharded = state.model_sharded_state_dict(model_chunks, metadata)
    _check_model_tensors(path, meta, sharded["model"])
    _check_optimizer(path, meta, optimizer, groups)
    _check_files(path, meta, verify)
    same_layout = _same_layout(meta["layout"], groups.layout)
    _add_rank_objects(sharded, meta, groups, same_layout, restore_rng)
    with torch.no_grad():  # DistributedOptimizer's loads write into views of leaf params
        if optimizer is not None:
            optimizer_state.ensure_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
        loaded = dist_checkpointing.load(sharded, str(path), sharded_strategy=load_strategy(path, groups),
                                         common_strategy=safety.SafeCommonLoadStrategy())
        state.load_model_state(model_chunks, loaded)
        if optimizer is not None:
            optimizer_state.load_loaded_state(optimizer, loaded["optimizer"],
                                              dist_opt_format if meta["optimizer"]["kind"] == "distributed"
                                              else None)
    common = loaded[state.COMMON_KEY]
    _load_scheduler(path, scheduler, common.get("scheduler"))
    result = LoadedCheckpoint(step=int(common["step"]), extra_state=common.get("extra_state") or {}, path=path,
                              same_layout=same_layout, rank_state=None, meta=meta)
    if same_layout:
        result.rank_state = loaded[state.USER_KEY]
        if restore_rng:
            state.restore_rng(loaded[state.RNG_KEY])
            result.rng_restored = True
    else:
        result.saved_rank_states = {tuple(c): loaded[state.USER_KEY][i]
                                    for i, c in enumerate(state.all_grid_coords(_saved_grid(meta)))}
        if restore_rng and dist.get_rank() == 0:  # a caller that needs no RNG streams (eval) is not warned
            log.warning("checkpoint %s was saved at layout %s and is loaded at %s: RNG streams are not restored; "
                        "per-rank state is passed on as saved_rank_states", path, meta["layout"],
                        manifest.layout_dict(groups.layout))
    return result


def load_strategy(path: Path, groups):
    """Megatron's torch_dist reader, its reading of what DP replicas share spread over the DP group."""
    base = get_default_load_sharded_strategy(str(path))
    if groups.layout.data_parallel == 1:
        return base
    return FullyParallelLoadStrategyWrapper(base, groups.dp)


def _agree_on_path(path_or_root) -> Path:
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [str(atomic.resolve(path_or_root))]
        except CheckpointError as exc:
            box = [exc]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise CheckpointError(str(box[0]))
    return Path(box[0])


def _check_config(path: Path, meta: dict, config) -> None:
    diffs = manifest.model_config_differences(meta.get("config"), manifest.config_to_dict(config))
    if diffs:
        raise CheckpointError(f"{path}: saved for another model architecture; differing settings:\n  "
                              + "\n  ".join(diffs))


def _check_model_tensors(path: Path, meta: dict, model_state: dict) -> None:
    current = state.gather_model_tensor_shapes(model_state)
    diffs = manifest.tensor_differences(meta["model_tensors"], current)
    if diffs:
        raise CheckpointError(f"{path}: its model tensors do not match the current model:\n  " + "\n  ".join(diffs))


def _check_optimizer(path: Path, meta: dict, optimizer, groups) -> None:
    if optimizer is None:
        return
    saved, now = meta["optimizer"]["kind"], optimizer_state.kind(optimizer)
    if saved == "none":
        raise CheckpointError(f"{path}: holds no optimizer state; load with optimizer=None (weights only)")
    if saved != now:
        raise CheckpointError(f"{path}: optimizer state was saved by the {saved} optimizer, the current one is "
                              f"{now}; load weights only (optimizer=None) or use the same optimizer kind")
    fmt = meta["optimizer"].get("format")
    if saved == "distributed" and fmt not in optimizer_state.DIST_OPT_FORMATS:
        raise CheckpointError(f"{path}: distributed-optimizer state in format {fmt!r}, which we do not read "
                              f"(known: {', '.join(optimizer_state.DIST_OPT_FORMATS)})")
    old, new = meta["layout"], groups.layout
    if fmt == optimizer_state.DP_RESHARDABLE and (old["tensor_parallel"], old["pipeline_parallel"]) != (
            new.tensor_parallel, new.pipeline_parallel):
        raise CheckpointError(
            f"{path}: distributed-optimizer state ({fmt}, an older checkpoint) reshards only across DP; it was "
            f"saved at TP={old['tensor_parallel']} PP={old['pipeline_parallel']}, now TP={new.tensor_parallel} "
            f"PP={new.pipeline_parallel}. Resume once at the saved TP×PP and save again (checkpoints written "
            "now reshard across TP, PP and DP), or load weights only (checkpoint.load_mode=weights).")


def _check_files(path: Path, meta: dict, verify: bool) -> None:
    """Every rank checks its share of the files; then rank 0 checks the pickles. All ranks raise together."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = deal_by_size({name: info["size"] for name, info in meta["files"].items()}, world)[rank]
    _raise_if_any(path, safety.check_files(path, meta["files"], mine, verify))
    problems = []
    if rank == 0:
        try:
            dcp_meta = safety.read_dcp_metadata(path)
            safety.check_no_unlisted_shards(path, dcp_meta, meta["files"])
            safety.check_sharded_object_pickles(path, dcp_meta)
            safety.safe_torch_load(path / safety.COMMON_FILE, str(path / safety.COMMON_FILE))
        except (CheckpointError, OSError) as exc:
            problems.append(str(exc))
    _raise_if_any(path, problems)


def deal_by_size(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Files dealt out to `world` ranks, the largest first to the least loaded (the same on every rank)."""
    hands: list[list[str]] = [[] for _ in range(world)]
    loads = [0] * world
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        least = min(range(world), key=lambda r: (loads[r], r))
        hands[least].append(name)
        loads[least] += sizes[name]
    return hands


def _raise_if_any(path: Path, problems: list[str]) -> None:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    merged = sorted({p for part in gathered for p in part})
    if merged:
        raise CheckpointError(f"{path}: refusing to load:\n  " + "\n  ".join(merged))


def _same_layout(saved: dict, layout) -> bool:
    return manifest.layout_dict(layout) == {k: saved.get(k) for k in manifest.layout_dict(layout)}


def _saved_grid(meta: dict) -> tuple[int, int, int]:
    lay = meta["layout"]
    return lay["pipeline_parallel"], lay["tensor_parallel"], lay["data_parallel"]


def _add_rank_objects(sharded: dict, meta: dict, groups, same_layout: bool, restore_rng: bool) -> None:
    grid = _saved_grid(meta)
    if same_layout:
        coords = state.coordinates(groups)
        sharded[state.USER_KEY] = state.rank_object(state.USER_KEY, None, grid, coords)
        if restore_rng:
            sharded[state.RNG_KEY] = state.rank_object(state.RNG_KEY, None, grid, coords)
        return
    # Every rank reads every saved rank's state; one reader per object counts as its main replica.
    rank, world = dist.get_rank(), dist.get_world_size()
    objects = []
    for i, coords in enumerate(state.all_grid_coords(grid)):
        obj = state.rank_object(state.USER_KEY, None, grid, coords)
        obj.replica_id = 0 if i % world == rank else 1
        objects.append(obj)
    sharded[state.USER_KEY] = objects


def _load_scheduler(path: Path, scheduler, saved: dict | None) -> None:
    if scheduler is None:
        return
    if saved is None:
        raise CheckpointError(f"{path}: holds no LR scheduler state, but a scheduler was passed to load it into")
    scheduler.load_state_dict(saved)
