"""Every random stream of a rank: seeding as Megatron-LM does it, and capture / restore for replays.

Seeds (`seed_rank`), following Megatron-LM's `_set_random_seed` with `--data-parallel-random-init`:
- the rank seed is `base + 100·pp_rank + 10·dp_rank`: distinct per pipeline stage and per data-parallel
  replica, the same on the TP ranks of one replica (they hold shards of the same activations);
- python, numpy, torch's default generator (CPU and CUDA) and Megatron's tracked `data-parallel-rng`
  stream start from the rank seed; drop-path (models.layer_specs.DropPathBiasAdd) and Megatron's hidden
  dropout draw there, so masks differ across DP replicas and agree across TP ranks;
- Megatron's `model-parallel-rng` tracker stream (`model_parallel_cuda_manual_seed`) starts from rank
  seed + 2718 + tp_rank: TP-distinct, for dropout inside TP-sharded regions (attention heads, and whole
  layers under sequence parallelism).
`base` is the run's seed for a run that starts at step 0. A run that continues from a checkpoint whose
streams cannot be restored (saved at another layout) re-derives them: `base` becomes a hash of (seed,
step), the same for every resume of that checkpoint at any layout, and new streams rather than a replay
of step 0's.

Capture / restore: accumulated-loss training runs each microbatch twice (an embedding pass, then a
forward-backward pass); drop-path, dropout and augmentation must draw the same numbers both times.
Checkpoints save the same bundle per rank, so a run resumed at the same layout continues each stream.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel

PP_SEED_STRIDE = 100
DP_SEED_STRIDE = 10
DATA_PARALLEL_STREAM = "data-parallel-rng"
"""Megatron's tracked stream that is the same on the TP ranks of a replica (tensor_parallel.random)."""


def base_seed(seed: int, step: int = 0) -> int:
    """The run's seed at step 0; for streams re-derived at `step`, a hash of (seed, step) below 2**31."""
    if step == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0] % 2**31)


def rank_seed(seed: int, pp_rank: int, dp_rank: int, step: int = 0) -> int:
    """Megatron-LM's per-rank seed: base + 100·pp_rank + 10·dp_rank."""
    return base_seed(seed, step) + PP_SEED_STRIDE * pp_rank + DP_SEED_STRIDE * dp_rank


def seed_rank(seed: int, *, tp_rank: int, pp_rank: int, dp_rank: int, step: int = 0) -> int:
    """Seed every stream of this rank (see the module docstring); returns the rank seed."""
    value = rank_seed(seed, pp_rank, dp_rank, step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    tensor_parallel.model_parallel_cuda_manual_seed(value, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    return value


def capture() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    # Streams the saved bundle lacks (an older checkpoint) keep their current state.
    tracker.set_states({**tracker.get_states(), **{k: v.clone() for k, v in state["tracker"].items()}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
