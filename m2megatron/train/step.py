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

import functools
from collections.abc import Callable

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from m2megatron.config.run import RunConfig
from m2megatron.loss import accumulated_loss_and_grads, contrastive_loss, surrogate_loss
from m2megatron.parallel.groups import ParallelGroups
from m2megatron.train import rng


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class PipelineStep:
    """Runs the schedule for this rank's model chunks; returns the loss on the last stage."""

    def __init__(self, chunks: list, groups: ParallelGroups, cfg: RunConfig):
        self.chunks, self.groups, self.cfg = chunks, groups, cfg
        self.stage_modules = [_unwrap(c) for c in chunks]
        layout = groups.layout
        self.forward_backward = get_forward_backward_func(layout.pipeline_parallel, layout.virtual_pipeline)
        config = self.stage_modules[0].config
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
        self.p2p = P2PCommunicator(pp_group=groups.pp, config=config) if layout.pipeline_parallel > 1 else None
        self.seq_length = cfg.model.num_image_tokens + cfg.model.max_text_len
        self.is_last_stage = any(m.post_process for m in self.stage_modules)

    # ---- schedule plumbing ------------------------------------------------------------------------
    def _forward_step(self, loss_fn: Callable) -> Callable:
        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            stage = _unwrap(model)
            out = model(images=batch["images"] if stage.pre_process else None,
                        text_ids=batch["text_ids"] if stage.pre_process else None,
                        text_mask=batch["text_mask"])
            return out, functools.partial(loss_fn, batch)
        return forward_step

    def _run(self, microbatches: list[dict], loss_fn: Callable, forward_only: bool) -> list:
        iterators = [iter(microbatches) for _ in self.chunks]
        kwargs = {"p2p_communicator": self.p2p} if self.p2p is not None else {}
        return self.forward_backward(
            forward_step_func=self._forward_step(loss_fn),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(microbatches),
            seq_length=self.seq_length,
            micro_batch_size=microbatches[0]["text_ids"].shape[0],
            forward_only=forward_only,
            pg_collection=self.groups.collection,
            **kwargs,
        )

    # ---- the two modes ----------------------------------------------------------------------------
    def __call__(self, microbatches: list[dict]) -> torch.Tensor | None:
        """Forward and backward of one step's microbatches; gradients are left in the DDP buffers.

        Returns this rank's loss (mean over the step's microbatches) on the last stage, else None.
        """
        if self.cfg.loss.accumulation_steps > 1:
            return self._accumulated(microbatches)
        group, loss_cfg = self.groups.loss, self.cfg.loss

        def loss_fn(batch, out):
            loss = contrastive_loss(out.image, out.text, out.logit_scale, group=group, config=loss_cfg)
            return loss, {"loss": loss.detach()}

        reports = self._run(microbatches, loss_fn, forward_only=False)
        return torch.stack([r["loss"] for r in reports]).mean() if self.is_last_stage else None

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
        if self.is_last_stage:  # pass 2
            order = sorted(collected)
            cached = accumulated_loss_and_grads([collected[i][0] for i in order], [collected[i][1] for i in order],
                                                collected[order[-1]][2], group=self.groups.loss,
                                                config=self.cfg.loss)
        rng.restore(state)

        def surrogate(batch, out):
            # The schedule divides every microbatch loss by `num`; scale back so the sum is exact.
            loss = surrogate_loss(out.image, out.text, cached, batch["microbatch"], logit_scale=out.logit_scale)
            return loss * num, {}

        self._run(microbatches, surrogate, forward_only=False)  # pass 3
        return cached.loss if cached is not None else None
