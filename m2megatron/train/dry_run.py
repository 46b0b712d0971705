"""A dry run of a full-scale layout on one CPU: rank r of N on torch's fake process-group backend (every
collective a no-op), its stage chunks, DDP buffers and optimizer built by the stage runtime on the `meta`
device (shapes only, no memory), checked against the memory and layout planners before anyone books GPUs.

    python -m m2megatron.train --dry-run --world-size 256 --config launch/examples/m2-10b_h100_256.yaml
    python -m m2megatron.train --dry-run --world-size 1024 --all-ranks --preset m2-10b --parallel.tensor_parallel=4

Per visited rank it reports its coordinates and process groups (and whether its loss group leaves a node),
the built parameter, gradient-buffer and optimizer-state bytes and the activation bytes of one microbatch
(a forward of its chunks on meta tensors, counted by storage) beside the planner's figures, the
microbatches per step, the pipeline bubble, the contrastive batch and the global batch. `--all-ranks`
visits one rank per pipeline stage (TP and DP ranks of a stage hold the same shapes) and fails with one
line per problem found.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from m2megatron.config.model import count_parameters
from m2megatron.config.run import RunConfig
from m2megatron.parallel.fake_world import META, join_fake_world
from m2megatron.parallel.layout import Layout

log = logging.getLogger("m2megatron.train")
RUNTIME_RESERVE_GIB = 4.0
"""CUDA context, NCCL buffers and allocator slack per GPU (the layout planner's reserve)."""
STAGE_FLOP_TOLERANCE = 0.10
"""Largest allowed spread (max / min − 1) of the pipeline ranks' forward FLOPs with uneven stages."""
PLANNER_TOLERANCE = 0.15
"""The memory planner's stated tolerance (docs/PERFORMANCE.md §2)."""


@dataclass
class RankReport:
    rank: int
    coordinates: dict
    """pp, tp, dp and this rank's virtual stages."""
    groups: dict
    """Global ranks of each of this rank's process groups."""
    loss_group_nodes: list[int]
    """Nodes the loss group spans."""
    unique_parameters: int
    """Parameters of this stage counted once over its TP ranks (vocabulary padding excluded)."""
    built: dict = field(default_factory=dict)
    """Bytes of what the runtime built: parameters, gradients, optimizer, activations_per_microbatch."""
    planned: dict = field(default_factory=dict)
    """The memory planner's bytes of the same categories, and its total for the rank."""
    total_bytes: float = 0.0
    """The rank's estimated peak: built categories with the planner's in-flight activations and the rest."""


def rank_classes(layout: Layout) -> list[int]:
    """One rank per pipeline stage (TP 0, DP 0): every TP and DP rank of a stage builds the same shapes."""
    return [layout.rank(0, 0, p) for p in range(layout.pipeline_parallel)]


def _groups_of(layout: Layout, rank: int) -> dict[str, list[int]]:
    tp, dp, pp = layout.coordinates(rank)
    find = {"tp": layout.tp_groups(), "dp": layout.dp_groups(), "pp": layout.pp_groups(),
            "loss": layout.loss_groups()}
    return {name: next(g for g in groups if rank in g) for name, groups in find.items()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(optimizer, mixed: bool) -> int:
    """Adam's two fp32 moments per optimized tensor, plus its fp32 main copy when the weights are bf16/fp16
    (the distributed optimizer optimizes this rank's shards only). Sizes from the built tensors."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    total = 0
    for part in parts:
        inner = part.optimizer
        per_element = 8 if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else 0
        per_element += 4 if mixed else 0
        total += sum(p.numel() * per_element for g in inner.param_groups for p in g["params"])
    return total


def _activation_bytes(stages, cfg: RunConfig) -> int:
    """Bytes autograd keeps for backward after the forward of one training microbatch through this rank's
    chunks, on meta: every saved tensor's storage counted once, parameters excluded. (Counting storages
    allocated on meta would not do: meta's matmul decompositions copy transposed weights that real
    kernels only view.)"""
    from m2megatron.parallel.device import to_device
    from m2megatron.planning.measure import synthetic_microbatches

    m = cfg.model
    (batch,) = synthetic_microbatches(dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=2)), 1)
    batch = to_device(batch, META)
    b, seq = cfg.train.micro_batch_size, m.num_image_tokens + m.max_text_len
    weights = {p.untyped_storage()._cdata for module in stages.modules for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    for chunk in stages.chunks:  # overlap_param_gather's pre-hooks would all-gather shapes that hold no data
        if getattr(chunk, "use_forward_hook", False):
            chunk.disable_forward_pre_hook(param_sync=False)
    kept = []  # the graphs keep the saved tensors alive until the end of the measurement
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for module in stages.modules:
            module.train()
            if not module.pre_process:
                module.set_input_tensor(torch.empty(seq, b, m.hidden_size, device=META,
                                                    dtype=module.config.params_dtype, requires_grad=True))
            kept.append(module(images=batch["images"], text_ids=batch["text_ids"], text_mask=batch["text_mask"]))
    return sum(saved.values())


def measured_config(cfg: RunConfig) -> RunConfig:
    """What the dry run builds: the local spec with Megatron's attention. Their tensors are the same on every
    device, whereas TE and SDPA run other kernels on a CPU than on a GPU (fused ones keep no s × s
    probabilities); the planner's difference between the two is added back for the estimate."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layer_spec="local", fp8="none",
                                                              attention="megatron"))


