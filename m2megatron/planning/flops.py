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

from collections.abc import Sequence

from m2megatron.config.model import ModelConfig
from m2megatron.models.recompute import recomputed_layers
from m2megatron.runtime.stages import stage_specs

# Dense bf16 / FP8 tensor-core peaks (TFLOP/s, no sparsity) of the accelerators we plan for.
PEAK_TFLOPS = {
    ("h100", "bf16"): 989.0,
    ("h100", "fp8"): 1979.0,
    ("h200", "bf16"): 989.0,
    ("h200", "fp8"): 1979.0,
}
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


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Known peak for a device name such as 'NVIDIA H200', or None (then MFU is not reported)."""
    name = device_name.lower()
    for (gpu, prec), tflops in PEAK_TFLOPS.items():
        if gpu in name and prec == precision:
            return tflops
    return None
