"""Test support for the model tests: the torchscale reference (tools/torchscale_reference.py, the model
benchmark's peer), sample inputs, and a one-process world with Megatron groups.
"""

from __future__ import annotations

import torch

from tools.torchscale_reference import (  # noqa: F401 - re-exported for the tests
    ReferenceM2,
    randomize_,
    tiny_reference,
    torchscale_available,
)

_groups = None


def single_groups():
    """Megatron groups for a world of one (this process), RNG tracker seeded. Rebuilt if another test tore
    the process group or Megatron's state down in between."""
    global _groups
    import torch.distributed as dist
    from megatron.core import parallel_state

    from m2megatron.config import ParallelConfig
    from m2megatron.parallel import initialize, seed_everything

    if _groups is None or not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        _groups = initialize(ParallelConfig())
    seed_everything(0, _groups)
    return _groups


def sample_inputs(cfg, b: int = 3, seed: int = 0):
    """Random normalized images and random ids with masks of different lengths (full, 7 and 2 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.max_text_len), generator=gen)
    lengths = torch.tensor([cfg.max_text_len, 7, 2, 1] * b)[:b]
    mask = (torch.arange(cfg.max_text_len)[None] < lengths[:, None]).long()
    return images, ids, mask


