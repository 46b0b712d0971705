"""Save a training state as a Megatron-Core distributed checkpoint, atomically, optionally in the background.

    ckpt = Checkpointer(root, groups, keep_last=2, async_save=True)
    ckpt.save(step, model_chunks, optimizer, scheduler, config=cfg, extra_state={...}, rank_state={...})
    ...                    # training continues; call ckpt.poll() once per step to publish finished saves
    ckpt.wait()            # before exit (or before the next save, which waits by itself)

Writing is spread over the data-parallel replicas: Megatron's FullyParallelSaveStrategyWrapper gives each
DP rank an even share of the tensors its replicas all hold (weights, the distributed optimizer's gathered
state), so every rank writes about 1/DP of its model-parallel shard.

Each rank checksums only the files it wrote (size + CRC-32 for the manifest), right after writing them
(in the background writer for async saves), so nothing re-reads a shard.

No save forks the trainer (checkpoint/threaded_writer.py): Megatron's file writer runs in threads of this
process. An async save copies this rank's tensors to host memory when it is scheduled (the snapshot), then
a thread writes them while training goes on; Megatron's AsyncCallsQueue polls and finalizes it on all
ranks.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from m2megatron.checkpoint import atomic, manifest, optimizer_state, state, threaded_writer
from m2megatron.checkpoint.safety import COMMON_FILE, DCP_METADATA_FILE, describe_files

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves into `root` (iter_NNNNNNN directories + `latest`), keeping the newest `keep_last`."""

    def __init__(self, root: str | Path, groups, *, keep_last: int = 2, async_save: bool = False):
        self.root = Path(root)
        self.groups = groups
        self.keep_last = keep_last
        self.async_save = async_save
        self._queue = threaded_writer.threaded_calls_queue() if async_save else None
        self._pending: dict[int, int] = {}  # async call index -> step
        self._pruning: threading.Thread | None = None

    def save(self, step: int, model_chunks: list, optimizer=None, scheduler=None, *, config=None,
             extra_state: dict | None = None, rank_state: dict | None = None) -> Path:
        """Write the checkpoint of `step` (collective). Returns its final path; with async_save it
        becomes visible when a later poll()/wait() finalizes it."""
        if self._queue is not None:
            self.wait()  # one save in flight at a time (and its pruning done)
        started = time.perf_counter()
        temp = _agree_on_temp_dir(self.root, step)
        sharded, meta_parts = _build_save_state(step, model_chunks, optimizer, scheduler, self.groups,
                                                config, extra_state, rank_state)
        request = dist_checkpointing.save(sharded, str(temp), sharded_strategy=save_strategy(self.groups),
                                          async_sharded_save=True, validate_access_integrity=True)
        request = threaded_writer.for_background(request) if self._queue is not None \
            else threaded_writer.without_forks(request)
        if request.async_fn is not None:  # checksum this rank's files where they are written
            request = request._replace(async_fn=functools.partial(_write_then_checksum, request.async_fn,
                                                                  str(temp), dist.get_rank()))
        request.finalize_fns.append(functools.partial(self._finalize, temp, step, meta_parts, started))
        if self._queue is None:
            request.execute_sync()
        else:
            self._pending[self._queue.schedule_async_request(request)] = step
            log.info("checkpoint %d: writing in the background (%.2fs blocking)", step,
                     time.perf_counter() - started)
        return self.root / atomic.iter_name(step)

    def poll(self, blocking: bool = False) -> list[int]:
        """Publish background saves that have finished (collective; call on every rank)."""
        if self._queue is None or not self._pending:
            return []
        done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        return [self._pending.pop(i) for i in done]

    def wait(self) -> list[int]:
        done = self.poll(blocking=True)
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None
        return done

    def close(self) -> None:
        self.wait()

    def _finalize(self, temp: Path, step: int, meta_parts: dict, started: float) -> None:
        rank = dist.get_rank()
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, own_file_checksums(temp, rank))
        if rank == 0:
            files = {name: info for part in parts for name, info in part.items()}
            common = [n for n in (DCP_METADATA_FILE, COMMON_FILE, "metadata.json") if (temp / n).is_file()]
            files.update(describe_files(temp, common))
            manifest.write(temp, manifest.build(files=files, **meta_parts))
            atomic.fsync_dir(temp)
            final = atomic.publish(temp, self.root, step)
            log.info("checkpoint %d: saved to %s in %.2fs", step, final, time.perf_counter() - started)
            if self._queue is None:
                self._prune()
            else:  # deleting an old checkpoint can take long on a parallel file system: not in the training loop
                self._pruning = threading.Thread(target=self._prune, name="checkpoint-prune", daemon=True)
                self._pruning.start()
        dist.barrier()

    def _prune(self) -> None:
        removed = atomic.prune(self.root, self.keep_last)
        if removed:
            log.info("checkpoints: removed %s", ", ".join(p.name for p in removed))


