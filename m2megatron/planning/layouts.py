"""Layout planner: every TP × PP (× VP) × DP layout of a model on N GPUs that fits in memory, with an
estimated step time and the communication of each loss mode.

Step time = compute + exposed communication:
- compute: model FLOPs of the global batch (×4/3 with full recompute, +1 forward with accumulation),
  split over N GPUs, at `mfu` of the peak, stretched by the pipeline bubble (PP − 1)/(M·VP);
- exposed communication: the DP gradient reduction (the trainer sets overlap_grad_reduce off), the loss
  collectives, the TP all-reduces (on the critical path of every layer) and the PP sends, each at the
  bandwidth of the links its group spans (NVLink inside a node, the network across nodes).
Ranks are ordered TP fastest, then DP, then PP (m2megatron.parallel.layout), which decides which groups
leave a node.
"""

from __future__ import annotations

from dataclasses import dataclass

from m2megatron.config.model import ModelConfig
from m2megatron.planning.communication import (
    gradient_sent_bytes,
    loss_sent_bytes,
    pipeline_sent_bytes,
    tensor_parallel_sent_bytes,
)
from m2megatron.planning.flops import forward_flops_per_sample
from m2megatron.planning.memory import PlanInput, peak_rank

GIB = 2 ** 30
GPUS = {"h100": 80e9, "h200": 141e9}
"""Device memory in bytes (H100 SXM 80 GB, H200 141 GB)."""


@dataclass(frozen=True, kw_only=True)
class Cluster:
    num_gpus: int
    """N, total GPUs."""
    gpu_memory: float
    """Bytes per GPU."""
    gpus_per_node: int = 8
    """GPUs sharing NVLink."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (PEAK_TFLOPS of m2megatron.planning.flops; 1979 for FP8)."""
    mfu: float = 0.4
    """Assumed fraction of the peak reached by the executed FLOPs."""
    nvlink_gbs: float = 450.0
    """Per-GPU NVLink bandwidth in GB/s (one direction)."""
    network_gbs: float = 50.0
    """Per-GPU network bandwidth across nodes in GB/s (one 400 Gb/s NIC per GPU)."""
    reserve_bytes: float = 4 * GIB
    """Per-GPU reserve for the CUDA context, NCCL buffers and allocator fragmentation."""


