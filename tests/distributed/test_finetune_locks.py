"""finetune.lock_image at TP2 with the distributed optimizer in bf16: the locked vision tower gets no DDP
gradient buffer and no optimizer state, neither Adam's moments nor fp32 main weights (bytes measured against
the same run unlocked), and its weights are bit-identical after training steps while the rest trains."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_trainer import SMALL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUN = ["--parallel.tensor_parallel=2", "--parallel.distributed_optimizer=true", "--train.precision=bf16",
       "--optim.lr=0.01", "--train.train_steps=2", "--optim.warmup_steps=0", "--train.eval_at_end=false",
       "--train.tensorboard=false", "--checkpoint.load=null"]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _train_two_steps(run_dir: str, overrides: list[str]) -> dict:
    """Bytes of this rank's DDP gradient buffers and optimizer state, and which full weights two steps changed."""
    from m2megatron.checkpoint.optimizer_state import parts
    from m2megatron.config import load_config
    from m2megatron.models.state import full_state_dict
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + RUN + [f"--train.run_dir={run_dir}"] + overrides)
    trainer = Trainer(cfg, progress=False)
    try:
        (module,) = trainer.modules
        before = {k: v.clone() for k, v in full_state_dict(module).items()}
        for _ in range(2):
            trainer.train_step()
        after = full_state_dict(module)
        inner = [part.optimizer for part in parts(trainer.optimizer)]
        locked = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        in_optimizer = {id(p) for part in parts(trainer.optimizer) for g in part.optimizer.param_groups
                        for p in g["params"]}
        kinds = ("model_float16_groups", "model_fp32_groups")  # the model parameters it keeps main copies of
        main_params = {id(p) for part in parts(trainer.optimizer) for kind in kinds for g in getattr(part, kind, [])
                       for p in g}
        return {
            "grad_bytes": _nbytes(b.grad_data for c in trainer.stages.chunks
                                  for b in c.buffers + c.expert_parallel_buffers),
            "state_bytes": _nbytes(t for opt in inner for s in opt.state.values() for t in s.values()
                                   if torch.is_tensor(t) and t.dim() > 0),
            "main_bytes": _nbytes(p for part in parts(trainer.optimizer)
                                  for g in getattr(part, "shard_fp32_from_float16_groups", []) for p in g),
            "locked_numel": sum(p.numel() for _, p in locked),
            "locked_tensors": len(locked),
            "locked_with_main_grad": [n for n, p in locked if getattr(p, "main_grad", None) is not None],
            "locked_in_optimizer": [n for n, p in locked if id(p) in in_optimizer or id(p) in main_params],
            "unchanged": sorted(k for k in before if torch.equal(before[k], after[k])),
            "names": sorted(before),
        }
    finally:
        trainer.close()


def test_a_locked_tower_has_no_gradient_buffer_no_optimizer_state_and_does_not_move(dist_pool, tmp_path):
    pool = dist_pool(2)
    free = pool.run(_train_two_steps, str(tmp_path / "free"), [])
    locked = pool.run(_train_two_steps, str(tmp_path / "locked"), ["--finetune.lock_image=true"])
    vision = sorted(k for k in free[0]["names"] if k.startswith("vision_"))
    for rank in (0, 1):
        f, l = free[rank], locked[rank]
        assert f["locked_numel"] == 0 and l["locked_numel"] > 0
        assert l["locked_with_main_grad"] == [] and l["locked_in_optimizer"] == []
        # fp32 gradients: 4 bytes per locked parameter fewer, plus the distributed optimizer's alignment of each
        # parameter's start in the buffer (to 64 elements) and of the buffer's end (measured: 326 144 → 258 560 bytes)
        padding = 4 * (64 * l["locked_tensors"] + 128)
        assert 0 <= (f["grad_bytes"] - l["grad_bytes"]) - 4 * l["locked_numel"] < padding, (f, l)
        # Adam's two fp32 moments: exactly 8 bytes per locked parameter fewer (DP=1: the rank's whole shard)
        assert f["state_bytes"] - l["state_bytes"] == 8 * l["locked_numel"], (f, l)
        # and the fp32 main copies of the bf16 weights: 4 bytes per locked parameter fewer
        assert l["main_bytes"] > 0 and f["main_bytes"] - l["main_bytes"] == 4 * l["locked_numel"], (f, l)
        assert set(l["unchanged"]) == set(vision)  # the locked tower is bit-identical, everything else trains
        assert not set(f["unchanged"]) & set(vision)


def _changed_after_two_steps(run_dir: str, overrides: list[str]) -> list[str]:
    """This rank's full weights (gathered over TP) that two training steps changed."""
    from m2megatron.config import load_config
    from m2megatron.models.state import full_state_dict
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}", "--train.tensorboard=false",
                                         "--checkpoint.load=null", "--optim.warmup_steps=0"] + overrides)
    trainer = Trainer(cfg, progress=False)
    try:
        before = {k: v.clone() for m in trainer.modules for k, v in full_state_dict(m).items()}
        for _ in range(2):
            trainer.train_step()
        after = {k: v for m in trainer.modules for k, v in full_state_dict(m).items()}
        return sorted(k for k in before if not torch.equal(before[k], after[k]))
    finally:
        trainer.close()


def test_a_first_pipeline_stage_with_every_parameter_locked_still_trains_the_rest(dist_pool, tmp_path):
    """PP2 with both towers locked: stage 0 (embeddings, tower layer 0) has nothing to train, so an empty gradient
    buffer and distributed-optimizer shard; Megatron's schedule skips its backward, and the last stage's VL block
    and logit scale train."""
    first, last = dist_pool(2).run(_changed_after_two_steps, str(tmp_path / "run"), [
        "--parallel.pipeline_parallel=2", "--parallel.distributed_optimizer=true", "--finetune.lock_image=true",
        "--finetune.lock_text=true"])
    assert first == []
    assert last and all(k.startswith("vl_") or k == "logit_scale" for k in last), last


def test_a_locked_run_resumes_at_another_layout_but_not_with_other_multipliers(dist_pool, tmp_path):
    """bf16 and the distributed optimizer: saved at TP2, resumed at DP2 with the same finetune.* settings; a
    resume with another LR multiplier is refused in one line naming it."""
    import json

    from tests.distributed.test_trainer import _fit
    from tests.harness import DistributedTestError

    run = str(tmp_path / "run")
    same = ["--train.eval_at_end=false", "--train.tensorboard=false", "--parallel.distributed_optimizer=true",
            "--train.precision=bf16", "--finetune.lock_image=true", "--finetune.text_layer_decay=0.9"]
    pool = dist_pool(2)
    pool.run(_fit, run, same + ["--train.train_steps=2", "--parallel.tensor_parallel=2"])
    pool.run(_fit, run, same + ["--train.train_steps=4"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    with pytest.raises(DistributedTestError, match=r"finetune.text_lr_mult: checkpoint 1.0, current 0.5\); start "
                                                   r"from its weights only"):
        pool.run(_fit, run, same + ["--train.train_steps=6", "--finetune.text_lr_mult=0.5"])