def save_strategy(groups):
    """Megatron's torch_dist writer, spread over the DP replicas when there are several."""
    base = get_default_save_sharded_strategy("torch_dist")
    if groups.layout.data_parallel == 1:
        return base
    return FullyParallelSaveStrategyWrapper(base, groups.dp, do_cache_distribution=False)


def _own_shards(temp: Path, rank: int) -> list[str]:
    return sorted(p.name for p in temp.iterdir() if p.name.startswith(f"__{rank}_") and p.suffix == ".distcp")


def _checksum_file(temp: Path, rank: int) -> Path:
    return temp / f".m2crc.{rank}.json"


def _write_then_checksum(write_fn, temp: str, rank: int, *args, **kwargs) -> None:
    """The writer's job (in the background writer thread, or inline for a sync save): write this rank's
    shards, then record their sizes and CRC-32s for the manifest."""
    write_fn(*args, **kwargs)
    temp_dir = Path(temp)
    described = describe_files(temp_dir, _own_shards(temp_dir, rank))
    target = _checksum_file(temp_dir, rank)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(described))
    os.replace(tmp, target)


def own_file_checksums(temp: Path, rank: int) -> dict[str, dict]:
    """This rank's files as its writer recorded them (the record is removed; a rank without a writer job
    wrote no shard, and anything found is described here)."""
    record = _checksum_file(temp, rank)
    if record.is_file():
        described = json.loads(record.read_text())
        record.unlink()
        return described
    return describe_files(temp, _own_shards(temp, rank))


def save_checkpoint(ckpt_root: str | Path, step: int, model_chunks: list, optimizer=None, scheduler=None, *,
                    groups, config=None, extra_state: dict | None = None, rank_state: dict | None = None,
                    keep_last: int = 2) -> Path:
    """Synchronous save (collective); returns the published checkpoint directory."""
    return Checkpointer(ckpt_root, groups, keep_last=keep_last).save(
        step, model_chunks, optimizer, scheduler, config=config, extra_state=extra_state, rank_state=rank_state)


def _agree_on_temp_dir(root: Path, step: int) -> Path:
    box = [None]
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temps(root)
        temp = atomic.new_temp_dir(root, step)
        temp.mkdir()
        box = [str(temp)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _build_save_state(step, model_chunks, optimizer, scheduler, groups, config, extra_state, rank_state):
    metadata = optimizer_state.sharding_metadata(groups, optimizer)
    sharded = state.model_sharded_state_dict(model_chunks, metadata)
    model_tensors = state.gather_model_tensor_shapes(sharded["model"])
    if optimizer is not None:
        optimizer_state.ensure_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=metadata)
    sharded[state.COMMON_KEY] = {
        "step": int(step),
        "extra_state": dict(extra_state or {}),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    grid, coords = state.grid(groups.layout), state.coordinates(groups)
    sharded[state.RNG_KEY] = state.rank_object(state.RNG_KEY, state.capture_rng(), grid, coords)
    sharded[state.USER_KEY] = state.rank_object(state.USER_KEY, dict(rank_state or {}), grid, coords)
    kind = optimizer_state.kind(optimizer)
    meta_parts = {
        "step": step, "layout": groups.layout, "optimizer_kind": kind,
        "optimizer_format": optimizer_state.WRITE_FORMAT if kind == "distributed" else None,
        "has_scheduler": scheduler is not None, "config": manifest.config_to_dict(config),
        "model_tensors": model_tensors,
    }
    return sharded, meta_parts
