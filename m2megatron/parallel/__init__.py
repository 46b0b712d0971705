"""Process-group set-up. The only package that touches Megatron-Core's global parallel state."""

from m2megatron.parallel.bootstrap import initialize, read_launch_env, seed_everything, shutdown
from m2megatron.parallel.groups import ParallelGroups, build_groups
from m2megatron.parallel.layout import Layout

__all__ = ["Layout", "ParallelGroups", "build_groups", "initialize", "read_launch_env", "seed_everything",
           "shutdown"]
