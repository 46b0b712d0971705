"""The trainer's side of checkpoints: when to save, what goes in, and resuming at start-up.

The data position is per reading rank (`rank_state["loader"]`): after a resume at the same layout every
rank continues exactly where it stopped. After a layout change every saved rank's position is handed to
the new reading ranks (`StageBatches.load_global_state`), which continue with exactly the samples of
the saved epochs that had not been returned: none repeated, none dropped (docs/DATA.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from m2megatron.checkpoint.load import load_checkpoint
from m2megatron.checkpoint.save import Checkpointer

log = logging.getLogger("m2megatron.train")


class TrainCheckpointer:
    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        self.root = Path(cfg.checkpoint.save_dir or Path(cfg.train.run_dir) / "checkpoints")
        self.writer = Checkpointer(self.root, trainer.groups, keep_last=cfg.checkpoint.keep_last,
                                   async_save=cfg.checkpoint.async_save)
        self._last_saved: int | None = None
        self.last_path: Path | None = None

    def due(self, step: int) -> bool:
        interval = self.trainer.cfg.checkpoint.save_interval
        return interval > 0 and step % interval == 0

    def saved_at(self, step: int) -> bool:
        return self._last_saved == step

    def save(self, step: int, *, wait: bool = False) -> Path:
        """Checkpoint `step`; with checkpoint.async_save it is written in the background unless `wait`."""
        t = self.trainer
        path = self.writer.save(step, t.modules, t.optimizer, t.scheduler, config=t.cfg,
                                extra_state={"skipped_steps": t.skipped_steps},
                                rank_state={"loader": t.batches.state_dict()})
        if wait:
            self.writer.wait()
        self._last_saved, self.last_path = step, path  # the writer logs where and how long
        return path

    def poll(self) -> None:
        """Publish background saves that have finished (collective; every rank, every step)."""
        if self.writer.async_save:
            self.writer.poll()

    def resume(self) -> int:
        """Load checkpoint.load ('auto': the latest under the save dir, if any); return the step reached."""
        t = self.trainer
        source = t.cfg.checkpoint.load
        if source is None:
            return 0
        if source == "auto":
            if not _has_checkpoint(self.root):
                return 0
            source = str(self.root)
        loaded = load_checkpoint(source, t.modules, t.optimizer, t.scheduler, groups=t.groups, config=t.cfg)
        t.skipped_steps = int(loaded.extra_state.get("skipped_steps", 0))
        restore_data_position(t.batches, loaded)
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d", loaded.path, loaded.step)
        self._last_saved, self.last_path = loaded.step, loaded.path
        return loaded.step

    def finalize(self) -> None:
        """Wait for a background save in flight, so the run ends with its checkpoint visible."""
        self.writer.wait()
        self.writer.close()


def restore_data_position(batches, loaded) -> None:
    """Hand the saved data position to `batches` (StageBatches): this rank's own state at the same layout,
    else every saved rank's (`saved_rank_states`, or those tools/reshard_checkpoint.py kept in the extra
    state), whose unread samples the new reading ranks share out."""
    if loaded.rank_state and "loader" in loaded.rank_state:
        batches.load_state_dict(loaded.rank_state["loader"])
        return
    saved = loaded.saved_rank_states or {}
    if not any("loader" in s for s in saved.values()):
        saved = loaded.extra_state.get("saved_rank_states") or {}
    states = [s["loader"] for s in saved.values() if isinstance(s, dict) and "loader" in s]
    if states:
        batches.load_global_state(states)
    elif dist.get_rank() == 0:
        log.warning("the checkpoint holds no data position: the data order starts from the beginning")


def _has_checkpoint(root: Path) -> bool:
    from m2megatron.checkpoint.atomic import complete_checkpoints

    box = [bool(root.is_dir() and complete_checkpoints(root))]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
