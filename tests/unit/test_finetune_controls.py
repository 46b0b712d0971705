"""finetune.*: which parameters a lock freezes, the LR multiplier each parameter's Megatron param group
carries, and that Megatron's scheduler applies it through warm-up and decay (one process, tiny model)."""

from __future__ import annotations

import math

import pytest

from m2megatron.config import ConfigError, load_config
from m2megatron.runtime.finetune import is_locked, lr_mult, place

pytestmark = pytest.mark.unit

TINY = ["--model.num_layers=2", "--model.num_vl_layers=2", "--model.hidden_size=32", "--model.ffn_hidden_size=64",
        "--model.image_size=16", "--model.embed_dim=16", "--optim.lr=0.01", "--optim.min_lr=0.001",
        "--optim.warmup_steps=2", "--train.train_steps=6"]


def test_parameters_are_placed_in_openclip_groups():
    cfg = load_config(overrides=TINY).model
    assert place("module.vision_embedding.patch.weight", cfg) == ("image", 0, 4)
    assert place("vision_layers.1.mlp.linear_fc1.weight", cfg) == ("image", 2, 4)
    assert place("vision_final_norm.bias", cfg) == ("image", 3, 4)
    assert place("vision_projection.weight", cfg) == ("image", 3, 4)
    assert place("text_embedding.word_embeddings.weight", cfg) == ("text", 0, 4)
    assert place("text_layers.0.self_attention.linear_qkv.layer_norm_weight", cfg) == ("text", 1, 4)  # te names
    assert place("vl_layers.1.input_layernorm.weight", cfg) == ("vl", 1, 3)
    assert place("vl_final_norm.weight", cfg) == ("vl", 2, 3)
    assert place("logit_scale", cfg) is None
    with pytest.raises(ValueError, match="belongs to no part"):
        place("pooler.weight", cfg)


def test_unlocked_groups_count_from_the_top():
    cfg = load_config(overrides=TINY + ["--finetune.lock_image=true", "--finetune.lock_image_unlocked_groups=2",
                                        "--finetune.lock_vl=true"])
    model, ft = cfg.model, cfg.finetune
    assert is_locked("vision_embedding.cls_token", model, ft) and is_locked("vision_layers.0.pre_mlp_layernorm.bias",
                                                                             model, ft)
    assert not is_locked("vision_layers.1.pre_mlp_layernorm.bias", model, ft)  # last layer: group 2 of 4
    assert not is_locked("vision_projection.weight", model, ft)
    assert is_locked("vl_final_norm.weight", model, ft) and is_locked("vl_layers.0.mlp.linear_fc1.bias", model, ft)
    assert not is_locked("text_embedding.position_embeddings", model, ft)
    assert not is_locked("logit_scale", model, ft)


def test_lr_multipliers_and_layer_decay():
    cfg = load_config(overrides=TINY + ["--finetune.image_lr_mult=0.5", "--finetune.image_layer_decay=0.8",
                                        "--finetune.text_lr_mult=2", "--finetune.vl_lr_mult=0.25"])
    model, ft = cfg.model, cfg.finetune
    assert lr_mult("vision_projection.weight", model, ft) == 0.5
    assert lr_mult("vision_layers.1.mlp.linear_fc1.weight", model, ft) == pytest.approx(0.5 * 0.8)
    assert lr_mult("vision_layers.0.mlp.linear_fc1.weight", model, ft) == pytest.approx(0.5 * 0.8 ** 2)
    assert lr_mult("vision_embedding.patch.weight", model, ft) == pytest.approx(0.5 * 0.8 ** 3)
    assert lr_mult("text_layers.0.mlp.linear_fc1.weight", model, ft) == 2.0  # no text decay
    assert lr_mult("vl_layers.0.mlp.linear_fc1.weight", model, ft) == 0.25
    assert lr_mult("logit_scale", model, ft) == 1.0


