"""Planning: per-rank memory of a training step, layouts of a model on a cluster, pipeline-stage balance, and
how to measure them.

    from m2megatron.planning import PlanInput, plan_memory, Cluster, plan_layouts, balanced_split
    ranks = plan_memory(PlanInput(model=preset("m2-1b"), tp=2, pp=3, dp=4, micro_batch=8, precision="bf16"))
    ranks = plan_memory(PlanInput.from_run_config(cfg, world_size))      # a RunConfig's own settings
    split = balanced_split(preset("m2-10b"), pp=4)                      # first/last stage layers, FLOP spread

See docs/PERFORMANCE.md; tools/plan_memory.py and tools/plan_layout.py print them as tables.
"""

from m2megatron.config.stage_split import layer_ranges, rank_layer_counts, stage_layer_counts
from m2megatron.planning.layouts import GPUS, Cluster, LayoutRow, candidate_plans, estimate, plan_layouts
from m2megatron.planning.live_bytes import LiveTensorBytes
from m2megatron.planning.memory import CATEGORIES, PlanInput, RankMemory, peak_rank, plan_memory
from m2megatron.planning.stage_balance import StageSplit, balanced_split, stage_forward_flops, stage_split

__all__ = ["CATEGORIES", "GPUS", "Cluster", "LayoutRow", "LiveTensorBytes", "PlanInput", "RankMemory", "StageSplit",
           "balanced_split", "candidate_plans", "estimate", "layer_ranges", "peak_rank", "plan_layouts", "plan_memory",
           "rank_layer_counts", "stage_forward_flops", "stage_layer_counts", "stage_split"]