@dataclass(frozen=True, kw_only=True)
class LayoutRow:
    plan: PlanInput
    memory: float
    """Peak bytes of the fullest rank (runtime reserve included)."""
    step_s: float
    """Estimated seconds per optimizer step."""
    model_mfu: float
    """Model FLOPs (no recompute) per second over N × peak."""
    dp_bytes: float
    """DP gradient bytes sent per rank per step."""
    loss_bytes: dict
    """Loss bytes sent per rank per step for each loss mode name."""
    tp_pp_bytes: float
    """TP + PP bytes sent per rank per step."""


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s of a group whose ranks lie `span` consecutive global ranks apart in total."""
    return (cluster.nvlink_gbs if span <= cluster.gpus_per_node else cluster.network_gbs) * 1e9


def loss_modes(plan: PlanInput, cluster: Cluster) -> dict[str, tuple[int, int]]:
    """name → (G, A): global (G = DP), grouped inside a node (G = gpus_per_node / TP) and accumulated over
    the step's microbatches (A = M)."""
    node_group = max(1, min(plan.dp, cluster.gpus_per_node // plan.tp))
    while plan.dp % node_group:
        node_group -= 1
    return {"G=P": (plan.dp, 1), "G=node": (node_group, 1), "A=M": (plan.dp, plan.num_microbatches)}


def _loss_step_bytes(plan: PlanInput, group: int, accumulation: int) -> float:
    """Loss bytes per step: M evaluations over b rows, or M/A evaluations over A·b rows (the same total)."""
    elem = 4 if plan.precision == "fp32" else 2
    per_eval = loss_sent_bytes(group=group, rows=plan.micro_batch * accumulation, embed_dim=plan.model.embed_dim,
                               elem=elem)
    return per_eval * plan.num_microbatches / accumulation


def estimate(plan: PlanInput, cluster: Cluster) -> LayoutRow:
    m = plan.model
    global_batch = plan.micro_batch * plan.num_microbatches * plan.dp
    forward = forward_flops_per_sample(m) * global_batch
    executed = forward * (3 + (1 if plan.recompute else 0) + (1 if plan.accumulation > 1 else 0))
    bubble = (plan.pp - 1) / (plan.num_microbatches * (plan.vp or 1))
    compute_s = executed / (cluster.num_gpus * cluster.peak_tflops * 1e12 * cluster.mfu) * (1 + bubble)
    rank = peak_rank(plan)
    elem = 4 if plan.precision == "fp32" else 2
    dp_bytes = gradient_sent_bytes(rank.parameters_count, plan.dp, distributed_optimizer=plan.distributed_optimizer,
                                   param_elem=elem)
    modes = {name: _loss_step_bytes(plan, g, a) for name, (g, a) in loss_modes(plan, cluster).items()}
    chosen = _loss_step_bytes(plan, plan.group, plan.accumulation)
    tokens = (m.num_image_tokens + m.max_text_len) * plan.micro_batch
    layers = 2 * m.num_layers // plan.pp + m.num_vl_layers  # both towers' layers on a stage (+ VL on the last)
    tp_bytes = plan.num_microbatches * tensor_parallel_sent_bytes(m, tp=plan.tp, layers=layers, tokens=tokens,
                                                                  elem=elem)
    pp_bytes = plan.num_microbatches * pipeline_sent_bytes(m, tokens=tokens, elem=elem) if plan.pp > 1 else 0.0
    comm_s = (dp_bytes / _bandwidth(cluster, plan.tp * plan.dp)
              + chosen / _bandwidth(cluster, plan.tp * plan.group)
              + tp_bytes / _bandwidth(cluster, plan.tp)
              + pp_bytes / _bandwidth(cluster, plan.tp * plan.dp * plan.pp))
    step = compute_s + comm_s
    return LayoutRow(plan=plan, memory=rank.total, step_s=step,
                     model_mfu=3 * forward / step / (cluster.num_gpus * cluster.peak_tflops * 1e12),
                     dp_bytes=dp_bytes, loss_bytes=modes, tp_pp_bytes=tp_bytes + pp_bytes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_plans(model: ModelConfig, cluster: Cluster, *, global_batch: int, precision: str,
                    micro_batches=(4, 8, 16, 32, 64), loss_group_size: int | None = None, chunk: int | None = None,
                    accumulation: bool = False) -> list[PlanInput]:
    """Every (TP, PP, VP, DP, b, recompute, distributed optimizer) that divides the model and the batch."""
    plans = []
    for tp in (t for t in (1, 2, 4, 8) if model.num_attention_heads % t == 0 and t <= cluster.gpus_per_node):
        for pp in (p for p in _divisors(model.num_layers) if cluster.num_gpus % (tp * p) == 0):
            dp = cluster.num_gpus // (tp * pp)
            vps = [None] + [v for v in _divisors(model.num_layers // pp) if 1 < v <= 4 and pp > 1]
            for vp in vps:
                for b in micro_batches:
                    if global_batch % (b * dp):
                        continue
                    num = global_batch // (b * dp)
                    if vp and num % pp:  # Megatron's interleaved schedule runs microbatches in groups of PP
                        continue
                    group = loss_group_size if loss_group_size and dp % loss_group_size == 0 else None
                    for recompute in (False, True):
                        for dist_opt in (True, False):
                            plans.append(PlanInput(
                                model=model, tp=tp, pp=pp, dp=dp, vp=vp, micro_batch=b, num_microbatches=num,
                                precision=precision, recompute=recompute, distributed_optimizer=dist_opt,
                                loss_group_size=group, chunk=chunk, accumulation=num if accumulation else 1,
                                runtime_reserve_bytes=int(cluster.reserve_bytes)))
    return plans


def plan_layouts(model: ModelConfig, cluster: Cluster, **kwargs) -> list[LayoutRow]:
    """Layouts that fit in `cluster.gpu_memory`, fastest first."""
    rows = [estimate(p, cluster) for p in candidate_plans(model, cluster, **kwargs)]
    # The time model does not see how kernel efficiency grows with b: among equal times, larger b first.
    return sorted((r for r in rows if r.memory <= cluster.gpu_memory), key=lambda r: (r.step_s, -r.plan.micro_batch))


def largest_microbatch_per_layout(rows: list[LayoutRow]) -> list[LayoutRow]:
    """One row per (TP, PP, VP, DP, recompute, distributed optimizer): the largest microbatch that fits."""
    best: dict[tuple, LayoutRow] = {}
    for r in rows:
        p = r.plan
        key = (p.tp, p.pp, p.vp, p.dp, p.recompute, p.distributed_optimizer)
        if key not in best or p.micro_batch > best[key].plan.micro_batch:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.step_s, -r.plan.micro_batch))