@pytest.mark.parametrize("override,match", [
    ("--finetune.lock_text_unlocked_groups=1", "needs finetune.lock_text=true"),
    ("--finetune.image_layer_decay=1.5", "finetune.image_layer_decay"),
    ("--finetune.vl_lr_mult=0", "finetune.vl_lr_mult"),
])
def test_bad_settings_name_the_setting(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=TINY + [override]).validate()


def test_more_unlocked_groups_than_the_tower_has_is_refused():
    with pytest.raises(ConfigError, match="more than the 4 groups"):
        load_config(overrides=TINY + ["--finetune.lock_image=true", "--finetune.lock_image_unlocked_groups=5"]
                    ).validate()


def _groups_and_lrs(overrides: list[str]) -> dict:
    """Build the training stages in this (fresh) process; per parameter its group's lr_mult, and each group's
    LR at every step of the schedule."""
    from m2megatron.parallel import initialize, seed_everything
    from m2megatron.runtime import build_stages

    cfg = load_config(overrides=TINY + overrides).validate(world_size=1)
    groups = initialize(cfg.parallel)
    seed_everything(0, groups)
    stages = build_stages(cfg, groups)
    (module,) = stages.modules
    ids = {id(p): n for n, p in module.named_parameters()}
    per_param, lrs = {}, []
    for group in stages.optimizer.param_groups:
        for p in group["params"]:
            per_param[ids[id(p)]] = group["lr_mult"]
    for _ in range(cfg.train.train_steps + 1):
        lrs.append([(g["lr_mult"], g["lr"]) for g in stages.optimizer.param_groups])
        stages.scheduler.step(increment=1)
    frozen = sorted(n for n, p in module.named_parameters() if not p.requires_grad)
    return {"per_param": per_param, "lrs": lrs, "frozen": frozen, "all": sorted(ids.values())}


def test_param_groups_carry_the_multiplier_and_the_scheduler_applies_it():
    from tests.standin import run_in_fresh_process

    result = run_in_fresh_process(_groups_and_lrs, ["--finetune.image_lr_mult=0.5", "--finetune.image_layer_decay=0.8",
                                                    "--finetune.lock_text=true"])
    cfg = load_config(overrides=TINY + ["--finetune.image_lr_mult=0.5", "--finetune.image_layer_decay=0.8",
                                        "--finetune.lock_text=true"])
    # every trainable parameter sits in a group with its own multiplier; the locked text tower in none
    assert result["frozen"] == sorted(n for n in result["all"] if n.startswith("text_"))
    assert sorted(result["per_param"]) == sorted(n for n in result["all"] if not n.startswith("text_"))
    for name, mult in result["per_param"].items():
        assert mult == lr_mult(name, cfg.model, cfg.finetune), name
    # warm-up from 0 over 2 steps, then cosine from lr·mult to min_lr·mult
    base = [0.0, 0.005, 0.01] + [0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in (1, 2, 3, 4)]
    for step, groups in enumerate(result["lrs"]):
        for mult, lr in groups:
            assert lr == pytest.approx(base[step] * mult, rel=1e-12), (step, mult)
    assert {m for m, _ in result["lrs"][0]} >= {0.5, 0.4, 0.5 * 0.8 ** 3, 1.0}


def test_an_optimizer_state_loads_only_into_the_same_parameter_groups():
    from m2megatron.checkpoint.load import param_group_changes

    def cfg(*overrides):
        return load_config(overrides=TINY + list(overrides)).to_dict()

    old = {k: v for k, v in cfg().items() if k != "finetune"}  # a checkpoint from before finetune.*
    assert param_group_changes(old, cfg()) == []
    assert param_group_changes(cfg(), cfg("--finetune.lock_image=true")) == []  # fewer trainable: fine
    assert param_group_changes(cfg(), cfg("--finetune.text_lr_mult=0.5")) == [
        "finetune.text_lr_mult: checkpoint 1.0, current 0.5"]
    assert param_group_changes(cfg("--finetune.lock_image=true"), cfg("--finetune.lock_image=true",
                                                                      "--finetune.lock_image_unlocked_groups=1")) == [
        "finetune.lock_image: 4 of its 4 groups were locked in the checkpoint (no optimizer state), 3 now"]
