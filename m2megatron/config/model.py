"""Model sizes and layer implementation, with the presets of the released M2-Encoder models.

Sizes of `m2-0.4b`, `m2-1b` and `m2-10b` are those of SPEC.md §1.6. `tiny` is ours: a model small
enough to train on 2 CPU cores in minutes, with heads divisible by 4 so TP=4 can be tested.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from m2megatron.config.base import ConfigError


@dataclass(kw_only=True)
class ModelConfig:
    preset: str = "tiny"
    """Name of the preset the sizes started from (tiny, m2-0.4b, m2-1b, m2-10b); informational once resolved."""
    hidden_size: int = 64
    """Width D of every transformer layer and embedding."""
    num_layers: int = 2
    """Layers L of each modality tower (vision and text each have L layers with separate weights)."""
    num_vl_layers: int = 1
    """Layers of the shared VL block applied to both modalities after the towers (3 in the released models)."""
    num_attention_heads: int = 4
    """Attention heads per layer; must be divisible by the tensor-parallel size."""
    ffn_hidden_size: int = 256
    """Hidden width F of the feed-forward block (4·D in the released models)."""
    vocab_size: int = 115244
    """Text vocabulary size before padding (115244 for the released GLM SentencePiece model)."""
    image_size: int = 32
    """Square input image side in pixels (224 in the released models)."""
    patch_size: int = 8
    """Square patch side of the patch-embedding convolution (16 in the released models)."""
    num_channels: int = 3
    """Image channels."""
    max_text_len: int = 52
    """Tokens per caption including [CLS] and <|endoftext|> (52 in the released models)."""
    vocab_pad_multiple: int = 1024
    """The text embedding table is padded to a multiple of lcm(this, 128·TP) rows. 1024 keeps the padded size
    the same for TP 1, 2, 4 and 8, so distributed checkpoints reshard between those layouts."""
    text_position_table: int = 1024
    """Rows of the learned text position table (1024 in the released models; rows 2..max_text_len+1 are used)."""
    embed_dim: int = 64
    """Width of the projected, L2-normalized output embedding."""
    layernorm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    drop_path_rate: float = 0.0
    """Stochastic-depth rate, linearly increasing over layers; 0 disables it (as in the released models)."""
    logit_scale_init: float = math.log(1 / 0.07)
    """Initial value of the learnable log temperature."""
    layer_spec: Literal["local", "te"] = "local"
    """Layer implementation: 'local' (Megatron-Core modules, CPU and GPU) or 'te' (Transformer Engine, GPU only)."""
    attention: Literal["megatron", "sdpa"] = "sdpa"
    """Core attention of the 'local' spec: torch's scaled_dot_product_attention (the default: flash /
    memory-efficient kernels on GPU without Transformer Engine, no stored attention probabilities, faster on
    CPU too; docs/MODEL.md), or Megatron-Core's DotProductAttention. The 'te' spec always uses TE's attention."""
    sub_ln_kernel: Literal["auto", "eager", "triton"] = "eager"
    """The TP-sharded Sub-LN (TP > 1): 'triton' runs fused Triton passes around its statistics all-reduce, 'eager'
    torch ops; 'auto' picks Triton on a CUDA tensor when Triton is installed, eager otherwise. The default stays
    'eager' until tests/gpu/run.sh has run the kernels on a GPU (they pass the CPU interpreter and compile for
    sm_90; docs/PERFORMANCE.md)."""
    fp8: Literal["none", "delayed", "current"] = "none"
    """FP8 recipe for the 'te' spec: none, delayed scaling or current (per-tensor) scaling."""
    init_method_std: float = 0.06
    """Standard deviation of the normal initialisation of linear and embedding weights (0.02 for the released
    sizes; the tiny model's 0.06 leaves the contrastive loss's ln(b) plateau within ~100 steps)."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_position_table(self) -> int:
        """Patches + cls + the fairseq offset of 2 (199 for 224/16)."""
        return self.num_patches + 3

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads: {self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.patch_size: {self.patch_size} does not divide model.image_size={self.image_size}"
            )
        if self.max_text_len + 2 > self.text_position_table:
            raise ConfigError(
                f"model.max_text_len: {self.max_text_len} needs {self.max_text_len + 2} position rows "
                f"but model.text_position_table={self.text_position_table}"
            )
        if self.fp8 != "none" and self.layer_spec != "te":
            raise ConfigError(f"model.fp8: {self.fp8!r} needs model.layer_spec='te'")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate: {self.drop_path_rate} is not in [0, 1)")


def _released(hidden: int, layers: int, heads: int, embed: int, name: str) -> ModelConfig:
    return ModelConfig(
        preset=name,
        hidden_size=hidden,
        num_layers=layers,
        num_vl_layers=3,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        vocab_size=115244,
        image_size=224,
        patch_size=16,
        max_text_len=52,
        text_position_table=1024,
        embed_dim=embed,
        init_method_std=0.02,
    )


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "m2-0.4b": _released(768, 9, 12, 768, "m2-0.4b"),
    "m2-1b": _released(1024, 21, 16, 1024, "m2-1b"),
    "m2-10b": _released(4096, 21, 32, 1024, "m2-10b"),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one Sub-LN transformer layer (one modality branch)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    attention = 4 * (d * d + d)  # q, k, v, out projections with bias
    norms = 2 * d * 3 + 2 * f  # pre-attn LN, inner attention LN, pre-FFN LN; FFN Sub-LN over F
    ffn = (d * f + f) + (f * d + d)
    return attention + norms + ffn


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no model is built), unpadded vocabulary.

    The total equals SPEC.md §1.6's "params read at inference" for the released presets.
    """
    d = cfg.hidden_size
    p = cfg.patch_size
    layer = layer_parameters(cfg)
    vision = (
        (cfg.num_channels * p * p * d + d)  # patch conv
        + d  # cls token
        + cfg.vision_position_table * d
        + cfg.num_layers * layer
        + 2 * d  # final LN
        + d * cfg.embed_dim  # projection
    )
    text = (
        cfg.vocab_size * d
        + cfg.text_position_table * d
        + cfg.num_layers * layer
        + 2 * d
        + d * cfg.embed_dim
    )
    vl = cfg.num_vl_layers * layer + 2 * d
    return {"vision": vision, "text": text, "vl": vl, "logit_scale": 1, "total": vision + text + vl + 1}
