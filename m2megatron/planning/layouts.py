"""Layout planner: every TP × PP (× VP) × DP layout of a model on N GPUs, with its pipeline split, that fits
in memory, with an estimated step time and the communication of each loss mode.

Step time = compute + exposed communication:
- compute: model FLOPs of the global batch (+1 forward with full recompute, + the attention forward with
  selective recompute, +1 forward with accumulation), split over N GPUs, at `mfu` of the peak, stretched
  by the stage imbalance max/mean of the pipeline ranks' FLOPs (planning/stage_balance.py), plus the
  pipeline bubble (PP − 1)/(M·VP) of it, stretched by the virtual stages' max/mean FLOPs;
- exposed communication: the DP gradient reduction (with overlap_grad_reduce only what the last
  microbatch's backward does not hide; with overlap_param_gather the all-gather likewise behind the first
  forward), the loss collectives, the TP all-reduces (on the critical path of every layer) and the PP
  sends, each at the bandwidth of the links its group spans (NVLink inside a node, the network across).
Ranks are ordered TP fastest, then DP, then PP (m2megatron.parallel.layout), which decides which groups
leave a node. PP need not divide the layers: each PP (× VP) is tried with its best-balanced uneven splits.
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
from m2megatron.planning.stage_balance import candidate_splits, layer_pair_flops, stage_split

GIB = 2 ** 30
FP32 = 4
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
    imbalance: float = 1.0
    """max / mean forward FLOPs of the pipeline ranks (1.0 = balanced)."""
    bubble: float = 0.0
    """Pipeline bubble (PP − 1)/(M·VP) as a fraction of the steady-state time."""
    exposed_dp_s: float = 0.0
    """DP gradient / parameter communication not hidden behind compute, seconds per step."""


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


def recompute_factor(plan: PlanInput) -> float:
    """Extra forward work of recompute, as a fraction of the model's forward FLOPs."""
    m = plan.model
    if plan.recompute == "selective":  # core attention: scores and context of every layer
        attention = sum(2 * 2 * s * s * m.hidden_size for s in (m.num_image_tokens, m.max_text_len))
        return (m.num_layers + m.num_vl_layers) * attention / forward_flops_per_sample(m)
    if plan.recompute != "full":
        return 0.0
    if plan.recompute_method == "uniform":
        return 1.0
    k = plan.recompute_num_layers  # block: the first k layers of each stack
    ranges = plan.layer_ranges()
    recomputed = sum(min(k, end - start) for start, end in ranges) + min(k, m.num_vl_layers)
    return recomputed * layer_pair_flops(m) / forward_flops_per_sample(m)


def _exposed_dp_seconds(plan: PlanInput, params: int, elem: int, bandwidth: float, microbatch_s: float) -> float:
    """DP communication left on the critical path. The gradient reduction (reduce-scatter of fp32 grads with
    the distributed optimizer, else an all-reduce) hides behind the last microbatch's backward (2/3 of its
    time) with overlap_grad_reduce; the distributed optimizer's all-gather of the updated weights hides
    behind the first forward (1/3) with overlap_param_gather."""
    if plan.dp == 1:
        return 0.0
    if plan.distributed_optimizer:
        reduce_s = (plan.dp - 1) / plan.dp * params * FP32 / bandwidth
        gather_s = (plan.dp - 1) / plan.dp * params * elem / bandwidth
    else:
        reduce_s, gather_s = 2 * (plan.dp - 1) / plan.dp * params * FP32 / bandwidth, 0.0
    if plan.overlap_grad_reduce:
        reduce_s = max(0.0, reduce_s - 2 / 3 * microbatch_s)
    if plan.overlap_param_gather:
        gather_s = max(0.0, gather_s - 1 / 3 * microbatch_s)
    return reduce_s + gather_s


def estimate(plan: PlanInput, cluster: Cluster) -> LayoutRow:
    m = plan.model
    global_batch = plan.micro_batch * plan.num_microbatches * plan.dp
    forward = forward_flops_per_sample(m) * global_batch
    executed = forward * (3 + recompute_factor(plan) + (1 if plan.accumulation > 1 else 0))
    bubble = (plan.pp - 1) / (plan.num_microbatches * (plan.vp or 1))
    split = stage_split(m, plan.pp, plan.vp, plan.first_stage_layers, plan.last_stage_layers)
    balanced_s = executed / (cluster.num_gpus * cluster.peak_tflops * 1e12 * cluster.mfu)
    steady_s = balanced_s * split.imbalance  # the busiest rank sets the pace
    compute_s = steady_s + balanced_s * bubble * split.stage_imbalance
    rank = peak_rank(plan)
    elem = 4 if plan.precision in ("fp32", "bf16-autocast") else 2
    dp_bytes = gradient_sent_bytes(rank.parameters_count, plan.dp, distributed_optimizer=plan.distributed_optimizer,
                                   param_elem=elem)
    dp_s = _exposed_dp_seconds(plan, rank.parameters_count, elem, _bandwidth(cluster, plan.tp * plan.dp),
                               steady_s / plan.num_microbatches)
    modes = {name: _loss_step_bytes(plan, g, a) for name, (g, a) in loss_modes(plan, cluster).items()}
    chosen = _loss_step_bytes(plan, plan.group, plan.accumulation)
    tokens = (m.num_image_tokens + m.max_text_len) * plan.micro_batch
    layers = 2 * max(sum(e - s for s, e in plan.layer_ranges()[p::plan.pp]) for p in range(plan.pp)) + m.num_vl_layers
    tp_bytes = plan.num_microbatches * tensor_parallel_sent_bytes(m, tp=plan.tp, layers=layers, tokens=tokens,
                                                                  elem=elem)
    pp_bytes = plan.num_microbatches * pipeline_sent_bytes(m, tokens=tokens, elem=elem) if plan.pp > 1 else 0.0
    comm_s = (dp_s + chosen / _bandwidth(cluster, plan.tp * plan.group)
              + tp_bytes / _bandwidth(cluster, plan.tp)
              + pp_bytes / _bandwidth(cluster, plan.tp * plan.dp * plan.pp))
    step = compute_s + comm_s
    return LayoutRow(plan=plan, memory=rank.total, step_s=step,
                     model_mfu=3 * forward / step / (cluster.num_gpus * cluster.peak_tflops * 1e12),
                     dp_bytes=dp_bytes, loss_bytes=modes, tp_pp_bytes=tp_bytes + pp_bytes,
                     imbalance=split.imbalance, bubble=bubble, exposed_dp_s=dp_s)


