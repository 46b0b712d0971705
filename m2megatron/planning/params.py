"""Parameters held by one rank: a pipeline stage's layers and heads, as TP shard sizes (no model is built).

Mirrors the modules of m2megatron/models: a Sub-LN layer shards QKV, fc1 (columns), out-proj and fc2
(rows) and both inner LayerNorms over TP; the pre-LNs, row-parallel biases, embeddings other than the
vocabulary, final norms, projections and the logit scale are replicated. The vocabulary is padded as
`padded_vocab_size` does. A unit test checks these counts against the model built on the meta device.
"""

from __future__ import annotations

from m2megatron.config.model import ModelConfig
from m2megatron.models.embeddings import padded_vocab_size


def layer_parameters_per_rank(cfg: ModelConfig, tp: int) -> int:
    """One Sub-LN transformer layer (one modality branch) on one TP rank."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    # QKV W+b, out-proj W, context Sub-LN, fc1 W+b, fc2 W, FFN Sub-LN
    sharded = (3 * d * d + 3 * d) + d * d + 2 * d + (d * f + f) + f * d + 2 * f
    replicated = 2 * 2 * d + d + d  # two pre-LNs, proj bias, fc2 bias
    return sharded // tp + replicated


def embedding_parameters_per_rank(cfg: ModelConfig, tp: int) -> int:
    """Both towers' input embeddings (first stage)."""
    d, p = cfg.hidden_size, cfg.patch_size
    vision = cfg.num_channels * p * p * d + d + d + cfg.vision_position_table * d  # conv W+b, cls, positions
    text = padded_vocab_size(cfg, tp) // tp * d + cfg.text_position_table * d
    return vision + text


def head_parameters_per_rank(cfg: ModelConfig, tp: int) -> int:
    """Tower final LNs, the VL block and its final LN, the projections and the logit scale (last stage)."""
    d = cfg.hidden_size
    return 2 * 2 * d + cfg.num_vl_layers * layer_parameters_per_rank(cfg, tp) + 2 * d + 2 * d * cfg.embed_dim + 1


def stage_parameters_per_rank(cfg: ModelConfig, tp: int, *, num_layers: int, pre_process: bool,
                              post_process: bool) -> int:
    """A stage holding `num_layers` layers of BOTH towers, with embeddings / heads if first / last."""
    total = 2 * num_layers * layer_parameters_per_rank(cfg, tp)
    if pre_process:
        total += embedding_parameters_per_rank(cfg, tp)
    if post_process:
        total += head_parameters_per_rank(cfg, tp)
    return total
