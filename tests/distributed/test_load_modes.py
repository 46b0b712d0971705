"""checkpoint.load_mode: a start from another run's checkpoint takes over the weights (weights), or the
weights and optimizer state (finetune), and starts a new run at step 0 with a fresh LR schedule; the run's
own checkpoints then win on every restart."""

from __future__ import annotations

import pytest
import torch

from m2megatron.config import ConfigError, load_config
from tests.distributed.test_trainer import SMALL, _fit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TRAIN = ["--train.train_steps=2", "--train.eval_at_end=false", "--train.tensorboard=false", "--optim.warmup_steps=1",
         "--optim.min_lr=0.0001"]


def _start(run_dir: str, overrides: list[str]) -> dict:
    """A trainer's state right after start-up (what it loaded), without training."""
    from m2megatron.checkpoint.optimizer_state import parts
    from m2megatron.models.state import full_state_dict
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + TRAIN + [f"--train.run_dir={run_dir}"] + overrides)
    trainer = Trainer(cfg, progress=False)
    try:
        states = [s for part in parts(trainer.optimizer) for s in part.optimizer.state.values()]
        return {
            "step": trainer.step,
            "params": {k: v.clone() for m in trainer.modules for k, v in full_state_dict(m).items()},
            "adam_steps": sorted({float(s["step"]) for s in states if "step" in s}),
            "moments": sum(float(s["exp_avg"].abs().sum()) for s in states if "exp_avg" in s),
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "kind": type(parts(trainer.optimizer)[0]).__name__,
        }
    finally:
        trainer.close()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_and_finetune_start_a_new_run_from_another_runs_checkpoint(dist_pool, tmp_path):
    pool = dist_pool(1)
    source = tmp_path / "pretrain"
    pool.run(_fit, str(source), TRAIN)
    (resumed,) = pool.run(_start, str(source), [])  # what a full resume of the source sees
    assert resumed["step"] == 2 and resumed["adam_steps"] == [2.0] and resumed["moments"] > 0 and resumed["lr"] > 0

    load = [f"--checkpoint.load={source / 'checkpoints'}"]
    # weights: the model only, so even the optimizer kind may change; everything else fresh
    (weights,) = pool.run(_start, str(tmp_path / "weights"),
                          load + ["--checkpoint.load_mode=weights", "--parallel.distributed_optimizer=true"])
    assert weights["step"] == 0 and _same(weights["params"], resumed["params"])
    assert weights["kind"] == "DistributedOptimizer" and weights["moments"] == 0 and weights["lr"] == 0.0

    # finetune: weights and optimizer state (Adam's own step count too), step and LR schedule fresh
    (finetune,) = pool.run(_start, str(tmp_path / "finetune"), load + ["--checkpoint.load_mode=finetune"])
    assert finetune["step"] == 0 and _same(finetune["params"], resumed["params"])
    assert finetune["adam_steps"] == [2.0] and finetune["moments"] == pytest.approx(resumed["moments"])
    assert finetune["lr"] == 0.0  # the fresh warm-up's first value, not the source's LR

    # The fine-tune trains and checkpoints; a restart (a requeue) resumes its own progress, not the source.
    pool.run(_fit, str(tmp_path / "finetune"), TRAIN + load + ["--checkpoint.load_mode=finetune"])
    (restarted,) = pool.run(_start, str(tmp_path / "finetune"), load + ["--checkpoint.load_mode=finetune"])
    assert restarted["step"] == 2 and restarted["adam_steps"] == [4.0]


def test_a_load_mode_other_than_resume_needs_a_checkpoint_path():
    with pytest.raises(ConfigError, match="checkpoint.load_mode: weights needs checkpoint.load"):
        load_config(overrides=["--checkpoint.load_mode=weights"]).validate()
    with pytest.raises(ConfigError, match="load_mode"):
        load_config(overrides=["--checkpoint.load_mode=other", "--checkpoint.load=x"]).validate()
