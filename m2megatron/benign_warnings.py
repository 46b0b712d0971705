"""The one place where warnings we know to be harmless are silenced, each with its reason. Everything else shows.

`install()` runs when the m2megatron package is imported (before Megatron-Core is), `install_cpu_host()`
when the CPU patches are applied (m2megatron.compat.cpu), so GPU hosts keep those warnings.
"""

from __future__ import annotations

import warnings

_EVERYWHERE = (
    # Megatron-Core falls back to torch implementations without Transformer Engine / apex. That is the
    # intended set-up on CPU hosts and on bare GPU hosts (the `local` layer spec); NGC hosts have both.
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning),
    # Megatron-Core 0.16.1's dist_checkpointing calls torch's deprecated checkpoint.load_state_dict; not ours to change.
    ("`load_state_dict` is deprecated and will be removed in future versions", FutureWarning),
    # dist_checkpointing's offline readers (consolidate, inspect) load in one process on purpose.
    ("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
     "process", UserWarning),
)
_CPU_HOST = (
    # A CUDA stream setting; a CPU host has no CUDA streams (GPU hosts get CUDA_DEVICE_MAX_CONNECTIONS=1 from
    # m2megatron.parallel.device where it fires, at TP > 1, unless the user set another value).
    ("When using async grad allreduce it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
)


def _ignore(entries) -> None:
    for message, category in entries:
        warnings.filterwarnings("ignore", message=message, category=category)


def install() -> None:
    _ignore(_EVERYWHERE)


def install_cpu_host() -> None:
    _ignore(_CPU_HOST)