def pipeline_splits(model: ModelConfig, pp: int, vp: int | None, limit: int = 3) -> list[tuple[int | None, int | None]]:
    """(first_stage_layers, last_stage_layers) to try at PP × VP: the best-balanced valid splits and the even one."""
    if pp == 1:
        return [(None, None)]
    return [(s.first, s.last) for s in candidate_splits(model, pp, vp, limit)]


def _pipeline_layouts(model: ModelConfig, cluster: Cluster, tp: int, split_limit: int):
    """(PP, VP, first, last) for every PP that leaves a whole DP and every split worth trying."""
    for pp in range(1, model.num_layers + 1):
        if cluster.num_gpus % (tp * pp):
            continue
        for vp in [None] + ([2, 3, 4] if pp > 1 else []):
            for first, last in pipeline_splits(model, pp, vp, split_limit):
                yield pp, vp, first, last


def candidate_plans(model: ModelConfig, cluster: Cluster, *, global_batch: int, precision: str,
                    micro_batches=(4, 8, 16, 32, 64), loss_group_size: int | None = None, chunk: int | None = None,
                    accumulation: bool = False, recompute_modes=("none", "selective", "full"),
                    sequence_parallel=(False, True), overlap: bool = True, split_limit: int = 3) -> list[PlanInput]:
    """Every (TP, PP, VP, stage split, DP, b, recompute, SP, distributed optimizer) that fits the model and the
    batch. `overlap`: plan with overlap_grad_reduce (and overlap_param_gather with the distributed optimizer).
    Selective recompute is skipped where attention keeps no probabilities (it would equal 'none')."""
    plans = []
    for tp in (t for t in (1, 2, 4, 8) if model.num_attention_heads % t == 0 and t <= cluster.gpus_per_node):
        for pp, vp, first, last in _pipeline_layouts(model, cluster, tp, split_limit):
            dp = cluster.num_gpus // (tp * pp)
            for b in (b for b in micro_batches if global_batch % (b * dp) == 0):
                num = global_batch // (b * dp)
                if vp and num % pp:  # Megatron's interleaved schedule runs microbatches in groups of PP
                    continue
                group = loss_group_size if loss_group_size and dp % loss_group_size == 0 else None
                for recompute in recompute_modes:
                    for sp in (s for s in sequence_parallel if tp > 1 or not s):
                        for dist_opt in (True, False):
                            plan = PlanInput(
                                model=model, tp=tp, pp=pp, dp=dp, vp=vp, micro_batch=b, num_microbatches=num,
                                first_stage_layers=first, last_stage_layers=last, precision=precision,
                                recompute=recompute, sequence_parallel=sp, distributed_optimizer=dist_opt,
                                overlap_grad_reduce=overlap, overlap_param_gather=overlap and dist_opt,
                                loss_group_size=group, chunk=chunk, accumulation=num if accumulation else 1,
                                runtime_reserve_bytes=int(cluster.reserve_bytes))
                            if recompute == "selective" and plan.fused_attention:
                                continue
                            plans.append(plan)
    return plans


def plan_layouts(model: ModelConfig, cluster: Cluster, **kwargs) -> list[LayoutRow]:
    """Layouts that fit in `cluster.gpu_memory`, fastest first."""
    rows = [estimate(p, cluster) for p in candidate_plans(model, cluster, **kwargs)]
    # The time model does not see how kernel efficiency grows with b: among equal times, larger b first.
    return sorted((r for r in rows if r.memory <= cluster.gpu_memory), key=lambda r: (r.step_s, -r.plan.micro_batch))


def largest_microbatch_per_layout(rows: list[LayoutRow]) -> list[LayoutRow]:
    """One row per (TP, PP, VP, split, DP, recompute, SP, distributed optimizer): the largest microbatch that fits."""
    best: dict[tuple, LayoutRow] = {}
    for r in rows:
        p = r.plan
        key = (p.tp, p.pp, p.vp, p.first_stage_layers, p.last_stage_layers, p.dp, p.recompute, p.sequence_parallel,
               p.distributed_optimizer)
        if key not in best or p.micro_batch > best[key].plan.micro_batch:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.step_s, -r.plan.micro_batch))
