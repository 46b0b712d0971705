"""The training loop: data → the training step (runtime.train_step) → logs → checkpoints → stop or go on.

    trainer = Trainer(cfg)          # every rank; builds groups, data, model, optimizer; resumes
    trainer.fit()                   # returns the number of the last completed step

A run stops at train.train_steps, or earlier with a checkpoint: on a preemption signal or when
train.exit_duration_minutes is used up (both marked for a requeue, train/preemption.py), or at a multiple of
train.exit_interval (not marked).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from m2megatron.checkpoint.start_file import start_model_config
from m2megatron.config.run import RunConfig
from m2megatron.data.build import resolve_tokenizer
from m2megatron.data.stage_batches import StageBatches
from m2megatron.parallel import initialize, seed_everything
from m2megatron.planning import flops
from m2megatron.runtime import StepResult, TrainStep, build_stages
from m2megatron.runtime.train_step import SPIKE_SKIP
from m2megatron.train.checkpointing import TrainCheckpointer, checkpoint_root
from m2megatron.train.data_checks import vocabulary_follows_tokenizer
from m2megatron.train.metrics import MetricsWriter, ThroughputMeter, wandb_settings
from m2megatron.train.preemption import PreemptionHandler
from m2megatron.train.run_lock import lock_run_directories
from m2megatron.train.run_monitor import RunMonitor, global_mean_loss

log = logging.getLogger("m2megatron.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


class Trainer:
    def __init__(self, cfg: RunConfig, *, groups=None, progress: bool = True):
        self.preemption = PreemptionHandler(cfg.train.run_dir).install()
        self.progress = progress
        self.groups = groups or initialize(cfg.parallel)  # the bootstrap: writer queue, device, groups, patches
        self.device = self.groups.device
        self.preemption.device = self.device
        cfg = start_model_config(cfg)  # a start from a weights file takes the model's sizes from it
        cfg.validate(world_size=dist.get_world_size())
        self.run_dir = Path(cfg.train.run_dir)
        self.is_logging_rank = dist.get_rank() == 0
        self.run_locks = lock_run_directories([self.run_dir, checkpoint_root(cfg)])  # one trainer per run
        self.cfg = self._resolve_tokenizer(cfg)
        seed_everything(self.cfg.train.seed, self.groups)
        if self.is_logging_rank:
            self.cfg.save(self.run_dir)
        self.stages = build_stages(self.cfg, self.groups)
        self.modules = self.stages.modules
        self.optimizer = self.stages.optimizer
        self.num_microbatches = self.cfg.num_microbatches(dist.get_world_size())
        # One reading rank per replica decodes; the others get what their stage reads (docs/DATA.md).
        self.batches = StageBatches(self.cfg.data, self.tokenizer, image_size=self.cfg.model.image_size,
                                    micro_batch_size=self.cfg.train.micro_batch_size,
                                    num_microbatches=self.num_microbatches, groups=self.groups,
                                    seed=self.cfg.train.seed)
        self.step_fn = TrainStep(self.stages)
        # logging.*: phase timers (Megatron's config.timers), stragglers, memory, progress, loss spikes
        self.monitor = RunMonitor(
            self.cfg, self.groups, self.stages.config.timers, self.batches,
            samples_per_step=self.cfg.train.micro_batch_size * self.num_microbatches * self.groups.layout.data_parallel,
            tokens_per_sample=self.cfg.model.num_image_tokens + self.cfg.model.max_text_len)
        from m2megatron.eval.during_training import configured_sets

        self.eval_sets = configured_sets(self.cfg)  # fails now on a missing eval path, not after hours
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_row = 0
        self.checkpointer = TrainCheckpointer(self.cfg, self.groups, modules=self.modules, optimizer=self.optimizer,
                                              scheduler=self.stages.scheduler, data=self.batches, progress=self)
        self.checkpointer.resume()  # sets step and skipped_steps through load_state_dict

    # ---- the trainer's own state (checkpointed beside the model, optimizer, schedule and data position) ----
    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "samples_seen": self.monitor.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        # Checkpoints written before samples_seen was saved: as if the global batch never changed.
        self.monitor.samples_seen = int(state.get("samples_seen", self.step * self.monitor.samples_per_step))

    def _resolve_tokenizer(self, cfg: RunConfig) -> RunConfig:
        """The tokenizer fixes the vocabulary (a small one is trained for the synthetic source)."""
        cache = self.run_dir  # where the eval launcher looks for the synthetic tokenizer too
        if self.is_logging_rank:
            self.tokenizer = resolve_tokenizer(cfg.data, max_length=cfg.model.max_text_len, cache_dir=cache)
        dist.barrier()
        if not self.is_logging_rank:
            self.tokenizer = resolve_tokenizer(cfg.data, max_length=cfg.model.max_text_len, cache_dir=cache)
        return vocabulary_follows_tokenizer(cfg, self.tokenizer.vocab_size)

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """One optimizer step (runtime.train_step), with this rank's stop request folded into its agreement."""
        budget = self.cfg.train.exit_duration_minutes
        if budget is not None and time.time() - psutil.Process().create_time() >= budget * 60:
            self.preemption.request("train.exit_duration_minutes")  # the budget counts from the process start
        with self.monitor.phase("data-wait"):
            microbatches = self.batches.next_step()
        result = self.step_fn(microbatches, stop_flag=self.preemption.local_flag,
                              skip_update=lambda loss: self.monitor.loss_spike(loss, self.step + 1))
        self._account(result)
        if result.skipped is None:
            self.monitor.grad_norm_jump(result.grad_norm, self.step + 1)
        return result

    def _account(self, result: StepResult) -> None:
        """Count skipped updates; stop the run after train.max_nonfinite_steps non-finite steps in a row."""
        if result.skipped is None:
            self.nonfinite_in_row = 0
            return
        self.skipped_steps += 1
        if result.skipped.startswith("fp16"):  # the loss scaler's business, not a non-finite step
            log.info("step %d: fp16 gradient overflow, loss scale now %g", self.step + 1,
                     self.optimizer.get_loss_scale().item())
            return
        if result.skipped == SPIKE_SKIP:  # logged by the run monitor
            return
        self.nonfinite_in_row += 1
        log.warning("step %d: %s, update skipped (%d in a row)", self.step + 1, result.skipped,
                    self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(f"train.max_nonfinite_steps: {self.nonfinite_in_row} consecutive steps "
                                 f"had a NaN/Inf loss or gradient; stopping")

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg
        writer = MetricsWriter(self.run_dir, enabled=self.is_logging_rank, tensorboard=cfg.train.tensorboard,
                               total_steps=cfg.train.train_steps, start_step=self.step, progress=self.progress,
                               wandb=wandb_settings(cfg))
        meter = ThroughputMeter()
        samples_per_step, tokens_per_sample = self.monitor.samples_per_step, self.monitor.tokens_per_sample
        try:
            while self.step < cfg.train.train_steps:
                with self.monitor.step():
                    result = self.train_step()
                self.step += 1
                meter.add(samples_per_step, samples_per_step * tokens_per_sample)
                writer.step()
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.train_steps:
                    record = self._log_record(result, meter.read())
                    writer.write(self.step, {**record, **self.monitor.interval(self.step)})
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.train_steps:
                    writer.write(self.step, self.evaluate())
                    meter.read()  # eval time is not training throughput
                self.checkpointer.poll()
                if self.checkpointer.due(self.step):
                    with self.monitor.phase("checkpoint"), self.stages.params_in_sync():
                        self.checkpointer.save()
                if self._stop_early(result):
                    return self.step
            if not self.checkpointer.saved_at(self.step):
                with self.stages.params_in_sync():
                    self.checkpointer.save(wait=True)
        finally:
            writer.close()
        return self.step

    def _stop_early(self, result: StepResult) -> bool:
        """Stop before train_steps (with this step's checkpoint complete) on an agreed preemption request or
        an exhausted train.exit_duration_minutes (both marked for a requeue), or at train.exit_interval."""
        preempted = self.preemption.adopt(result.stop_requested)
        interval = self.cfg.train.exit_interval
        at_exit_interval = interval is not None and self.step % interval == 0 and self.step < self.cfg.train.train_steps
        if not (preempted or at_exit_interval):
            return False
        with self.stages.params_in_sync():
            path = self.checkpointer.ensure_saved(self.step)  # a requeued or restarted job resumes from it
        if preempted:
            self.preemption.mark_preempted(step=self.step, checkpoint=str(path))
            log.warning("stopped at step %d (%s); checkpoint %s, marked for a requeue", self.step,
                        self.preemption.reason, path)
        else:
            log.warning("stopped at step %d (train.exit_interval=%d); checkpoint %s", self.step, interval, path)
        return True

    @property
    def finished(self) -> bool:
        """The run reached train.train_steps (False after an early stop)."""
        return self.step >= self.cfg.train.train_steps

    def evaluate(self) -> dict[str, float]:
        """The configured eval sets (eval.*) with the training stages at the training layout; every rank."""
        from m2megatron.eval.during_training import evaluate_configured_sets

        with self.stages.params_in_sync(), self.monitor.paused():
            return evaluate_configured_sets(self.modules, self.groups, self.cfg, self.tokenizer, self.step)

    def _log_record(self, result: StepResult, speed: dict) -> dict:
        """Bring the loss to the logging rank and assemble the record."""
        mean_loss = global_mean_loss(result.loss, self.groups)
        logit_scale = self._logit_scale()
        record = {
            "loss": mean_loss,
            "logit_scale": logit_scale,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(result.grad_norm),
            "samples_per_s": speed["samples_per_s"],
            "tokens_per_s": speed["tokens_per_s"],
            "skipped_steps": float(self.skipped_steps),
        }
        if self.cfg.train.precision == "fp16":
            record["loss_scale"] = float(self.optimizer.get_loss_scale().item())
        # MFU counts the model's FLOPs; HFU also the forward that recompute re-runs (planning.flops).
        model_flops, hardware_flops = flops.run_flops_per_sample(self.cfg)
        record["model_tflops"] = model_flops * speed["samples_per_s"] / 1e12
        record["hardware_tflops"] = hardware_flops * speed["samples_per_s"] / 1e12
        if torch.cuda.is_available():
            peak = flops.peak_tflops(torch.cuda.get_device_name(), "fp8" if self.cfg.model.fp8 != "none" else "bf16")
            if peak:
                record["mfu"] = record["model_tflops"] / (peak * dist.get_world_size())
                record["hfu"] = record["hardware_tflops"] / (peak * dist.get_world_size())
        for reason, count in self.batches.skipped().items():
            record[f"skipped_{reason}"] = float(count)
        for key, count in self.batches.samples_seen().items():  # every rank: an all-reduce over DP
            record[f"samples_seen/{key}"] = float(count)
        return record

    def _logit_scale(self) -> float:
        """exp of the learnable log scale, as the loss uses it (from the last stage)."""
        value = torch.zeros(2, device=self.device)
        for module in self.modules:
            if module.post_process:
                value[0], value[1] = module.logit_scale.detach().float(), 1.0
        dist.all_reduce(value)
        return math.exp(value[0].item() / max(value[1].item(), 1.0))

    def close(self) -> None:
        self.checkpointer.finalize()
        self.batches.close()
        self.preemption.uninstall()
        for lock in self.run_locks:
            lock.release()
