"""Per-rank memory of a training step by category, for a model, a layout and the step's settings.

    plan = PlanInput(model=preset("m2-10b"), tp=4, pp=3, dp=64, micro_batch=16, num_microbatches=8,
                     precision="bf16", recompute=True, distributed_optimizer=True)
    for rank in plan_memory(plan): print(rank.pp_rank, rank.total / 2**30)

Bytes per parameter follow Megatron-Core's DDP and optimizer as the trainer builds them: fp32 training
keeps fp32 weights, an fp32 gradient buffer and Adam's two moments; bf16/fp8 keep bf16 weights, fp32
gradients and fp32 master weights + moments (12 bytes, divided by DP with the distributed optimizer).
Activations are activations.py's count times the microbatches in flight (1F1B: PP on the first stage).
The peak of a step is the larger of the forward/backward peak and the optimizer step's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from m2megatron.config.model import ModelConfig
from m2megatron.models.embeddings import padded_vocab_size
from m2megatron.models.m2_encoder import default_layer_ranges
from m2megatron.planning import activations as act
from m2megatron.planning.communication import loss_peak_bytes
from m2megatron.planning.params import stage_parameters_per_rank

FP32 = 4
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "loss", "communication", "workspace", "runtime")


@dataclass(kw_only=True)
class PlanInput:
    model: ModelConfig
    """Model sizes (a preset or a resolved config)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    vp: int | None = None
    """Virtual stages per pipeline rank (interleaved 1F1B), or None."""
    micro_batch: int = 1
    """Samples per microbatch per data-parallel rank (b)."""
    num_microbatches: int = 1
    """Microbatches per step per data-parallel rank (M)."""
    precision: str = "fp32"
    """fp32, bf16 (bf16 weights, fp32 master and grads) or fp8 (bf16 + TE FP8 linears)."""
    recompute: bool = False
    """Full activation recompute of every layer."""
    distributed_optimizer: bool = False
    """Optimizer state (and fp32 master weights) sharded over DP."""
    optimizer: str = "adam"
    """adam (two fp32 moments) or sgd (no state: the trainer's SGD has no momentum)."""
    loss_group_size: int | None = None
    """G; None = DP (global loss)."""
    accumulation: int = 1
    """A, microbatches aggregated before the loss (two-pass mode when > 1)."""
    chunk: int | None = None
    """Column tile of the chunked loss, or None for dense logits."""
    runtime_reserve_bytes: int = 0
    """Fixed per-process reserve (CUDA context, NCCL buffers, allocator slack); 0 on CPU."""

    def __post_init__(self):
        if self.model.num_layers % (self.pp * (self.vp or 1)):
            raise ValueError(f"pp: {self.pp}×{self.vp or 1} stages do not divide num_layers={self.model.num_layers}")
        if self.model.num_attention_heads % self.tp:
            raise ValueError(f"tp: {self.tp} does not divide num_attention_heads={self.model.num_attention_heads}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def group(self) -> int:
        return self.loss_group_size or self.dp

    @property
    def layer_spec(self) -> str:
        return "te" if self.precision == "fp8" else self.model.layer_spec

    @classmethod
    def from_run_config(cls, cfg, world_size: int, **extra) -> PlanInput:
        """From a RunConfig (the trainer's settings) and a world size."""
        par = cfg.parallel
        return cls(model=cfg.model, tp=par.tensor_parallel, pp=par.pipeline_parallel,
                   dp=par.data_parallel(world_size), vp=par.virtual_pipeline, micro_batch=cfg.train.micro_batch_size,
                   num_microbatches=cfg.num_microbatches(world_size),
                   precision="fp8" if cfg.model.fp8 != "none" else "bf16" if cfg.train.precision != "fp32" else "fp32",
                   recompute=cfg.train.recompute == "full", distributed_optimizer=par.distributed_optimizer,
                   optimizer=cfg.optim.optimizer, loss_group_size=par.loss_group_size,
                   accumulation=cfg.loss.accumulation_steps, chunk=cfg.loss.chunk_size, **extra)


@dataclass(kw_only=True)
class RankMemory:
    pp_rank: int
    """Pipeline rank (every TP and DP rank of it holds the same)."""
    parameters_count: int
    """Parameters on this rank (all its chunks)."""
    bytes: dict[str, float] = field(default_factory=dict)
    """Peak-step bytes by category (CATEGORIES)."""
    optimizer_alternative: float = 0.0
    """Optimizer bytes with the other distributed-optimizer setting, for comparison."""

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


def _bytes_per_param(inp: PlanInput) -> tuple[int, int, float, float]:
    """(weights, gradients, optimizer without / with the distributed optimizer) bytes per parameter."""
    mixed = inp.precision != "fp32"
    state = (2 * FP32 if inp.optimizer == "adam" else 0) + (FP32 if mixed else 0)  # moments (+ fp32 master)
    return (2 if mixed else FP32), FP32, state, state / inp.dp


def _largest_tensor(inp: PlanInput, pre_process: bool) -> int:
    m = inp.model
    largest = m.hidden_size * max(m.ffn_hidden_size, 3 * m.hidden_size) // inp.tp
    if pre_process:
        largest = max(largest, padded_vocab_size(m, inp.tp) // inp.tp * m.hidden_size)
    return largest


def _loss_bytes(inp: PlanInput, elem: int) -> float:
    rows = inp.micro_batch * inp.accumulation
    return loss_peak_bytes(rows=rows, cols=inp.group * rows, embed_dim=inp.model.embed_dim, elem=elem, chunk=inp.chunk)


def _rank_memory(inp: PlanInput, pp_rank: int) -> RankMemory:
    m, chunks = inp.model, inp.vp or 1
    stages = inp.pp * chunks
    ranges = default_layer_ranges(m.num_layers, stages)
    mine = [v * inp.pp + pp_rank for v in range(chunks)]
    pre, post = 0 in mine, stages - 1 in mine
    layers = sum(ranges[s][1] - ranges[s][0] for s in mine)
    count = sum(stage_parameters_per_rank(m, inp.tp, num_layers=ranges[s][1] - ranges[s][0],
                                          pre_process=s == 0, post_process=s == stages - 1) for s in mine)
    w_b, g_b, opt_b, opt_dist_b = _bytes_per_param(inp)
    prec = act.activation_precision(inp.precision, inp.layer_spec)
    if inp.layer_spec == "local" and m.attention == "sdpa":  # torch's fused attention keeps no probabilities
        prec = dataclasses.replace(prec, probs=0)
    elem = prec.hidden
    b, tokens = inp.micro_batch, m.num_image_tokens + m.max_text_len
    one_mb = act.stage_activation_bytes(m, micro_batch=b, tp=inp.tp, num_layers=layers, post_process=post,
                                        recompute=inp.recompute, prec=prec)
    if inp.recompute:
        one_mb += act.recompute_peak_bytes(m, b, inp.tp, prec)
    in_flight = act.microbatches_in_flight(pp=inp.pp, pp_rank=pp_rank, vp=inp.vp, num_microbatches=inp.num_microbatches)
    data = inp.num_microbatches * b * (m.num_channels * m.image_size ** 2 * FP32 + 2 * m.max_text_len * 8) if pre else 0
    activations = in_flight * one_mb + data
    send_buffers = 0 if post else in_flight * tokens * b * m.hidden_size * elem  # outputs kept until backward
    attention_buffer = 0 if prec.probs == 0 else b * m.num_attention_heads // inp.tp * max(
        m.num_image_tokens, m.max_text_len) ** 2 * elem  # Megatron's persistent baddbmm buffer (local spec)
    backward = act.backward_workspace_bytes(m, b, inp.tp, prec)
    loss = _loss_bytes(inp, elem) if post else 0.0
    if inp.accumulation > 1:  # the loss pass runs between the two pipeline passes, with no activations held
        loss = max(0.0, loss - activations - backward)
    optimizer_step = 2 * _largest_tensor(inp, pre) * FP32  # torch Adam/clip temporaries of one tensor
    workspace = attention_buffer + max(backward, optimizer_step - activations - loss)
    optimizer, alternative = (opt_dist_b, opt_b) if inp.distributed_optimizer else (opt_b, opt_dist_b)
    return RankMemory(pp_rank=pp_rank, parameters_count=count, optimizer_alternative=alternative * count, bytes={
        "parameters": w_b * count, "gradients": g_b * count, "optimizer": optimizer * count,
        "activations": activations, "loss": loss, "communication": send_buffers, "workspace": workspace,
        "runtime": inp.runtime_reserve_bytes})


def plan_memory(inp: PlanInput) -> list[RankMemory]:
    """Memory of a rank of every pipeline stage, first to last."""
    return [_rank_memory(inp, p) for p in range(inp.pp)]


def peak_rank(inp: PlanInput) -> RankMemory:
    """The pipeline rank that needs the most memory."""
    return max(plan_memory(inp), key=lambda r: r.total)


def with_changes(inp: PlanInput, **changes) -> PlanInput:
    return dataclasses.replace(inp, **changes)
