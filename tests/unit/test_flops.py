"""Model FLOPs (MFU) and hardware FLOPs (HFU) per sample: recompute adds to the second only, by mode."""

import dataclasses

import pytest

from m2megatron.config import load_config, preset
from m2megatron.planning import flops

pytestmark = pytest.mark.unit

CFG = preset("m2-0.4b")


def _layer_forward_both_segments(cfg) -> int:
    return flops.layer_forward_flops(cfg, cfg.num_image_tokens) + flops.layer_forward_flops(cfg, cfg.max_text_len)


def test_model_flops_ignore_recompute_and_hardware_flops_add_the_recomputed_forward():
    model = flops.model_flops_per_sample(CFG)
    assert model == 3 * flops.forward_flops_per_sample(CFG)
    assert flops.hardware_flops_per_sample(CFG, "none") == model
    layers = CFG.num_layers + CFG.num_vl_layers
    full = flops.hardware_flops_per_sample(CFG, "full", method="uniform", num_layers=2)
    assert full - model == layers * _layer_forward_both_segments(CFG)  # every layer, whatever the group size
    attention = sum(flops.core_attention_forward_flops(CFG, s) for s in (CFG.num_image_tokens, CFG.max_text_len))
    assert flops.hardware_flops_per_sample(CFG, "selective") - model == layers * attention
    assert model < flops.hardware_flops_per_sample(CFG, "selective") < full


def test_block_recompute_counts_the_first_layers_of_each_stage_stack():
    cfg = dataclasses.replace(CFG, num_layers=5, num_vl_layers=3)
    extra = flops.recompute_flops_per_sample(cfg, "full", method="block", num_layers=2, stage_layers=[3, 2])
    assert extra == (2 + 2 + 2) * _layer_forward_both_segments(cfg)  # 2 of 3, 2 of 2, 2 of the 3 VL layers
    with pytest.raises(ValueError, match="stage_layers"):
        flops.recompute_flops_per_sample(cfg, "full", method="block", stage_layers=[3, 3])
    with pytest.raises(ValueError, match="train.recompute"):
        flops.recompute_flops_per_sample(cfg, "everything")


def test_run_flops_follow_the_run_config_and_the_pipeline_split():
    cfg = load_config(overrides=["--model.preset=m2-0.4b", "--parallel.pipeline_parallel=3", "--train.recompute=full",
                                 "--train.recompute_method=block", "--train.recompute_num_layers=1"])
    model, hardware = flops.run_flops_per_sample(cfg)
    assert model == flops.model_flops_per_sample(cfg.model)
    stages = cfg.parallel.pipeline_parallel
    assert hardware - model == (stages + 1) * _layer_forward_both_segments(cfg.model)  # 1 per stage + 1 VL


def test_legacy_train_flops_is_hardware_flops_with_full_recompute():
    assert flops.train_flops_per_sample(CFG) == flops.model_flops_per_sample(CFG)
    assert flops.train_flops_per_sample(CFG, True) == flops.hardware_flops_per_sample(CFG, "full")
    assert flops.train_flops_per_sample(CFG, True) == 4 * flops.forward_flops_per_sample(CFG) - (
        flops.forward_flops_per_sample(CFG) - (CFG.num_layers + CFG.num_vl_layers) * _layer_forward_both_segments(CFG))


@pytest.mark.parametrize("name,memory,model,bf16", [
    ("NVIDIA H100 80GB HBM3", 85e9, "h100-sxm", 989.0),
    ("NVIDIA H100 PCIe", 85e9, "h100-pcie", 756.0),
    ("NVIDIA H100 NVL", 100e9, "h100-nvl", 835.0),
    ("NVIDIA H100", 100e9, "h100-nvl", 835.0),  # no form factor in the name: 94 GB is the NVL
    ("NVIDIA H200", 150e9, "h200-sxm", 989.0),
    ("NVIDIA H200 NVL", 150e9, "h200-nvl", 836.0),
    ("NVIDIA A100-SXM4-80GB", 85e9, None, None),
])
def test_peak_flops_follow_the_exact_device_and_the_override(monkeypatch, name, memory, model, bf16):
    monkeypatch.delenv(flops.PEAK_OVERRIDE_ENV, raising=False)
    assert flops.device_model(name, int(memory)) == model
    assert flops.peak_tflops(name, "bf16", int(memory)) == bf16
    monkeypatch.setenv(flops.PEAK_OVERRIDE_ENV, "500")
    assert flops.peak_tflops(name, "bf16", int(memory)) == 500.0
    monkeypatch.setenv(flops.PEAK_OVERRIDE_ENV, "fast")
    with pytest.raises(ValueError, match="M2_PEAK_TFLOPS"):
        flops.peak_tflops(name, "bf16")
