"""ModuleSpecs of one Sub-LN transformer layer: `local` (Megatron-Core modules) and `te` (Transformer Engine).

    pre-LN → QKV (bias) → attention → TP-aware LN over the context → out-proj (row parallel) → residual
    pre-LN → fc1 → GELU (erf) → TP-aware LN over F → fc2 (row parallel) → residual

Both specs give the same sharded-checkpoint keys: the `te` spec fuses the pre-LNs into
`linear_qkv` / `linear_fc1` (`layer_norm_weight`), and the local spec maps its `input_layernorm.` /
`pre_mlp_layernorm.` to those names, as Megatron-Core's GPT specs do.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from m2megatron.config.base import ConfigError
from m2megatron.config.model import ModelConfig
from m2megatron.models.layer_norm import LayerNorm
from m2megatron.models.sdpa_attention import SDPAttention
from m2megatron.models.sub_ln import SubLNRowParallelLinear
from m2megatron.parallel.rng import DATA_PARALLEL_STREAM

# Plain state-dict names of the fused pre-LNs in the `te` spec ← the local spec's names.
TE_FUSED_NORM_NAMES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class DropPathBiasAdd:
    """`bias_dropout_add` replacement: residual + drop_path(out + bias), one keep/drop per sample.

    The sample dimension is 1 in Megatron's [s, b, h] layout. The mask is drawn from Megatron's tracked
    `data-parallel-rng` stream, which `m2megatron.parallel.seed_everything` seeds per data-parallel replica
    and pipeline stage and the same on the TP ranks of a replica: replicas drop different samples, and the
    TP ranks (which hold shards, or under sequence parallelism sequence chunks, of the same samples) drop
    the same ones, also where Megatron runs the layers in its TP-distinct stream (sequence parallelism).
    Megatron's activation recompute and our two-pass accumulated step restore the tracker, so replays draw
    the same masks. Without that stream (no seeding, e.g. a bare module in a unit test) it draws from the
    default generator.
    """

    def __init__(self, drop_prob: float):
        self.drop_prob = drop_prob

    def __call__(self, training: bool, fused: bool):
        def bias_droppath_add(x_with_bias, residual, _hidden_dropout):
            out, bias = x_with_bias
            if bias is not None:
                out = out + bias
            if training and self.drop_prob > 0.0:
                keep = 1.0 - self.drop_prob
                with _data_parallel_stream():
                    mask = torch.empty((1, out.shape[1], 1), dtype=out.dtype, device=out.device).bernoulli_(keep)
                out = out * mask / keep
            return residual + out

        return bias_droppath_add


def _data_parallel_stream():
    tracker = get_cuda_rng_tracker()
    if DATA_PARALLEL_STREAM in getattr(tracker, "states_", {}):
        return tracker.fork(DATA_PARALLEL_STREAM)
    return contextlib.nullcontext()


def _bda(drop_path: float):
    return ModuleSpec(module=DropPathBiasAdd, params={"drop_prob": drop_path}) if drop_path > 0 else \
        get_bias_dropout_add


def _sub_ln_row(linear, norm_kernel: str) -> ModuleSpec:
    return ModuleSpec(module=SubLNRowParallelLinear, params={"linear": linear, "norm_kernel": norm_kernel})


def _sub_ln_layer(cfg: ModelConfig, attn_mask_type: AttnMaskType, drop_path: float, *, pre_norm, qkv,
                  core_attention, fc1, row, keys_map: dict) -> ModuleSpec:
    """The Sub-LN layer from one backend's modules (pre_norm is IdentityOp when fused into qkv/fc1)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(linear_qkv=qkv, core_attention=core_attention,
                                                   linear_proj=_sub_ln_row(row, cfg.sub_ln_kernel),
                                                   q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=_bda(drop_path),
            pre_mlp_layernorm=pre_norm,
            mlp=ModuleSpec(module=MLP, params={"ffn_hidden_size": cfg.ffn_hidden_size},
                           submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=_sub_ln_row(row, cfg.sub_ln_kernel))),
            mlp_bda=_bda(drop_path),
            sharded_state_dict_keys_map=keys_map,
        ),
    )


CORE_ATTENTION = {"megatron": DotProductAttention, "sdpa": SDPAttention}
"""The local spec's core attention by `model.attention`."""


def local_layer_spec(cfg: ModelConfig, attn_mask_type: AttnMaskType, drop_path: float = 0.0) -> ModuleSpec:
    """Megatron-Core modules (and our SP-capable LayerNorm, SDPA attention); runs on CPU and GPU."""
    if cfg.attention not in CORE_ATTENTION:
        raise ConfigError(f"model.attention: unknown {cfg.attention!r} (known: {', '.join(CORE_ATTENTION)})")
    return _sub_ln_layer(cfg, attn_mask_type, drop_path, pre_norm=LayerNorm, qkv=ColumnParallelLinear,
                         core_attention=CORE_ATTENTION[cfg.attention], fc1=ColumnParallelLinear,
                         row=RowParallelLinear, keys_map=dict(TE_FUSED_NORM_NAMES))


def te_layer_spec(cfg: ModelConfig, attn_mask_type: AttnMaskType, drop_path: float = 0.0) -> ModuleSpec:
    """Transformer Engine modules (GPU only): LN fused into QKV/fc1, TE attention (whatever `model.attention`
    says: TE picks its fused or flash kernels itself), FP8 via TE recipes."""
    require_te()
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return _sub_ln_layer(cfg, attn_mask_type, drop_path, pre_norm=IdentityOp, qkv=TELayerNormColumnParallelLinear,
                         core_attention=TEDotProductAttention, fc1=TELayerNormColumnParallelLinear,
                         row=TERowParallelLinear, keys_map={})


def require_te() -> None:
    """Raise a ConfigError unless CUDA and an importable Transformer Engine are present."""
    if not torch.cuda.is_available():
        raise ConfigError("model.layer_spec: 'te' needs CUDA, which is not available on this machine; "
                          "use layer_spec=local")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # TE raises RuntimeError/FileNotFoundError, not only ImportError
        raise ConfigError(f"model.layer_spec: 'te' needs Transformer Engine, which cannot be imported "
                          f"({type(exc).__name__}: {exc}); install requirements-gpu.txt or use layer_spec=local") \
            from None


def layer_spec(cfg: ModelConfig, attn_mask_type: AttnMaskType, drop_path: float = 0.0) -> ModuleSpec:
    """The spec chosen by `cfg.layer_spec`."""
    if cfg.layer_spec == "te":
        return te_layer_spec(cfg, attn_mask_type, drop_path)
    if cfg.layer_spec == "local":
        return local_layer_spec(cfg, attn_mask_type, drop_path)
    raise ConfigError(f"model.layer_spec: unknown spec {cfg.layer_spec!r} (known: local, te)")
