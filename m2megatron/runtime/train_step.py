"""One training step, in one place: zero the gradients, forward and backward through Megatron-Core's
pipeline schedules (plain or accumulated), agree over all ranks that the step is finite, step the optimizer.

    step = TrainStep(stages)
    result = step(microbatches, stop_flag=preemption.local_flag)   # every rank, every step
    result.loss, result.grad_norm, result.skipped, result.stop_requested

`ContrastiveStep` is the forward and backward alone (tests, benchmarks and the memory planner drive the
optimizer themselves).

Plain mode: each of the M microbatches gets its own contrastive loss over its loss group (the
schedule averages them). Accumulated mode (loss.accumulation_steps = A > 1): the loss covers all A
microbatches at once, exactly, in two passes (ARCHITECTURE.md §4):

1. forward-only through the pipeline; the last stage keeps the embeddings;
2. loss and its gradient with respect to every embedding, over the loss group;
3. forward–backward with the surrogate ⟨embedding, cached gradient⟩ per microbatch.

Random state is captured before pass 1 and restored before pass 3, so drop-path and dropout draw
the same numbers in both passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.timers import DummyTimer

from m2megatron.loss import accumulated_loss_and_grads, contrastive_loss, surrogate_loss
from m2megatron.models.sequence_parallel import packed_seq_length
from m2megatron.parallel import rng
from m2megatron.runtime.schedule import run_schedule


class ContrastiveStep:
    """Runs one step's schedule for this rank's stage chunks; returns the loss on the last stage.

    `step(microbatches)` leaves the gradients in the DDP buffers (the caller steps the optimizer).
    """

    def __init__(self, stages):
        self.stages = stages
        self.cfg = stages.cfg
        self.loss_group = stages.groups.loss
        self.seq_length = packed_seq_length(stages.cfg.model, stages.groups.layout.tensor_parallel,
                                            stages.config.sequence_parallel)

    def _run(self, microbatches: list[dict], fn, **kwargs) -> list:
        return run_schedule(self.stages.chunks, self.stages.groups, microbatches, fn, config=self.stages.config,
                            seq_length=self.seq_length, **kwargs)

    def __call__(self, microbatches: list[dict]) -> torch.Tensor | None:
        """Forward and backward of one step's microbatches.

        Returns this rank's loss (mean over the step's microbatches) on the last stage, else None.
        """
        if self.cfg.loss.accumulation_steps > 1:
            return self._accumulated(microbatches)
        group, loss_cfg = self.loss_group, self.cfg.loss
        timer = phase_timer(self.stages.config, "loss")

        def loss_fn(batch, out):
            timer.start()  # the loss group's gather: where a rank waits for the slowest of its group
            loss = contrastive_loss(out.image, out.text, out.logit_scale, group=group, config=loss_cfg)
            timer.stop()
            return loss, {"loss": loss.detach()}

        reports = self._run(microbatches, loss_fn)
        return torch.stack([r["loss"] for r in reports]).mean() if self.stages.is_last_stage else None


    def _accumulated(self, microbatches: list[dict]) -> torch.Tensor | None:
        num = len(microbatches)
        if num != self.cfg.loss.accumulation_steps:
            raise ValueError(f"loss.accumulation_steps: a step has {num} microbatches per rank, "
                             f"but accumulated mode needs exactly {self.cfg.loss.accumulation_steps}")
        collected: dict[int, tuple] = {}

        def collect(batch, out):
            collected[batch["microbatch"]] = (out.image.detach(), out.text.detach(), out.logit_scale)
            return out.image.sum() * 0.0, {}

        state = rng.capture()
        with torch.no_grad():
            self._run(microbatches, collect, forward_only=True)  # pass 1
        cached = None
        timer = phase_timer(self.stages.config, "loss")
        if self.stages.is_last_stage:  # pass 2
            timer.start()
            order = sorted(collected)
            cached = accumulated_loss_and_grads([collected[i][0] for i in order], [collected[i][1] for i in order],
                                                collected[order[-1]][2], group=self.loss_group,
                                                config=self.cfg.loss)
            timer.stop()
        rng.restore(state)

        def surrogate(batch, out):
            # The schedule divides every microbatch loss by `num`; scale back so the sum is exact.
            loss = surrogate_loss(out.image, out.text, cached, batch["microbatch"], logit_scale=out.logit_scale)
            return loss * num, {}

        self._run(microbatches, surrogate)  # pass 3
        return cached.loss if cached is not None else None


SPIKE_SKIP = "loss spike"
"""StepResult.skipped of a finite step whose update `skip_update` declined (logging.skip_spikes)."""


@dataclass
class StepResult:
    """What one training step did, the same on every rank except `loss`."""

    loss: torch.Tensor | float | None
    """This rank's loss on the last stage (NaN when the step was not finite), None elsewhere."""
    grad_norm: float
    """The gradient norm Megatron's optimizer measured (before clipping); NaN when the update was skipped."""
    skipped: str | None
    """Why the update was skipped ("non-finite loss or gradient", "fp16 gradient overflow", SPIKE_SKIP); None if
    applied."""
    stop_requested: bool
    """Some rank's `stop_flag` was set for this step (agreed in the step's one all-reduce)."""


