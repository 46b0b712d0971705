"""Capture and restore every random state, so a pass can be replayed exactly.

Accumulated-loss training runs each microbatch twice (an embedding pass, then a forward-backward
pass); drop-path, dropout and augmentation must draw the same numbers both times. Checkpoints
save the same bundle so a resumed run continues the same random stream.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel


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
    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
