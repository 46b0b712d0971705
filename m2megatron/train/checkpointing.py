"""The trainer's side of checkpoints: when to save, what goes in, and what a start takes over.

At start-up (`TrainCheckpointer.resume`), in this order:
1. this run's own checkpoints (checkpoint.save_dir, or run_dir/checkpoints) win: a preempted, requeued or
   restarted run resumes its own progress, whatever checkpoint.load names (unless it is None: a fresh
   start);
2. otherwise checkpoint.load ('auto' finds nothing more) is loaded as checkpoint.load_mode says:
   - resume: model, optimizer, LR schedule, step, data position and RNG streams (the checkpoint's LR schedule
     continues, unless optim.override_schedule_on_resume takes this run's optim.* schedule; one INFO line
     says which);
   - weights: the model weights only, everything else fresh from step 0;
   - finetune: the model weights and optimizer state, with the step counter, LR schedule (the current
     optim.* settings), data order and RNG fresh from step 0.

A resume at the saved layout restores every rank's data position and RNG streams exactly. At another
layout (docs/CHECKPOINTS.md, "What carries over"): the model, optimizer (plain and distributed),
schedule and step carry over; each rank's RNG streams are re-derived from (seed, step) as Megatron seeds
them; the data position is handed to the new reading ranks (`StageBatches.load_global_state`), which continue with
exactly the samples of the saved epochs that had not been returned: none repeated, none dropped
(docs/DATA.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from m2megatron.checkpoint.load import load_checkpoint
from m2megatron.checkpoint.save import Checkpointer
from m2megatron.parallel import seed_everything

log = logging.getLogger("m2megatron.train")


def checkpoint_root(cfg) -> Path:
    """Where this run's checkpoints go (and come back from)."""
    return Path(cfg.checkpoint.save_dir or Path(cfg.train.run_dir) / "checkpoints")


class TrainCheckpointer:
    """Saves and restores a run's state through explicit providers (nothing is read off the trainer):

    modules / optimizer / scheduler: the stage modules, Megatron's optimizer and its LR schedule;
    data: the data position (`state_dict`, `load_state_dict`, `load_global_state`: StageBatches);
    progress: the trainer's own state (`state_dict()` with at least "step", and `load_state_dict`).
    """

    def __init__(self, cfg, groups, *, modules: list, optimizer, scheduler, data, progress):
        self.cfg, self.groups = cfg, groups
        self.modules, self.optimizer, self.scheduler = modules, optimizer, scheduler
        self.data, self.progress = data, progress
        self.root = checkpoint_root(cfg)
        self.writer = Checkpointer(self.root, groups, keep_last=cfg.checkpoint.keep_last,
                                   async_save=cfg.checkpoint.async_save)
        self._last_saved: int | None = None
        self.last_path: Path | None = None

    def due(self, step: int) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return interval > 0 and step % interval == 0

    def saved_at(self, step: int) -> bool:
        return self._last_saved == step

    def save(self, *, wait: bool = False) -> Path:
        """Checkpoint the providers' state now; with checkpoint.async_save it is written in the background
        unless `wait`."""
        progress = dict(self.progress.state_dict())
        step = int(progress.pop("step"))
        path = self.writer.save(step, self.modules, self.optimizer, self.scheduler, config=self.cfg,
                                extra_state=progress, rank_state={"loader": self.data.state_dict()})
        if wait:
            self.writer.wait()
        self._last_saved, self.last_path = step, path  # the writer logs where and how long
        return path

    def ensure_saved(self, step: int) -> Path:
        """The complete checkpoint of `step`: the one saved at this step (waited for), or a new one."""
        if self.saved_at(step):
            self.finalize()
            return self.last_path
        return self.save(wait=True)

    def poll(self) -> None:
        """Publish background saves that have finished (collective; every rank, every step)."""
        if self.writer.async_save:
            self.writer.poll()

    def resume(self) -> int:
        """Load what the run starts from (module docstring); return the step reached."""
        ckpt = self.cfg.checkpoint
        if ckpt.load is None:
            return 0
        if _has_checkpoint(self.root):
            return self._resume(str(self.root))
        if ckpt.load == "auto":
            return 0
        if ckpt.load_mode == "resume":
            return self._resume(ckpt.load)
        return self._start_from(ckpt.load, finetune=ckpt.load_mode == "finetune")

    def _resume(self, source: str) -> int:
        loaded = load_checkpoint(source, self.modules, self.optimizer, self.scheduler, groups=self.groups,
                                 config=self.cfg)
        self.progress.load_state_dict({**loaded.extra_state, "step": loaded.step})
        restore_data_position(self.data, loaded)
        if not loaded.rng_restored:
            seed_everything(self.cfg.train.seed, self.groups, step=loaded.step)
        if dist.get_rank() == 0:
            log.info("resumed from %s at step %d", loaded.path, loaded.step)
            log.info(schedule_in_effect(self.scheduler, self.cfg.optim.override_schedule_on_resume))
        self._last_saved, self.last_path = loaded.step, loaded.path
        return loaded.step

    def _start_from(self, source: str, *, finetune: bool) -> int:
        """Weights (and for a fine-tune the optimizer state) of `source`; a new run from step 0."""
        optimizer = self.optimizer if finetune else None
        settings = _hyper_parameters(optimizer) if finetune else None
        loaded = load_checkpoint(source, self.modules, optimizer, None, groups=self.groups, config=self.cfg,
                                 restore_rng=False)
        if finetune:
            for group, values in zip(optimizer.param_groups, settings, strict=True):
                group.update(values)  # this run's optim.* settings, not the checkpoint's
            self.scheduler.step(increment=0)  # the fresh schedule's first LR and weight decay
        else:
            # bf16/fp16 mixed precision: the optimizer's fp32 main weights were copied from the model when it
            # was built; without this the first step would write the stale copies back over the loaded weights.
            self.optimizer.reload_model_params()
        if dist.get_rank() == 0:
            log.info("started from %s of %s (saved at its step %d); step, LR schedule, data order and RNG "
                     "start fresh", "the weights and optimizer state" if finetune else "the weights",
                     loaded.path, loaded.step)
        return 0

    def finalize(self) -> None:
        """Wait for a background save in flight, so the run ends with its checkpoint visible."""
        self.writer.wait()
        self.writer.close()


def schedule_in_effect(scheduler, overridden: bool) -> str:
    """One line: whose LR schedule a resumed run follows, and what it is."""
    whose = ("this run's optim.* settings (optim.override_schedule_on_resume=true)" if overridden
             else "the checkpoint's, continued (optim.override_schedule_on_resume=false)")
    return (f"LR schedule: {whose}: {scheduler.lr_decay_style}, warm-up {scheduler.lr_warmup_steps} steps, "
            f"lr {scheduler.max_lr:g} to {scheduler.min_lr:g} at step {scheduler.lr_decay_steps}; "
            f"step {scheduler.num_steps}, lr now {scheduler.get_lr({}):g}")


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


def _hyper_parameters(optimizer) -> list[dict]:
    """Every param group's settings except its parameters and Adam's step count."""
    return [{k: v for k, v in group.items() if k not in ("params", "step")} for group in optimizer.param_groups]


def _has_checkpoint(root: Path) -> bool:
    from m2megatron.checkpoint.atomic import complete_checkpoints

    box = [bool(root.is_dir() and complete_checkpoints(root))]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