class TrainStep:
    """The whole optimizer step of this rank's stages (module docstring).

    Per step it makes one all-reduce of its own and one host sync: the non-finite flag, the caller's stop flag
    (preemption) and the loss for the spike check travel together. Megatron's optimizer adds its grad-norm
    reduction.
    """

    def __init__(self, stages):
        self.stages = stages
        self.forward_backward = ContrastiveStep(stages)
        # fp16 gradients are loss-scaled: an overflow there is the dynamic loss scaler's business (Megatron's
        # optimizer skips the update and lowers the scale), so only the loss is checked.
        self.check_gradients = stages.cfg.train.precision != "fp16"

    def __call__(self, microbatches: list[dict], *, stop_flag: bool = False,
                 skip_update: Callable[[float], bool] | None = None) -> StepResult:
        """`skip_update(mean_loss)`, called on every rank with the step's global mean loss once the step is known
        to be finite, returns True (on every rank alike) to skip the update (logging.skip_spikes)."""
        stages = self.stages
        for chunk in stages.chunks:
            chunk.zero_grad_buffer()
        stages.optimizer.zero_grad()  # with overlap_param_gather this also dispatches the first all-gather
        loss = self.forward_backward(microbatches)
        buffers = [b for c in stages.chunks for b in c.buffers + c.expert_parallel_buffers] \
            if self.check_gradients else []
        nonfinite, stop, mean_loss = agree(nonfinite_flag(loss, buffers, stages.device), stop_flag, loss,
                                           stages.device)
        if nonfinite:
            return StepResult(float("nan"), float("nan"), "non-finite loss or gradient", stop)
        if skip_update is not None and skip_update(mean_loss):
            return StepResult(loss, float("nan"), SPIKE_SKIP, stop)
        timer = phase_timer(stages.config, "optimizer")
        timer.start()
        updated, grad_norm, _ = stages.optimizer.step()
        timer.stop()
        if not updated:  # fp16: the scaled gradients overflowed; the loss scale went down
            return StepResult(loss, float("nan"), "fp16 gradient overflow", stop)
        stages.scheduler.step(increment=1)
        return StepResult(loss, float("nan") if grad_norm is None else grad_norm, None, stop)


def phase_timer(config, name: str):
    """The run's timer of phase `name` (logging.timers; runtime.timers), or Megatron's no-op timer."""
    return config.timers(name) if config.timers is not None else DummyTimer()


def nonfinite_flag(loss: torch.Tensor | None, buffers: list, device) -> torch.Tensor:
    """1.0 when the loss or any gradient buffer holds a NaN/Inf, else 0.0 (a device scalar, no host sync).

    Each buffer is reduced with `torch.aminmax`, which propagates NaN and keeps ±Inf, so its two results
    are finite exactly when every element is: no full-size boolean temporary, and no overflow of a sum or
    a norm of large finite fp32 main gradients.
    """
    parts = [loss.detach().float().reshape(1)] if loss is not None else []
    for buffer in buffers:
        if buffer.grad_data.numel():
            parts.extend(t.float().reshape(1) for t in torch.aminmax(buffer.grad_data))
    if not parts:
        return torch.zeros((), device=device)
    return (~torch.isfinite(torch.cat(parts))).any().float()


def agree(nonfinite: torch.Tensor, stop: bool, loss: torch.Tensor | None, device) -> tuple[bool, bool, float]:
    """One SUM all-reduce and one host sync per step: whether any rank is non-finite, whether any rank asked to
    stop, and the step's mean loss over the last-stage ranks that hold one (the loss-spike check reads it)."""
    held = loss is not None
    values = torch.stack([nonfinite.to(device=device, dtype=torch.float32).reshape(()),
                          torch.tensor(float(stop), device=device),
                          loss.detach().float().reshape(()) if held else torch.zeros((), device=device),
                          torch.tensor(float(held), device=device)])
    dist.all_reduce(values)
    flagged, stops, total, count = values.tolist()
    return flagged > 0, stops > 0, total / count if count else float("nan")
