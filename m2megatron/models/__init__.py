"""The M2-Encoder on Megatron-Core: Sub-LN layer specs (local / te), towers, VL block, heads, stage module.

    groups = m2megatron.parallel.initialize(cfg.parallel)
    stages = m2megatron.runtime.build_stages(cfg, groups)      # every entry point builds its stages there
    (model,) = stages.modules                                  # the whole model at PP=1
    emb = model.encode_image(pixels)                           # [b, E], L2-normalized

See docs/MODEL.md.
"""

from m2megatron.models.embeddings import padded_vocab_size
from m2megatron.models.m2_encoder import EncoderOutput, M2Encoder, default_layer_ranges
from m2megatron.models.sequence_parallel import packed_seq_length
from m2megatron.models.state import (
    full_state_dict,
    gather_full,
    init_weights,
    load_full_state_dict,
    local_state_dict,
    merge_tp_shards,
    shard_full_state_dict,
    tp_axis,
)
from m2megatron.models.sub_ln import SubLNRowParallelLinear, TPLayerNorm
from m2megatron.models.transformer_config import transformer_config

__all__ = [
    "EncoderOutput", "M2Encoder", "SubLNRowParallelLinear", "TPLayerNorm", "default_layer_ranges",
    "full_state_dict", "gather_full", "init_weights", "load_full_state_dict", "local_state_dict",
    "merge_tp_shards", "packed_seq_length", "padded_vocab_size", "shard_full_state_dict", "tp_axis",
    "transformer_config",
]
