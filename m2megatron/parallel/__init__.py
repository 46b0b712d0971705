"""Process-group set-up. The only package that touches Megatron-Core's global parallel state.

Its names are imported on first use (PEP 562), so that `m2megatron.parallel.launch_env` can be read without
importing torch and Megatron-Core.
"""

import importlib

_WHERE = {"Layout": "layout", "ParallelGroups": "groups", "build_groups": "groups", "initialize": "bootstrap",
          "read_launch_env": "launch_env", "seed_everything": "bootstrap", "shutdown": "bootstrap"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'm2megatron.parallel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"m2megatron.parallel.{_WHERE[name]}"), name)
