"""Activation memory of one pipeline stage per microbatch, and how many microbatches a stage holds.

Counted from what autograd saves in one Sub-LN layer of the local spec (per token, TP size t, hidden
D, FFN F, heads h, segment length s), checked tensor by tensor against `LiveTensorBytes`:

    replicated [s, b, D] tensors: layer input, pre-attention LN out, residual after attention, pre-FFN LN out   4·D
    TP-sharded: QKV out (3D), attention context (D), its Sub-LN out (D)                                           5·D/t
    FFN: fc1+bias out (GELU input), GELU out (Sub-LN input), Sub-LN out (fc2 input)                              3·F/t
    attention probabilities (local spec; the `te` spec's flash attention keeps none)                             s·h/t
    LayerNorm mean and rstd of the four LNs (fp32)                                                               8
    TP > 1 only: the TP-aware Sub-LNs (sub_ln.TPLayerNorm) keep x − mean and the normalised x, fp32    2·(D + F)/t

With full recompute a layer keeps only its input, and backward re-runs one layer at a time.
"""

from __future__ import annotations

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
    """Attention probabilities per element (0 = not kept: flash attention)."""


def activation_precision(precision: str, layer_spec: str) -> ActivationPrecision:
    """fp32: everything 4 bytes. bf16: 2 bytes; the local spec keeps fp32 softmax output plus its bf16
    copy (6 bytes); TE's fused attention keeps no probabilities. fp8 (te only): linear inputs 1 byte."""
    if precision == "fp32":
        return ActivationPrecision(hidden=4, linear_input=4, probs=0 if layer_spec == "te" else 4)
    if precision in ("bf16", "fp8"):
        return ActivationPrecision(hidden=2, linear_input=1 if precision == "fp8" else 2,
                                   probs=0 if layer_spec == "te" else 6)
    raise ValueError(f"precision: {precision!r} is not one of fp32, bf16, fp8")


def layer_bytes_per_token(cfg: ModelConfig, seq: int, tp: int, prec: ActivationPrecision) -> float:
    """Saved bytes per token of one layer run on a segment of `seq` tokens (table in the module docstring)."""
    d, f, h = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads
    hidden = (2 * d + 4 * d / tp + 2 * f / tp) * prec.hidden  # layer input, residual, QKV, context, GELU in/out
    linear_inputs = (2 * d + d / tp + f / tp) * prec.linear_input  # LN outs feeding QKV / proj / fc1 / fc2
    tp_sub_ln = 2 * (d + f) / tp * FP32 if tp > 1 else 0.0
    return hidden + linear_inputs + seq * h / tp * prec.probs + 8 * FP32 + tp_sub_ln


def _segments(cfg: ModelConfig) -> tuple[int, int]:
    return cfg.num_image_tokens, cfg.max_text_len


def layer_pair_bytes(cfg: ModelConfig, micro_batch: int, tp: int, prec: ActivationPrecision) -> float:
    """One vision layer on the image tokens plus one text layer on the text tokens (or one VL layer on both)."""
    return sum(s * micro_batch * layer_bytes_per_token(cfg, s, tp, prec) for s in _segments(cfg))


def backward_workspace_bytes(cfg: ModelConfig, micro_batch: int, tp: int, prec: ActivationPrecision) -> float:
    """Gradients alive while the longest segment's attention runs backward: ∂probs and two [s, b, D] grads."""
    s = max(_segments(cfg))
    probs = s * s * cfg.num_attention_heads / tp * max(prec.probs, prec.hidden)
    return micro_batch * (probs + 2 * s * cfg.hidden_size * FP32)


def stage_activation_bytes(cfg: ModelConfig, *, micro_batch: int, tp: int, num_layers: int, post_process: bool,
                           recompute: bool, prec: ActivationPrecision) -> float:
    """Bytes one microbatch keeps on a stage between its forward and its backward."""
    pairs = num_layers + (cfg.num_vl_layers if post_process else 0)
    tokens = sum(_segments(cfg)) * micro_batch
    if recompute:
        kept = pairs * tokens * cfg.hidden_size * prec.hidden  # layer inputs only
    else:
        kept = pairs * layer_pair_bytes(cfg, micro_batch, tp, prec)
    if post_process:  # the towers' final-LN outputs and the text copy with padding zeroed at the VL entry
        kept += (sum(_segments(cfg)) + cfg.max_text_len) * micro_batch * cfg.hidden_size * prec.hidden
    return kept


def recompute_peak_bytes(cfg: ModelConfig, micro_batch: int, tp: int, prec: ActivationPrecision) -> float:
    """With full recompute, backward re-materialises one layer (the larger segment's) at a time."""
    s = max(_segments(cfg))
    return s * micro_batch * layer_bytes_per_token(cfg, s, tp, prec)


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
