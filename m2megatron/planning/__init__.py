"""Planning: per-rank memory of a training step, layouts of a model on a cluster, and how to measure them.

    from m2megatron.planning import PlanInput, plan_memory, Cluster, plan_layouts
    ranks = plan_memory(PlanInput(model=preset("m2-1b"), tp=2, pp=3, dp=4, micro_batch=8, precision="bf16"))

See docs/PERFORMANCE.md; tools/plan_memory.py and tools/plan_layout.py print them as tables.
"""

from m2megatron.planning.layouts import GPUS, Cluster, LayoutRow, candidate_plans, estimate, plan_layouts
from m2megatron.planning.live_bytes import LiveTensorBytes
from m2megatron.planning.memory import CATEGORIES, PlanInput, RankMemory, peak_rank, plan_memory

__all__ = ["CATEGORIES", "GPUS", "Cluster", "LayoutRow", "LiveTensorBytes", "PlanInput", "RankMemory",
           "candidate_plans", "estimate", "peak_rank", "plan_layouts", "plan_memory"]
