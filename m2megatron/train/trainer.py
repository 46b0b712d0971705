"""The training loop: data → pipeline step → NaN/Inf guard → optimizer → logs → checkpoints.

    trainer = Trainer(cfg)          # every rank; builds groups, data, model, optimizer; resumes
    trainer.fit()                   # returns the number of the last completed step
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from m2megatron.config.run import RunConfig
from m2megatron.data.build import resolve_tokenizer
from m2megatron.data.stage_batches import StageBatches
from m2megatron.parallel import initialize, seed_everything
from m2megatron.planning import flops
from m2megatron.runtime import ContrastiveStep, build_stages
from m2megatron.train.checkpointing import TrainCheckpointer, checkpoint_root
from m2megatron.train.metrics import MetricsWriter, ThroughputMeter
from m2megatron.train.preemption import PreemptionHandler
from m2megatron.train.run_lock import lock_run_directories

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
        cfg.validate(world_size=dist.get_world_size())
        self.run_dir = Path(cfg.train.run_dir)
        self.is_logging_rank = dist.get_rank() == 0
        self.run_locks = lock_run_directories([self.run_dir, checkpoint_root(cfg)])  # one trainer per run
        self.cfg = self._resolve_tokenizer(cfg)
        seed_everything(self.cfg.train.seed, self.groups)
        if self.is_logging_rank:
            self.cfg.save(self.run_dir)
        self.stages = build_stages(self.cfg, self.groups)
        self.modules, self.chunks = self.stages.modules, self.stages.chunks
        self.optimizer, self.scheduler = self.stages.optimizer, self.stages.scheduler
        self.num_microbatches = self.cfg.num_microbatches(dist.get_world_size())
        # One reading rank per replica decodes; the others get what their stage reads (docs/DATA.md).
        self.batches = StageBatches(self.cfg.data, self.tokenizer, image_size=self.cfg.model.image_size,
                                    micro_batch_size=self.cfg.train.micro_batch_size,
                                    num_microbatches=self.num_microbatches, groups=self.groups,
                                    seed=self.cfg.train.seed)
        self.step_fn = ContrastiveStep(self.stages)
        from m2megatron.eval.during_training import configured_sets

        self.eval_sets = configured_sets(self.cfg)  # fails now on a missing eval path, not after hours
        self.checkpointer = TrainCheckpointer(self)
        self.step = self.checkpointer.resume()
        self.nonfinite_in_row = 0
        self.skipped_steps = 0

    def _resolve_tokenizer(self, cfg: RunConfig) -> RunConfig:
        """The tokenizer fixes the vocabulary (a small one is trained for the synthetic source)."""
        cache = self.run_dir  # where the eval launcher looks for the synthetic tokenizer too
        if self.is_logging_rank:
            self.tokenizer = resolve_tokenizer(cfg.data, max_length=cfg.model.max_text_len, cache_dir=cache)
        dist.barrier()
        if not self.is_logging_rank:
            self.tokenizer = resolve_tokenizer(cfg.data, max_length=cfg.model.max_text_len, cache_dir=cache)
        if self.tokenizer.vocab_size == cfg.model.vocab_size:
            return cfg
        if cfg.data.tokenizer:
            if self.tokenizer.vocab_size > cfg.model.vocab_size:
                raise ValueError(f"data.tokenizer: {cfg.data.tokenizer} has {self.tokenizer.vocab_size} pieces, "
                                 f"more than model.vocab_size={cfg.model.vocab_size}")
            return cfg
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=self.tokenizer.vocab_size))

    # ---- one step ---------------------------------------------------------------------------------
    def _next_microbatches(self) -> list[dict]:
        return self.batches.next_step()

    def _all_finite(self, loss: torch.Tensor | None) -> bool:
        """Agree over all ranks whether this step's loss and every gradient are finite (one host sync).

        fp16 gradients are loss-scaled: an overflow there is the dynamic loss scaler's business (Megatron's
        optimizer skips the update and lowers the scale), so only the loss is checked.
        """
        bad = torch.zeros((), device=self.device)
        if loss is not None:
            bad = bad + (~torch.isfinite(loss)).any()
        if self.cfg.train.precision != "fp16":
            for chunk in self.chunks:
                for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                    bad = bad + (~torch.isfinite(buffer.grad_data)).any()
        flag = bad.clamp(max=1.0).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _skip(self, why: str) -> dict:
        self.nonfinite_in_row += 1
        self.skipped_steps += 1
        log.warning("step %d: %s, update skipped (%d in a row)", self.step + 1, why, self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(f"train.max_nonfinite_steps: {self.nonfinite_in_row} consecutive steps "
                                 f"had a NaN/Inf loss or gradient; stopping")
        return {"loss": float("nan"), "grad_norm": float("nan"), "skipped": 1.0}

    def train_step(self) -> dict:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()  # with overlap_param_gather this also dispatches the first all-gather
        loss = self.step_fn(self._next_microbatches())
        if not self._all_finite(loss):
            return self._skip("non-finite loss or gradient")
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:  # fp16: the scaled gradients overflowed; the loss scale went down
            self.skipped_steps += 1
            log.info("step %d: fp16 gradient overflow, loss scale now %g", self.step + 1,
                     self.optimizer.get_loss_scale().item())
            return {"loss": loss, "grad_norm": float("nan"), "skipped": 1.0}
        self.nonfinite_in_row = 0
        self.scheduler.step(increment=1)
        return {"loss": loss, "grad_norm": grad_norm, "skipped": 0.0}

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg
        writer = MetricsWriter(self.run_dir, enabled=self.is_logging_rank, tensorboard=cfg.train.tensorboard,
                               total_steps=cfg.train.train_steps, start_step=self.step, progress=self.progress)
        meter = ThroughputMeter()
        samples_per_step = cfg.train.micro_batch_size * self.num_microbatches * self.groups.layout.data_parallel
        tokens_per_sample = cfg.model.num_image_tokens + cfg.model.max_text_len
        try:
            while self.step < cfg.train.train_steps:
                result = self.train_step()
                self.step += 1
                meter.add(samples_per_step, samples_per_step * tokens_per_sample)
                writer.step()
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.train_steps:
                    writer.write(self.step, self._log_record(result, meter.read()))
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.train_steps:
                    writer.write(self.step, self.evaluate())
                    meter.read()  # eval time is not training throughput
                self.checkpointer.poll()
                if self.checkpointer.due(self.step):
                    with self.stages.params_in_sync():
                        self.checkpointer.save(self.step)
                if self.preemption.requested():
                    # The requeued job must find this step's checkpoint complete.
                    if self.checkpointer.saved_at(self.step):
                        self.checkpointer.finalize()
                        path = self.checkpointer.last_path
                    else:
                        with self.stages.params_in_sync():
                            path = self.checkpointer.save(self.step, wait=True)
                    self.preemption.mark_preempted(step=self.step, checkpoint=str(path))
                    log.warning("preempted at step %d; checkpoint %s", self.step, path)
                    return self.step
            if not self.checkpointer.saved_at(self.step):
                with self.stages.params_in_sync():
                    self.checkpointer.save(self.step, wait=True)
        finally:
            writer.close()
        return self.step

    def evaluate(self) -> dict[str, float]:
        """The configured eval sets (eval.*) with the training stages at the training layout; every rank."""
        from m2megatron.eval.during_training import evaluate_configured_sets

        with self.stages.params_in_sync():
            return evaluate_configured_sets(self.modules, self.groups, self.cfg, self.tokenizer, self.step)

    def _log_record(self, result: dict, speed: dict) -> dict:
        """Bring the loss to the logging rank and assemble the record."""
        loss = result["loss"]
        value = torch.zeros(2, device=self.device)
        if loss is not None:
            value[0], value[1] = torch.as_tensor(loss, device=self.device).float(), 1.0
        if self.groups.is_last_stage:
            value[0] = value[0] / self.groups.layout.data_parallel
        dist.all_reduce(value)  # last-stage ranks hold the loss; mean over DP, TP copies counted once below
        tp = self.groups.layout.tensor_parallel
        mean_loss = value[0].item() / tp
        logit_scale = self._logit_scale()
        record = {
            "loss": mean_loss,
            "logit_scale": logit_scale,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(result["grad_norm"]) if result["grad_norm"] is not None else float("nan"),
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
