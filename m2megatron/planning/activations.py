"""Activation memory of one pipeline stage per microbatch, and how many microbatches a stage holds.

Counted from what autograd saves in one Sub-LN layer of the local spec (per token, TP size t, hidden
D, FFN F, heads h, segment length s), checked tensor by tensor against `LiveTensorBytes`:

    replicated [s, b, D] tensors: layer input, pre-attention LN out, residual after attention, pre-FFN LN out   4·D
    TP-sharded: QKV out (3D), attention context (D), its Sub-LN out (D)                                           5·D/t
    FFN: fc1+bias out (GELU input), GELU out (Sub-LN input), Sub-LN out (fc2 input)                              3·F/t
    attention probabilities (Megatron's local core attention; TE's and SDPA's fused kernels keep none)          s·h/t
    LayerNorm mean and rstd of the four LNs (fp32)                                                               8
    TP > 1 only: the TP-aware Sub-LNs (sub_ln.TPLayerNorm) keep x − mean and the normalised x, fp32    2·(D + F)/t

Modes (Megatron-Core's semantics; `ActivationMode`):
- sequence parallel (TP > 1): the replicated 4·D tensors and the two pre-LNs' statistics live on 1/t of
  the tokens (Megatron's column-parallel linears keep their sequence-sharded input and all-gather it again
  in backward); segments are padded to a multiple of t;
- selective recompute (core attention): the probabilities are not kept; backward re-materialises one
  layer's at a time;
- full recompute, uniform with k layers per group: each group of a stack keeps only its input, backward
  re-runs one group (k layers) at a time; block with k: the first k layers of each stack keep only their
  input, the others everything.
A stage's stacks are the vision tower (image tokens), the text tower (text tokens) and, on the last stage,
the VL block run on each modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from m2megatron.config.model import ModelConfig

FP32 = 4


@dataclass(frozen=True, kw_only=True)
class ActivationPrecision:
    """Bytes per saved element by role; see `activation_precision`."""

    hidden: int
    """Residual stream, LN outputs, QKV, context, FFN hidden."""
    linear_input: int
    """Inputs kept for a linear's weight gradient (1 under FP8, where TE keeps the casted copy)."""
    probs: int
    """Attention probabilities per element (0 = not kept: fused attention)."""


def activation_precision(precision: str, fused_attention: bool) -> ActivationPrecision:
    """fp32 (and bf16-autocast, counted at fp32 as an upper bound): everything 4 bytes. bf16/fp16: 2 bytes;
    Megatron's local attention keeps the fp32 softmax output plus its 16-bit copy (6 bytes); fused attention
    (TE, SDPA) keeps no probabilities. fp8 (te only): linear inputs 1 byte."""
    if precision in ("fp32", "bf16-autocast"):
        return ActivationPrecision(hidden=4, linear_input=4, probs=0 if fused_attention else 4)
    if precision in ("bf16", "fp16", "fp8"):
        return ActivationPrecision(hidden=2, linear_input=1 if precision == "fp8" else 2,
                                   probs=0 if fused_attention else 6)
    raise ValueError(f"precision: {precision!r} is not one of fp32, bf16, fp16, bf16-autocast, fp8")


