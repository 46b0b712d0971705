"""Per-rank memory of a training step by category, for a model, a layout and the step's settings.

    plan = PlanInput(model=preset("m2-10b"), tp=4, pp=4, dp=16, micro_batch=16, num_microbatches=16,
                     first_stage_layers=6, last_stage_layers=3, precision="bf16", recompute="full",
                     distributed_optimizer=True)
    for rank in plan_memory(plan): print(rank.pp_rank, rank.total / 2**30)
    plan = PlanInput.from_run_config(load_config("launch/examples/m2-10b_h100_256.yaml"), world_size=256)

Bytes per parameter follow Megatron-Core's DDP and optimizer as the trainer builds them:
- fp32 (and bf16-autocast, whose weights stay fp32): fp32 weights, DDP's fp32 gradient buffer, Adam's two
  fp32 moments (8 B, ÷ DP with the distributed optimizer, whose fp32 "main" params are the weights themselves);
- bf16 / fp16 / fp8 (train.precision=bf16|fp16: Megatron-native 16-bit weights): 16-bit weights, fp32 main
  gradients in DDP's buffer (grad_reduce_in_fp32, 4 B, never sharded), and the mixed-precision optimizer's
  fp32 main weights + Adam moments (12 B, ÷ DP with the distributed optimizer).
With the distributed optimizer DDP keeps the weights in a contiguous param buffer of their dtype (the model's
parameters are views into it), and overlap_param_gather all-gathers into that same buffer while
overlap_grad_reduce reduce-scatters in place in the gradient buffer: the overlap settings add no tensor
memory (Megatron DDP, param_and_grad_buffer.py), only bucket padding (< DP·128 elements per bucket).
Activations are activations.py's count times the microbatches in flight (1F1B: PP on the first stage) plus
one microbatch's recompute transient. The peak of a step is the larger of the forward/backward peak and the
optimizer step's. Layer ranges per stage are those the trainer builds (config/stage_split.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from m2megatron.config.model import ModelConfig
from m2megatron.config.stage_split import layer_ranges
from m2megatron.models.embeddings import padded_vocab_size
from m2megatron.planning import activations as act
from m2megatron.planning.communication import loss_peak_bytes
from m2megatron.planning.params import stage_parameters_per_rank

FP32 = 4
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-autocast", "fp8")
RECOMPUTE = ("none", "selective", "full")
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
    first_stage_layers: int | None = None
    """Tower layers on the first pipeline stage, with VP its first chunk (parallel.first_stage_layers); None: even."""
    last_stage_layers: int | None = None
    """Tower layers on the last pipeline stage, with VP its last chunk (parallel.last_stage_layers); None: even."""
    precision: str = "fp32"
    """fp32; bf16 / fp16 (16-bit weights, fp32 main grads and main weights); bf16-autocast (fp32 weights,
    activations counted at fp32 as an upper bound); fp8 (bf16 + TE FP8 linears)."""
    recompute: str = "none"
    """Activation recompute: none, selective (core attention) or full."""
    recompute_method: str = "uniform"
    """Full recompute: uniform or block (train.recompute_method)."""
    recompute_num_layers: int = 1
    """Full recompute: layers per group / recomputed layers per stack (train.recompute_num_layers)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TP > 1)."""
    distributed_optimizer: bool = False
    """Optimizer state (and fp32 master weights) sharded over DP."""
    overlap_grad_reduce: bool = False
    """DDP reduces gradients bucket by bucket during the last microbatch's backward (time only, no memory)."""
    overlap_param_gather: bool = False
    """Distributed optimizer all-gathers updated weights during the next forward (time only, no memory)."""
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute: {self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if self.model.num_attention_heads % self.tp:
            raise ValueError(f"tp: {self.tp} does not divide num_attention_heads={self.model.num_attention_heads}")
        self.layer_ranges()  # a ConfigError naming the split setting if PP, VP and first/last do not fit

    def layer_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of the tower layers on each global stage, as the trainer builds them."""
        return layer_ranges(self.model.num_layers, self.pp, self.vp, self.first_stage_layers, self.last_stage_layers)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def group(self) -> int:
        return self.loss_group_size or self.dp

    @property
    def layer_spec(self) -> str:
        return "te" if self.precision == "fp8" else self.model.layer_spec

    @property
    def fused_attention(self) -> bool:
        """Core attention keeps no probabilities: TE's fused attention, or SDPA's flash / memory-efficient
        kernels (on GPU; CPU's SDPA math path does keep them)."""
        return self.layer_spec == "te" or self.model.attention == "sdpa"

    @classmethod
    def from_run_config(cls, cfg, world_size: int, **extra) -> PlanInput:
        """From a RunConfig (the trainer's settings) and a world size."""
        par, train = cfg.parallel, cfg.train
        values = dict(
            model=cfg.model, tp=par.tensor_parallel, pp=par.pipeline_parallel, dp=par.data_parallel(world_size),
            vp=par.virtual_pipeline, micro_batch=train.micro_batch_size,
            num_microbatches=cfg.num_microbatches(world_size), first_stage_layers=par.first_stage_layers,
            last_stage_layers=par.last_stage_layers,
            precision="fp8" if cfg.model.fp8 != "none" else train.precision, recompute=train.recompute,
            recompute_method=train.recompute_method, recompute_num_layers=train.recompute_num_layers,
            sequence_parallel=par.sequence_parallel and par.tensor_parallel > 1,
            distributed_optimizer=par.distributed_optimizer, overlap_grad_reduce=par.overlap_grad_reduce,
            overlap_param_gather=par.overlap_param_gather and par.distributed_optimizer,
            optimizer=cfg.optim.optimizer, loss_group_size=par.loss_group_size,
            accumulation=cfg.loss.accumulation_steps, chunk=cfg.loss.chunk_size)
        return cls(**{**values, **extra})

    def activation_mode(self) -> act.ActivationMode:
        return act.ActivationMode(tp=self.tp, prec=act.activation_precision(self.precision, self.fused_attention),
                                  sequence_parallel=self.sequence_parallel and self.tp > 1, recompute=self.recompute,
                                  recompute_method=self.recompute_method,
                                  recompute_num_layers=self.recompute_num_layers)


@dataclass(kw_only=True)
class RankMemory:
    pp_rank: int
    """Pipeline rank (every TP and DP rank of it holds the same)."""
    parameters_count: int
    """Parameters on this rank (all its chunks)."""
    layer_ranges: list = field(default_factory=list)
    """[start, end) of the tower layers of each of this rank's chunks, in chunk order."""
    activations_per_microbatch: float = 0.0
    """Bytes one microbatch keeps on this rank between its forward and its backward."""
    microbatches_in_flight: float = 0.0
    """Microbatches whose activations the rank holds at once (in units of its whole stage)."""
    bytes: dict[str, float] = field(default_factory=dict)
    """Peak-step bytes by category (CATEGORIES)."""
    optimizer_alternative: float = 0.0
    """Optimizer bytes with the other distributed-optimizer setting, for comparison."""

    @property
    def num_layers(self) -> int:
        """Tower layers on this rank (of each tower)."""
        return sum(end - start for start, end in self.layer_ranges)

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


def bytes_per_parameter(inp: PlanInput) -> tuple[int, int, float, float]:
    """(weights, gradients, optimizer without / with the distributed optimizer) bytes per parameter."""
    sixteen_bit = inp.precision in ("bf16", "fp16", "fp8")
    state = (2 * FP32 if inp.optimizer == "adam" else 0) + (FP32 if sixteen_bit else 0)  # moments (+ main weights)
    return (2 if sixteen_bit else FP32), FP32, state, state / inp.dp


def _largest_tensor(inp: PlanInput, pre_process: bool) -> int:
    m = inp.model
    largest = m.hidden_size * max(m.ffn_hidden_size, 3 * m.hidden_size) // inp.tp
    if pre_process:
        largest = max(largest, padded_vocab_size(m, inp.tp) // inp.tp * m.hidden_size)
    return largest


def _loss_bytes(inp: PlanInput, elem: int) -> float:
    rows = inp.micro_batch * inp.accumulation
    return loss_peak_bytes(rows=rows, cols=inp.group * rows, embed_dim=inp.model.embed_dim, elem=elem, chunk=inp.chunk)


def _rank_memory(inp: PlanInput, pp_rank: int, ranges: list[tuple[int, int]],
                 mode: act.ActivationMode) -> RankMemory:
    m, last_stage = inp.model, len(ranges) - 1
    mine = [(s, ranges[s]) for s in range(pp_rank, len(ranges), inp.pp)]  # chunk v is stage v·PP + pp_rank
    pre, post = any(s == 0 for s, _ in mine), any(s == last_stage for s, _ in mine)
    layers = sum(end - start for _, (start, end) in mine)
    count = sum(stage_parameters_per_rank(m, inp.tp, num_layers=end - start, pre_process=s == 0,
                                          post_process=s == last_stage) for s, (start, end) in mine)
    w_b, g_b, opt_b, opt_dist_b = bytes_per_parameter(inp)
    elem, b = mode.prec.hidden, inp.micro_batch
    kept, recompute_peak = act.stage_activation_bytes(m, micro_batch=b, num_layers=layers, post_process=post, mode=mode)
    in_flight = act.microbatches_in_flight(pp=inp.pp, pp_rank=pp_rank, vp=inp.vp, num_microbatches=inp.num_microbatches)
    data = inp.num_microbatches * b * (m.num_channels * m.image_size ** 2 * FP32 + 2 * m.max_text_len * 8) if pre else 0
    activations = in_flight * kept + recompute_peak + data
    tokens = sum(act.segments(m, mode)) // mode.sp  # per rank: the sequence-sharded stage output under SP
    send_buffers = 0 if post else in_flight * tokens * b * m.hidden_size * elem  # outputs kept until backward
    attention_buffer = 0 if mode.prec.probs == 0 else b * m.num_attention_heads // inp.tp * max(
        m.num_image_tokens, m.max_text_len) ** 2 * elem  # Megatron's persistent baddbmm buffer (local attention)
    backward = act.backward_workspace_bytes(m, b, mode)
    loss = _loss_bytes(inp, elem) if post else 0.0
    if inp.accumulation > 1:  # the loss pass runs between the two pipeline passes, with no activations held
        loss = max(0.0, loss - activations - backward)
    optimizer_step = 2 * _largest_tensor(inp, pre) * FP32  # torch Adam/clip temporaries of one tensor
    workspace = attention_buffer + max(backward, optimizer_step - activations - loss)
    optimizer, alternative = (opt_dist_b, opt_b) if inp.distributed_optimizer else (opt_b, opt_dist_b)
    return RankMemory(
        pp_rank=pp_rank, parameters_count=count, layer_ranges=[r for _, r in mine], activations_per_microbatch=kept,
        microbatches_in_flight=in_flight, optimizer_alternative=alternative * count, bytes={
            "parameters": w_b * count, "gradients": g_b * count, "optimizer": optimizer * count,
            "activations": activations, "loss": loss, "communication": send_buffers, "workspace": workspace,
            "runtime": inp.runtime_reserve_bytes})


def plan_memory(inp: PlanInput) -> list[RankMemory]:
    """Memory of a rank of every pipeline stage, first to last."""
    ranges, mode = inp.layer_ranges(), inp.activation_mode()
    return [_rank_memory(inp, p, ranges, mode) for p in range(inp.pp)]


def peak_rank(inp: PlanInput) -> RankMemory:
    """The pipeline rank that needs the most memory."""
    return max(plan_memory(inp), key=lambda r: r.total)


def with_changes(inp: PlanInput, **changes) -> PlanInput:
    return dataclasses.replace(inp, **changes)
