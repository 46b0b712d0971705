"""LR schedules (optim.lr_schedule) through Megatron's OptimizerParamScheduler, and their resume semantics."""

import math
from types import SimpleNamespace

import pytest

from m2megatron.config import ConfigError, load_config
from m2megatron.config.optim import OptimConfig
from m2megatron.runtime.optimizer import build_scheduler
from m2megatron.train.checkpointing import schedule_in_effect

LR, MIN_LR = 1.0, 0.1


def _optimizer():
    return SimpleNamespace(param_groups=[{"wd_mult": 1.0}, {"wd_mult": 0.0}])


def _curve(train_steps=100, steps=12, **optim):
    """LR after 0..steps optimizer steps (what step k+1 trains with is the value at k)."""
    cfg = OptimConfig(lr=LR, min_lr=MIN_LR, weight_decay=0.05, **optim)
    sched = build_scheduler(_optimizer(), cfg, train_steps)
    lrs = [sched.optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step(1)
        lrs.append(sched.optimizer.param_groups[0]["lr"])
    assert [g["weight_decay"] for g in sched.optimizer.param_groups] == [0.05, 0.0]
    return lrs


def _cosine(step, warmup, decay):
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup)))


def test_warmup_then_constant():
    assert _curve(lr_schedule="constant", warmup_steps=4, decay_steps=8) == pytest.approx(
        [0, 0.25, 0.5, 0.75] + [LR] * 9)


def test_warmup_then_cosine_to_min_lr_at_decay_steps_then_flat():
    want = [k / 2 for k in range(3)] + [_cosine(k, 2, 10) for k in range(3, 11)] + [MIN_LR] * 2
    assert _curve(lr_schedule="cosine", warmup_steps=2, decay_steps=10) == pytest.approx(want)


def test_linear_decay():
    want = [k / 2 for k in range(3)] + [LR - (LR - MIN_LR) * (k - 2) / 8 for k in range(3, 11)] + [MIN_LR] * 2
    assert _curve(lr_schedule="linear", warmup_steps=2, decay_steps=10) == pytest.approx(want)


def test_wsd_warmup_stable_then_decay_over_the_last_steps():
    lrs = _curve(lr_schedule="wsd", warmup_steps=2, decay_steps=10, wsd_decay_steps=4)
    want = [0, 0.5] + [LR] * 5 + [LR - (LR - MIN_LR) * k / 4 for k in range(1, 5)] + [MIN_LR] * 2
    assert lrs == pytest.approx(want)
    cosine = _curve(lr_schedule="wsd", warmup_steps=2, decay_steps=10, wsd_decay_steps=4, wsd_decay_style="cosine")
    assert cosine[8] == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 2 / 4)))


def test_decay_steps_unset_follow_train_steps_and_a_short_run_cuts_the_warmup():
    assert _curve(train_steps=10, warmup_steps=2) == _curve(train_steps=50, warmup_steps=2, decay_steps=10)
    assert _curve(train_steps=3, steps=3, warmup_steps=20)[:3] == pytest.approx([0, 0.5, LR])


def _resumed(saved_cfg: OptimConfig, new_cfg: OptimConfig, at: int):
    saved = build_scheduler(_optimizer(), saved_cfg, 100)
    saved.step(at)
    resumed = build_scheduler(_optimizer(), new_cfg, 100)
    resumed.load_state_dict(saved.state_dict())
    return saved, resumed


def test_resume_continues_the_checkpoints_schedule_unless_overridden():
    old = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=2, decay_steps=10)
    longer = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=2, decay_steps=40)
    saved, kept = _resumed(old, longer, 6)
    assert (kept.num_steps, kept.lr_decay_steps) == (6, 10)
    assert kept.optimizer.param_groups[0]["lr"] == pytest.approx(saved.optimizer.param_groups[0]["lr"])
    assert "the checkpoint's, continued" in schedule_in_effect(kept, False)

    overridden = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=2, decay_steps=40, override_schedule_on_resume=True)
    _, extended = _resumed(old, overridden, 6)
    assert (extended.num_steps, extended.lr_decay_steps) == (6, 40)
    assert extended.optimizer.param_groups[0]["lr"] == pytest.approx(_cosine(6, 2, 40))
    line = schedule_in_effect(extended, True)
    assert "this run's optim.* settings" in line and "at step 40" in line and "step 6" in line


@pytest.mark.parametrize("overrides,message", [
    (["--optim.lr_schedule=wsd"], "optim.wsd_decay_steps: optim.lr_schedule=wsd needs"),
    (["--optim.wsd_decay_steps=3"], "optim.wsd_decay_steps: only for optim.lr_schedule=wsd"),
    (["--optim.warmup_steps=5", "--optim.decay_steps=5"], "optim.decay_steps: 5 must exceed"),
    (["--optim.lr_schedule=wsd", "--optim.warmup_steps=2", "--optim.decay_steps=10", "--optim.wsd_decay_steps=9"],
     "longer than the steps after the warm-up"),
])
def test_bad_schedule_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides).validate()


def test_wsd_decay_longer_than_a_train_steps_schedule_is_a_config_error():
    cfg = OptimConfig(lr_schedule="wsd", warmup_steps=2, wsd_decay_steps=9)
    with pytest.raises(ConfigError, match="longer than the 8 steps after the warm-up of a 10-step schedule"):
        build_scheduler(_optimizer(), cfg, 10)