@dataclass(frozen=True, kw_only=True)
class ActivationMode:
    """How a stage's layers keep activations (the trainer's settings that change activation memory)."""

    tp: int = 1
    """Tensor-parallel size."""
    prec: ActivationPrecision
    """Bytes per saved element."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TP > 1)."""
    recompute: str = "none"
    """none, selective (core attention) or full."""
    recompute_method: str = "uniform"
    """Full recompute: uniform (groups of recompute_num_layers) or block (the first recompute_num_layers)."""
    recompute_num_layers: int = 1
    """Full recompute: layers per group (uniform) or recomputed layers per stack (block)."""

    @property
    def sp(self) -> int:
        """Divisor of the replicated tensors' tokens: t with sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1


def segments(cfg: ModelConfig, mode: ActivationMode) -> tuple[int, int]:
    """(image tokens, text tokens), padded to a multiple of TP under sequence parallelism."""
    sp = mode.sp
    return -(-cfg.num_image_tokens // sp) * sp, -(-cfg.max_text_len // sp) * sp


def layer_bytes_per_token(cfg: ModelConfig, seq: int, mode: ActivationMode, keep_probs: bool = True) -> float:
    """Saved bytes per token of one layer run on a segment of `seq` tokens (table in the module docstring)."""
    d, f, h, tp, prec = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, mode.tp, mode.prec
    hidden = (2 * d / mode.sp + 4 * d / tp + 2 * f / tp) * prec.hidden  # input, residual, QKV, context, GELU in/out
    linear_inputs = (2 * d / mode.sp + d / tp + f / tp) * prec.linear_input  # LN outs into QKV / proj / fc1 / fc2
    ln_stats = (4 / mode.sp + 4) * FP32  # pre-LNs on the (sharded) sequence, Sub-LNs on every token
    tp_sub_ln = 2 * (d + f) / tp * FP32 if tp > 1 else 0.0
    probs = seq * h / tp * prec.probs if keep_probs else 0.0
    return hidden + linear_inputs + probs + ln_stats + tp_sub_ln


def _layer_input_bytes(cfg: ModelConfig, seq: int, micro_batch: int, mode: ActivationMode) -> float:
    return seq * micro_batch * cfg.hidden_size / mode.sp * mode.prec.hidden


def stack_bytes(cfg: ModelConfig, num_layers: int, seq: int, micro_batch: int,
                mode: ActivationMode) -> tuple[float, float]:
    """(kept until backward, transient peak while its backward re-runs) of one stack of layers on one segment."""
    if num_layers == 0:
        return 0.0, 0.0
    full = seq * micro_batch * layer_bytes_per_token(cfg, seq, mode)
    if mode.recompute == "none":
        return num_layers * full, 0.0
    if mode.recompute == "selective":
        kept = seq * micro_batch * layer_bytes_per_token(cfg, seq, mode, keep_probs=False)
        return num_layers * kept, full - kept  # one layer's probabilities re-materialised at a time
    inputs, k = _layer_input_bytes(cfg, seq, micro_batch, mode), mode.recompute_num_layers
    if mode.recompute_method == "block":
        recomputed = min(k, num_layers)
        return recomputed * inputs + (num_layers - recomputed) * full, full
    groups = math.ceil(num_layers / k)
    return groups * inputs, min(k, num_layers) * full


def backward_workspace_bytes(cfg: ModelConfig, micro_batch: int, mode: ActivationMode) -> float:
    """Gradients alive while the longest segment's attention runs backward: ∂probs and two [s, b, D] grads."""
    s = max(segments(cfg, mode))
    probs = s * s * cfg.num_attention_heads / mode.tp * max(mode.prec.probs, mode.prec.hidden)
    return micro_batch * (probs + 2 * s * cfg.hidden_size * FP32)


def stage_activation_bytes(cfg: ModelConfig, *, micro_batch: int, num_layers: int, post_process: bool,
                           mode: ActivationMode) -> tuple[float, float]:
    """(bytes one microbatch keeps on a stage between its forward and its backward, transient recompute peak)."""
    kept, peak = 0.0, 0.0
    for seq in segments(cfg, mode):
        for layers in (num_layers, cfg.num_vl_layers if post_process else 0):
            stack_kept, stack_peak = stack_bytes(cfg, layers, seq, micro_batch, mode)
            kept, peak = kept + stack_kept, max(peak, stack_peak)
    if post_process:  # the towers' final-LN outputs and the text copy with padding zeroed at the VL entry
        s_img, s_txt = segments(cfg, mode)
        kept += (s_img + 2 * s_txt) * micro_batch * cfg.hidden_size / mode.sp * mode.prec.hidden
    return kept, peak


def microbatches_in_flight(*, pp: int, pp_rank: int, vp: int | None, num_microbatches: int) -> float:
    """Microbatches whose activations a pipeline rank holds at once, in units of its whole stage.

    1F1B: rank p runs PP − p warm-up forwards before its first backward, so the first stage holds PP.
    Interleaved (VP chunks): Megatron's warm-up is 2·(PP − p − 1) + (VP − 1)·PP chunk-forwards, each 1/VP
    of the rank's layers, plus the one in steady state.
    """
    if pp == 1:
        return 1.0
    if not vp:
        return float(min(pp - pp_rank, num_microbatches))
    chunk_forwards = min(2 * (pp - pp_rank - 1) + (vp - 1) * pp + 1, num_microbatches * vp)
    return chunk_forwards / vp
