"""One optimizer step's forward and backward through Megatron-Core's pipeline schedules.

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

import torch
from megatron.core.timers import DummyTimer

from m2megatron.loss import accumulated_loss_and_grads, contrastive_loss, surrogate_loss
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

    def __call__(self, microbatches: list[dict]) -> torch.Tensor | None:
        """Forward and backward of one step's microbatches.

        Returns this rank's loss (mean over the step's microbatches) on the last stage, else None.
        """
        if self.cfg.loss.accumulation_steps > 1:
            return self._accumulated(microbatches)
        group, loss_cfg = self.loss_group, self.cfg.loss
        timer = self._loss_timer()

        def loss_fn(batch, out):
            timer.start()  # the loss group's gather: where a rank waits for the slowest of its group
            loss = contrastive_loss(out.image, out.text, out.logit_scale, group=group, config=loss_cfg)
            timer.stop()
            return loss, {"loss": loss.detach()}

        reports = run_schedule(self.stages.chunks, self.stages.groups, microbatches, loss_fn)
        return torch.stack([r["loss"] for r in reports]).mean() if self.stages.is_last_stage else None

    def _loss_timer(self):
        """The 'loss' phase timer (logging.timers), or Megatron's no-op timer."""
        timers = self.stages.config.timers
        return timers("loss") if timers is not None else DummyTimer()

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
            run_schedule(self.stages.chunks, self.stages.groups, microbatches, collect,
                         forward_only=True)  # pass 1
        cached = None
        timer = self._loss_timer()
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

        run_schedule(self.stages.chunks, self.stages.groups, microbatches, surrogate)  # pass 3
        return cached.loss if cached is not None else None
