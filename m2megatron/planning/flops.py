"""FLOPs per sample (forward + backward), from the config alone: model FLOPs for MFU, hardware FLOPs for HFU.

Counts matrix multiplies only (2 FLOPs per multiply-add), the usual convention: a forward pass is
2·(params touched per token)·tokens plus attention scores and context; backward is twice the forward.
Norms, softmax and GELU are ignored (well under 1% at the released sizes).

- Model FLOPs (MFU): forward + backward of the model, 3 × forward, whatever the run recomputes.
- Hardware FLOPs (HFU): what the accelerator executes, model FLOPs plus the recomputed forward:
  full recompute re-runs the recomputed transformer layers (uniform: all of them; block: the first
  `recompute_num_layers` of each stage's stacks), selective recompute only core attention (the
  scores and context matmuls). Sequence-parallel padding (< TP tokens per segment) is not counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from m2megatron.config.model import ModelConfig
from m2megatron.models.recompute import recomputed_layers
from m2megatron.runtime.stages import stage_specs

# Dense bf16 / FP8 tensor-core peaks (TFLOP/s, no sparsity) of the accelerators we plan for, by form factor:
# the PCIe and NVL cards run at lower clocks and power than SXM (NVIDIA's H100 / H200 datasheets).
PEAK_TFLOPS = {
    ("h100-sxm", "bf16"): 989.0,
    ("h100-sxm", "fp8"): 1979.0,
    ("h100-pcie", "bf16"): 756.0,
    ("h100-pcie", "fp8"): 1513.0,
    ("h100-nvl", "bf16"): 835.0,
    ("h100-nvl", "fp8"): 1671.0,
    ("h200-sxm", "bf16"): 989.0,
    ("h200-sxm", "fp8"): 1979.0,
    ("h200-nvl", "bf16"): 836.0,
    ("h200-nvl", "fp8"): 1671.0,
}
PEAK_OVERRIDE_ENV = "M2_PEAK_TFLOPS"
RECOMPUTE_MODES = ("none", "selective", "full")


def core_attention_forward_flops(cfg: ModelConfig, tokens: int) -> int:
    """Scores (q·kᵀ) and context (p·v) of one layer over a segment of `tokens`."""
    return 2 * 2 * tokens * tokens * cfg.hidden_size


def layer_forward_flops(cfg: ModelConfig, tokens: int) -> int:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    projections = 2 * tokens * (4 * d * d + 2 * d * f)  # qkv + out, fc1 + fc2
    return projections + core_attention_forward_flops(cfg, tokens)


def _both_segments(cfg: ModelConfig, per_segment) -> int:
    return per_segment(cfg, cfg.num_image_tokens) + per_segment(cfg, cfg.max_text_len)


def forward_flops_per_sample(cfg: ModelConfig) -> int:
    towers = cfg.num_layers * _both_segments(cfg, layer_forward_flops)
    vl = cfg.num_vl_layers * _both_segments(cfg, layer_forward_flops)
    patch = 2 * cfg.num_patches * cfg.num_channels * cfg.patch_size ** 2 * cfg.hidden_size
    heads = 2 * 2 * cfg.hidden_size * cfg.embed_dim
    return towers + vl + patch + heads


def model_flops_per_sample(cfg: ModelConfig) -> int:
    """Forward + backward (2× forward): the numerator of MFU."""
    return 3 * forward_flops_per_sample(cfg)


def recompute_flops_per_sample(cfg: ModelConfig, recompute: str = "none", *, method: str = "uniform",
                               num_layers: int = 1, stage_layers: Sequence[int] | None = None) -> int:
    """Forward FLOPs re-run in backward by `recompute` (train.recompute, _method, _num_layers).

    stage_layers: tower layers of every pipeline stage (PP·VP of them; default one stage of all layers),
    which the block method needs: it recomputes the first `num_layers` of each stage's stacks.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute: unknown mode {recompute!r} (known: {', '.join(RECOMPUTE_MODES)})")
    if recompute == "none":
        return 0
    if recompute == "selective":
        return (cfg.num_layers + cfg.num_vl_layers) * _both_segments(cfg, core_attention_forward_flops)
    stages = list(stage_layers) if stage_layers is not None else [cfg.num_layers]
    if sum(stages) != cfg.num_layers:
        raise ValueError(f"stage_layers: {stages} do not add up to model.num_layers={cfg.num_layers}")
    layers = sum(recomputed_layers(n, method, num_layers) for n in stages)
    layers += recomputed_layers(cfg.num_vl_layers, method, num_layers)  # the VL stack on the last stage
    return layers * _both_segments(cfg, layer_forward_flops)


def hardware_flops_per_sample(cfg: ModelConfig, recompute: str = "none", *, method: str = "uniform",
                              num_layers: int = 1, stage_layers: Sequence[int] | None = None) -> int:
    """Model FLOPs plus the recomputed forward: the numerator of HFU."""
    return model_flops_per_sample(cfg) + recompute_flops_per_sample(
        cfg, recompute, method=method, num_layers=num_layers, stage_layers=stage_layers)


def train_flops_per_sample(cfg: ModelConfig, recompute: bool | str = False) -> int:
    """Hardware FLOPs of a step with `recompute` (True means full recompute of every layer; a mode name
    means that mode with one-layer uniform groups). False: model FLOPs."""
    mode = {True: "full", False: "none"}.get(recompute, recompute)
    return hardware_flops_per_sample(cfg, mode)


def run_flops_per_sample(cfg) -> tuple[int, int]:
    """(model, hardware) FLOPs per sample of a RunConfig's training step, at its pipeline split."""
    par = cfg.parallel
    pp, vp = par.pipeline_parallel, par.virtual_pipeline
    stages = sorted((s.stage, s.layer_range) for r in range(pp) for s in stage_specs(
        cfg.model.num_layers, pp, r, vp, first=par.first_stage_layers, last=par.last_stage_layers))
    train = cfg.train
    hardware = hardware_flops_per_sample(cfg.model, train.recompute, method=train.recompute_method,
                                         num_layers=train.recompute_num_layers,
                                         stage_layers=[end - start for _, (start, end) in stages])
    return model_flops_per_sample(cfg.model), hardware


def device_model(device_name: str, memory_bytes: int | None = None) -> str | None:
    """'h100-sxm', 'h100-pcie', 'h100-nvl', 'h200-sxm' or 'h200-nvl' from torch.cuda.get_device_name() (e.g.
    'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL', 'NVIDIA H200') and, where the name does
    not say the form factor, the memory size (an H100 with ~94 GB is an NVL, 80 GB an SXM); None if unknown."""
    name = device_name.lower()
    for gpu in ("h200", "h100"):
        if gpu not in name:
            continue
        if "pcie" in name:
            return f"{gpu}-pcie"
        if "nvl" in name:
            return f"{gpu}-nvl"
        if gpu == "h100" and "hbm3" not in name and "sxm" not in name and memory_bytes and memory_bytes > 90e9:
            return "h100-nvl"
        return f"{gpu}-sxm"
    return None


def peak_tflops(device_name: str, precision: str, memory_bytes: int | None = None) -> float | None:
    """Dense peak of the exact device (device_model) at `precision` ('bf16' or 'fp8'), or None (then MFU is
    not reported). The environment variable M2_PEAK_TFLOPS overrides it for any device."""
    override = os.environ.get(PEAK_OVERRIDE_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"{PEAK_OVERRIDE_ENV}: expected TFLOP/s as a number, got {override!r}") from None
    model = device_model(device_name, memory_bytes)
    return PEAK_TFLOPS.get((model, precision)) if model else None
