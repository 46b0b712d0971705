"""checkpoint.load=<weights file>: the model's sizes come from the file; a size the config sets itself that
disagrees is one line naming both; a weights file cannot be resumed (no processes, no model built)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from m2megatron.checkpoint.files import save_consolidated
from m2megatron.checkpoint.reference_format import reference_shapes
from m2megatron.checkpoint.safety import CheckpointError
from m2megatron.checkpoint.start_file import start_model_config
from m2megatron.config import ConfigError, load_config, preset

pytestmark = pytest.mark.unit

FILE_SIZES = dict(num_layers=3, vocab_size=500, text_position_table=60)  # tiny's width 64, so tiny's 4 heads


def _reference_ckpt(tmp_path, **sizes):
    cfg = dataclasses.replace(preset("tiny"), **{**FILE_SIZES, **sizes})
    path = tmp_path / "released.ckpt"
    torch.save({"state_dict": {k: torch.zeros(s) for k, s in reference_shapes(cfg).items()}}, path)
    return path


def _start(path, *overrides):
    return start_model_config(load_config(overrides=[f"--checkpoint.load={path}", "--checkpoint.load_mode=weights",
                                                     *overrides]))


def test_sizes_come_from_a_released_checkpoint_and_other_settings_from_the_config(tmp_path):
    path = _reference_ckpt(tmp_path)
    model = _start(path, "--model.max_text_len=20", "--model.drop_path_rate=0.1").model
    assert (model.num_layers, model.vocab_size, model.text_position_table) == (3, 500, 60)
    assert (model.num_attention_heads, model.max_text_len, model.drop_path_rate) == (4, 20, 0.1)
    assert _start(path, "--model.num_layers=3").model.num_layers == 3  # an explicit size that agrees


def test_heads_of_a_width_no_preset_has_come_from_the_config(tmp_path):
    path = _reference_ckpt(tmp_path, hidden_size=48, ffn_hidden_size=96)
    assert _start(path).model.num_attention_heads == 4
    assert _start(path, "--model.num_attention_heads=6").model.num_attention_heads == 6


def test_sizes_that_disagree_with_the_file_are_one_line_naming_both(tmp_path):
    path = _reference_ckpt(tmp_path)
    with pytest.raises(ConfigError) as info:
        _start(path, "--model.preset=m2-0.4b")
    message = str(info.value)
    assert "\n" not in message and "preset m2-0.4b" in message and str(path) in message
    assert "hidden_size=768" in message and "hidden_size=64" in message
    with pytest.raises(ConfigError, match=r"has num_layers=5, but checkpoint.load .* has num_layers=3"):
        _start(path, "--model.num_layers=5")


def test_a_consolidated_file_gives_its_heads_too(tmp_path):
    cfg = dataclasses.replace(preset("tiny"), num_attention_heads=2, **FILE_SIZES)
    full = {"logit_scale": torch.zeros(())}  # the sizes are read from the metadata alone
    save_consolidated(tmp_path / "model.safetensors", full, cfg)
    model = _start(tmp_path / "model.safetensors").model
    assert (model.num_attention_heads, model.num_layers, model.vocab_size) == (2, 3, 500)
    with pytest.raises(ConfigError, match="num_attention_heads=8.*num_attention_heads=2"):
        _start(tmp_path / "model.safetensors", "--model.num_attention_heads=8")


def test_a_weights_file_cannot_be_resumed_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="single weights file, which cannot be resumed"):
        load_config(overrides=["--checkpoint.load=m2_encoder_0.4B.ckpt"]).validate()
    with pytest.raises(CheckpointError, match="does not exist"):
        _start(tmp_path / "missing.ckpt")
    unchanged = load_config(overrides=["--checkpoint.load=auto"])
    assert start_model_config(unchanged) is unchanged


def _load_into_stages(path: str) -> dict:
    """Build the stages of the file's model in this (fresh) process and load the file into them."""
    from safetensors.torch import load_file

    from m2megatron.checkpoint.optimizer_state import parts
    from m2megatron.checkpoint.start_file import load_weights_file
    from m2megatron.models import full_state_dict
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import build_stages

    cfg = _start(path, "--train.precision=bf16").validate(world_size=1)
    groups = initialize(cfg.parallel)
    seed_everything(0, groups)
    stages = build_stages(cfg, groups)
    load_weights_file(path, stages.modules, cfg.model)
    stages.optimizer.reload_model_params()  # what the trainer does after the load
    pairs = [(model, main) for part in parts(stages.optimizer)
             for models, mains in zip(part.float16_groups, part.fp32_from_float16_groups) for model, main in
             zip(models, mains)]
    full = load_file(path)  # written without reference_unused tensors
    model = full_state_dict(stages.modules[0])
    return {"keys": sorted(model) == sorted(full), "main_dtypes": sorted({str(m.dtype) for _, m in pairs}),
            "mismatched": [k for k in full if not torch.equal(model[k].float(), full[k].bfloat16().float())],
            "main_follow": bool(pairs) and all(torch.equal(main, model.float()) for model, main in pairs)}


def test_a_consolidated_file_loads_into_bf16_stages(tmp_path):
    """The padded vocabulary included: 500 rows of the file, 1024 in the model."""
    from m2megatron.checkpoint.reference_format import reference_to_ours
    from tests.standin import run_in_fresh_process

    cfg = dataclasses.replace(preset("tiny"), **FILE_SIZES)
    gen = torch.Generator().manual_seed(3)
    full, _ = reference_to_ours({k: torch.randn(s, generator=gen) for k, s in reference_shapes(cfg).items()}, cfg)
    save_consolidated(tmp_path / "model.safetensors", full, cfg)
    loaded = run_in_fresh_process(_load_into_stages, str(tmp_path / "model.safetensors"))
    assert loaded["keys"] and loaded["mismatched"] == [] and loaded["main_dtypes"] == ["torch.float32"]
    assert loaded["main_follow"]  # the fp32 main weights are the loaded (bf16-rounded) ones


def test_a_tp_rank_fuses_only_its_own_heads_of_a_released_qkv():
    from m2megatron.checkpoint.reference_format import FusedQKV, fuse_qkv

    for shape in ((12, 5), (12,)):  # weight and bias; 4 heads of 3
        q, k, v = (torch.randn(shape) for _ in range(3))
        whole, lazy = fuse_qkv(q, k, v, 4), FusedQKV(q, k, v, 4)
        assert lazy.shape == whole.shape and torch.equal(lazy[...], whole)
        for tp in (2, 4):
            rows = 36 // tp
            for rank in range(tp):
                assert torch.equal(lazy[(slice(rank * rows, (rank + 1) * rows),)], whole[rank * rows:(rank + 1) * rows])