def _unique_parameters(stages, tp: int) -> int:
    from m2megatron.models.embeddings import padded_vocab_size
    from m2megatron.models.state import VOCAB_KEY, local_state_dict, tp_axis

    total = 0
    for module in stages.modules:
        for name, tensor in local_state_dict(module).items():
            total += tensor.numel() * (tp if tp_axis(name) is not None else 1)
            if name == VOCAB_KEY:
                total -= (padded_vocab_size(module.cfg, tp) - module.cfg.vocab_size) * module.cfg.hidden_size
    return total


def _planned(cfg: RunConfig, world_size: int, pp_rank: int):
    from m2megatron.planning.memory import PlanInput, plan_memory

    plan = PlanInput.from_run_config(cfg, world_size, runtime_reserve_bytes=int(RUNTIME_RESERVE_GIB * 2**30))
    return plan_memory(plan)[pp_rank]


def visit(cfg: RunConfig, world_size: int, rank: int) -> RankReport:
    """Build rank `rank` of `world_size` on meta under a fake world and measure it (module docstring)."""
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import build_stages

    built_cfg = measured_config(cfg)
    join_fake_world(rank, world_size)
    groups = initialize(built_cfg.parallel)
    seed_everything(built_cfg.train.seed, groups)  # Megatron's attention forks the TP RNG stream
    stages = build_stages(built_cfg, groups)
    layout = groups.layout
    spans = _groups_of(layout, rank)
    built = {
        "parameters": _bytes(p for m in stages.modules for p in m.parameters()),
        "gradients": _bytes(b.grad_data for c in stages.chunks for b in c.buffers + c.expert_parallel_buffers),
        "optimizer": _optimizer_bytes(stages.optimizer, cfg.train.precision in ("bf16", "fp16")),
        "activations_per_microbatch": _activation_bytes(stages, built_cfg),
    }
    like_built = _planned(built_cfg, world_size, groups.pp_rank)  # the planner for what was built
    planned = {k: like_built.bytes[k] for k in ("parameters", "gradients", "optimizer")}
    planned["activations_per_microbatch"] = like_built.activations_per_microbatch
    # The estimate: the planner for the real config, with the built categories' measured differences.
    real = _planned(cfg, world_size, groups.pp_rank)
    total = real.total + sum(built[k] - planned[k] for k in ("parameters", "gradients", "optimizer")) + \
        real.microbatches_in_flight * (built["activations_per_microbatch"] - planned["activations_per_microbatch"])
    tp_rank, dp_rank, pp_rank = layout.coordinates(rank)
    return RankReport(
        rank=rank, coordinates={"pp": pp_rank, "tp": tp_rank, "dp": dp_rank,
                                "vp": [s.stage for s in stages.specs] if layout.virtual_pipeline else None},
        groups=spans, loss_group_nodes=sorted({r // _gpus_per_node(cfg) for r in spans["loss"]}),
        unique_parameters=_unique_parameters(stages, layout.tensor_parallel), built=built,
        planned={**planned, "total": real.total}, total_bytes=total)


def _gpus_per_node(cfg: RunConfig) -> int:
    return cfg.launch.gpus_per_node or cfg.launch.procs_per_node


def schedule_figures(cfg: RunConfig, world_size: int) -> dict:
    """Microbatches per step, bubble fraction, contrastive and optimizer batches (no build needed)."""
    par = cfg.parallel
    layout = Layout(world_size=world_size, tensor_parallel=par.tensor_parallel, pipeline_parallel=par.pipeline_parallel,
                    loss_group_size=par.loss_group_size, virtual_pipeline=par.virtual_pipeline)
    m = cfg.num_microbatches(world_size)
    vp = par.virtual_pipeline or 1
    b, a = cfg.train.micro_batch_size, cfg.loss.accumulation_steps
    return {"microbatches": m, "bubble": (layout.pipeline_parallel - 1) / (m * vp + layout.pipeline_parallel - 1),
            "contrastive_batch": layout.group_size * b * a, "global_batch": m * b * layout.data_parallel,
            "layout": layout}


def _split(cfg: RunConfig):
    from m2megatron.planning.stage_balance import stage_split

    par = cfg.parallel
    return stage_split(cfg.model, par.pipeline_parallel, par.virtual_pipeline, par.first_stage_layers,
                       par.last_stage_layers)


def problems(cfg: RunConfig, world_size: int, reports: list[RankReport], gpu_memory_gib: float) -> list[str]:
    """One line per problem of the layout (the checks of `--all-ranks`)."""
    figures = schedule_figures(cfg, world_size)
    layout, out = figures["layout"], []
    unique = sum(r.unique_parameters for r in reports)
    expected = count_parameters(cfg.model)["total"]
    if len(reports) == layout.pipeline_parallel and unique != expected:
        out.append(f"parameters: the stages hold {unique:,} unique parameters, the preset has {expected:,}")
    for r in reports:
        if r.total_bytes > gpu_memory_gib * 2**30:
            out.append(f"memory: rank {r.rank} (pp {r.coordinates['pp']}) needs {r.total_bytes / 2**30:.1f} GiB, "
                       f"more than launch.gpu_memory_gib={gpu_memory_gib:g}")
    per_node, group = _gpus_per_node(cfg), layout.group_size
    crossing = [g for g in layout.loss_groups() if len({r // per_node for r in g}) > 1]
    if crossing and group * layout.tensor_parallel <= per_node:
        out.append(f"parallel.loss_group_size: {len(crossing)} loss groups of G={group} cross a node boundary "
                   f"although G·TP = {group * layout.tensor_parallel} ≤ {per_node} GPUs per node (e.g. ranks "
                   f"{crossing[0][:4]}…)")
    if figures["microbatches"] < layout.pipeline_parallel:
        out.append(f"train.global_batch_size: {figures['microbatches']} microbatches per step < "
                   f"parallel.pipeline_parallel={layout.pipeline_parallel}: the pipeline never fills")
    split = _split(cfg)
    uneven = cfg.parallel.first_stage_layers is not None or cfg.parallel.last_stage_layers is not None
    if uneven and split.spread > STAGE_FLOP_TOLERANCE:
        out.append(f"parallel.first_stage_layers/last_stage_layers: the pipeline ranks' forward FLOPs differ by "
                   f"{split.spread:.0%} (> {STAGE_FLOP_TOLERANCE:.0%}): "
                   + ", ".join(f"{f / 1e12:.3f}" for f in split.rank_flops) + " TFLOP/sample")
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:9.3f}"


def format_report(r: RankReport, figures: dict) -> str:
    c = r.coordinates
    vp = f", virtual stages {c['vp']}" if c["vp"] else ""
    lines = [f"rank {r.rank}: pp {c['pp']}, tp {c['tp']}, dp {c['dp']}{vp}"]
    for name, ranks in r.groups.items():
        shown = ranks if len(ranks) <= 8 else ranks[:4] + ["…"] + ranks[-2:]
        extra = f"; spans node(s) {r.loss_group_nodes}" if name == "loss" else ""
        lines.append(f"  {name:>4} group ({len(ranks)}): {shown}{extra}")
    lines.append(f"  {'bytes (GiB)':<28}{'built':>9} {'planned':>9} {'diff':>7}")
    for key in ("parameters", "gradients", "optimizer", "activations_per_microbatch"):
        built, planned = r.built[key], r.planned[key]
        diff = (planned - built) / built if built else 0.0
        lines.append(f"  {key:<28}{_gib(built)} {_gib(planned)} {diff:+7.1%}")
    lines.append(f"  {'estimated peak of the rank':<28}{_gib(r.total_bytes)} {_gib(r.planned['total'])}")
    lines.append(f"  microbatches per step {figures['microbatches']}, pipeline bubble {figures['bubble']:.1%} of the "
                 f"step, contrastive batch G·b·A = {figures['contrastive_batch']}, optimizer's global batch "
                 f"{figures['global_batch']}")
    return "\n".join(lines)


def run_dry(cfg: RunConfig, world_size: int, *, rank: int | None = None, all_ranks: bool = False,
            gpu_memory_gib: float | None = None, check_data: bool = True) -> int:
    """The dry run's command: print the visited ranks; with --all-ranks, fail (exit 1) on any problem.
    `check_data`: also check the data, tokenizer and eval sets (train.data_checks) and print each source."""
    cfg.validate(world_size=world_size)
    vocab_problems = []
    if check_data:  # the model's vocabulary follows the tokenizer, as in training
        from m2megatron.train.data_checks import tokenizer_vocabulary

        cfg, vocab_problems = tokenizer_vocabulary(cfg)
    if (cfg.model.layer_spec, cfg.model.attention) != ("local", "megatron"):
        print(f"note: built with the local spec and Megatron's attention (layer_spec={cfg.model.layer_spec}, "
              f"attention={cfg.model.attention} have the same parameters; their fused GPU attention keeps less, "
              "which the estimate takes from the planner)", flush=True)
    figures = schedule_figures(cfg, world_size)
    layout = figures["layout"]
    ranks = rank_classes(layout) if all_ranks else [rank or 0]
    if not all(0 <= r < world_size for r in ranks):
        raise ValueError(f"--rank: {ranks[0]} is not a rank of a world of {world_size}")
    memory = gpu_memory_gib if gpu_memory_gib is not None else cfg.launch.gpu_memory_gib
    print(f"dry run: {cfg.model.preset} on {world_size} ranks = TP {layout.tensor_parallel} × PP "
          f"{layout.pipeline_parallel}{' × VP ' + str(layout.virtual_pipeline) if layout.virtual_pipeline else ''}"
          f" × DP {layout.data_parallel}, loss groups of {layout.group_size}, {_gpus_per_node(cfg)} GPUs per node, "
          f"precision {cfg.train.precision}, {memory:g} GiB per GPU", flush=True)
    reports = []
    for r in ranks:
        reports.append(visit(cfg, world_size, r))
        print(format_report(reports[-1], figures), flush=True)
    found = problems(cfg, world_size, reports, memory)
    if check_data:
        from m2megatron.train.data_checks import data_problems, data_summary

        for line in data_summary(cfg, figures["global_batch"]):
            print(line, flush=True)
        found += vocab_problems + data_problems(cfg, layout.data_parallel)
    worst = max(abs(rep.planned[k] - rep.built[k]) / rep.built[k] for rep in reports
                for k in ("parameters", "gradients", "optimizer", "activations_per_microbatch") if rep.built[k])
    for line in found:
        print(f"problem: {line}", flush=True)
    split = _split(cfg)
    print("pipeline ranks' forward TFLOP/sample: " + ", ".join(f"{f / 1e12:.3f}" for f in split.rank_flops)
          + f" (spread {split.spread:.1%})", flush=True)
    print(f"dry_run ranks_visited={len(reports)} problems={len(found)} worst_planner_diff={worst:.3f} "
          f"peak_gib={max(r.total_bytes for r in reports) / 2**30:.1f}", flush=True)
    return 1 if (found and all_ranks) else 0
