"""Measure one rank's peak live tensor bytes over a real training step (the planner's ground truth on CPU).

Builds this rank's stages, Megatron DDP and optimizer through the stage runtime, as the trainer does, inside a
`LiveTensorBytes` tracker, runs one warm-up step (Adam allocates its state on the first step), then
measures the peak of a second step. Call on every rank of an initialised layout.
"""

from __future__ import annotations

import torch

from m2megatron.config.run import RunConfig
from m2megatron.planning.live_bytes import LiveTensorBytes


def synthetic_microbatches(cfg: RunConfig, num_microbatches: int, seed: int = 0) -> list[dict]:
    """Random images and half-padded captions, one dict per microbatch (the trainer's batch format)."""
    gen = torch.Generator().manual_seed(seed)
    m, b, s = cfg.model, cfg.train.micro_batch_size, cfg.model.max_text_len
    out = []
    for i in range(num_microbatches):
        lengths = torch.randint(2, s + 1, (b,), generator=gen)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        out.append({"images": torch.rand(b, m.num_channels, m.image_size, m.image_size, generator=gen) * 2 - 1,
                    "text_ids": torch.randint(0, m.vocab_size, (b, s), generator=gen) * mask,
                    "text_mask": mask, "microbatch": i})
    return out


def measure_step_peak(cfg: RunConfig, groups, num_microbatches: int) -> dict[str, int]:
    """{'peak': peak live bytes during step 2, 'static': live bytes before it} for this rank."""
    from m2megatron.runtime import ContrastiveStep, build_stages

    with LiveTensorBytes() as tracker:
        stages = build_stages(cfg, groups)
        chunks, optimizer = stages.chunks, stages.optimizer
        step = ContrastiveStep(stages)
        batches = synthetic_microbatches(cfg, num_microbatches)
        result = {}
        for i in range(2):
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            if i == 1:
                result["static"] = tracker.live
                tracker.reset_peak()
            step(batches)
            optimizer.step()
        result["peak"] = tracker.peak
    return result
