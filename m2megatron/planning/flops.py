"""Model FLOPs per sample (forward + backward), from the config alone.

Counts matrix multiplies only (2 FLOPs per multiply-add), the usual convention for MFU: a forward
pass is 2·(params touched per token)·tokens plus attention scores and context; backward is twice the
forward. Norms, softmax and GELU are ignored (well under 1% at the released sizes).
"""

from __future__ import annotations

from m2megatron.config.model import ModelConfig

# Dense bf16 / FP8 tensor-core peaks (TFLOP/s, no sparsity) of the accelerators we plan for.
PEAK_TFLOPS = {
    ("h100", "bf16"): 989.0,
    ("h100", "fp8"): 1979.0,
    ("h200", "bf16"): 989.0,
    ("h200", "fp8"): 1979.0,
}


def layer_forward_flops(cfg: ModelConfig, tokens: int) -> int:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    projections = 2 * tokens * (4 * d * d + 2 * d * f)  # qkv + out, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * d  # scores and context
    return projections + attention


def forward_flops_per_sample(cfg: ModelConfig) -> int:
    s_img, s_txt = cfg.num_image_tokens, cfg.max_text_len
    towers = cfg.num_layers * (layer_forward_flops(cfg, s_img) + layer_forward_flops(cfg, s_txt))
    vl = cfg.num_vl_layers * (layer_forward_flops(cfg, s_img) + layer_forward_flops(cfg, s_txt))
    patch = 2 * cfg.num_patches * cfg.num_channels * cfg.patch_size ** 2 * cfg.hidden_size
    heads = 2 * 2 * cfg.hidden_size * cfg.embed_dim
    return towers + vl + patch + heads


def train_flops_per_sample(cfg: ModelConfig, recompute: bool = False) -> int:
    """Forward + backward (2× forward), + one more forward with full recompute."""
    return forward_flops_per_sample(cfg) * (4 if recompute else 3)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Known peak for a device name such as 'NVIDIA H200', or None (then MFU is not reported)."""
    name = device_name.lower()
    for (gpu, prec), tflops in PEAK_TFLOPS.items():
        if gpu in name and prec == precision:
            return tflops
    return None
