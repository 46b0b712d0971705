"""The one place where our ModelConfig becomes a Megatron-Core TransformerConfig.

Every flag that matters for parity with the reference is set explicitly here (SPEC.md §1.4):
exact-erf GELU with no bias-activation fusion (Megatron's fused bias-GELU is the tanh form), biases on
every linear, no query-key layer scaling, LayerNorm with the configured eps, dropout 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from m2megatron.config.base import ConfigError
from m2megatron.config.model import ModelConfig

# Our fp8 recipe names → Megatron-Core's (`tensorwise` is its name for current per-tensor scaling).
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


def transformer_config(cfg: ModelConfig, *, tp_size: int = 1, params_dtype: torch.dtype = torch.float32,
                       **overrides) -> TransformerConfig:
    """Megatron TransformerConfig of one tower layer stack.

    `overrides` are passed through for trainer-level settings (recompute, pipeline dtype, p2p flags).

    `pipeline_model_parallel_size` is 1 whatever the run's PP size, deliberately: pipeline stages are ours
    (M2Encoder's `layer_range`, runtime.stages), and each layer is built with its global layer number. The
    real PP size here would make Megatron's TransformerLayer add its own per-stage offset to that number
    and TransformerConfig check an even split we do not use. Megatron's schedules read the PP size from the
    process groups; runtime/megatron_config.py sets the one field derived from it
    (microbatch_group_size_per_vp_stage).
    """
    cfg.validate()
    if cfg.num_attention_heads % tp_size:
        raise ConfigError(f"model.num_attention_heads: {cfg.num_attention_heads} is not divisible by "
                          f"tensor_parallel={tp_size}")
    if cfg.ffn_hidden_size % tp_size:
        raise ConfigError(f"model.ffn_hidden_size: {cfg.ffn_hidden_size} is not divisible by "
                          f"tensor_parallel={tp_size}")
    if overrides.get("sequence_parallel") and tp_size < 2:
        raise ConfigError(f"parallel.sequence_parallel: needs parallel.tensor_parallel > 1 (got {tp_size})")
    fp8 = {}
    if cfg.fp8 != "none":
        fp8 = {"fp8": "hybrid", "fp8_recipe": FP8_RECIPES[cfg.fp8]}
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.head_dim,
        layernorm_epsilon=cfg.layernorm_eps,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact erf form, as the reference
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=1,  # deliberately, at every PP size (docstring)
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # no CUDA graphs; 0.16.1's default "full" only triggers its own deprecation warning
        **fp8,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
