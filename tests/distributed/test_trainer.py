"""The trainer end to end on a tiny model: logs, TensorBoard events, checkpoint, eval, NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m2megatron.config import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SMALL = ["--model.hidden_size=32", "--model.ffn_hidden_size=64", "--model.num_layers=2", "--model.num_vl_layers=1",
         "--model.image_size=16", "--model.patch_size=8", "--model.max_text_len=12", "--model.embed_dim=16",
         "--train.micro_batch_size=8", "--train.log_interval=2", "--data.synthetic_eval_samples=32",
         "--eval.batch_size=16"]


def _fit(run_dir: str, overrides: list[str]) -> dict:
    from m2megatron.train.run import train_and_evaluate

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}"] + overrides)
    results = train_and_evaluate(cfg)
    return results or {}


def _nan_fit(run_dir: str) -> str:
    from m2megatron.train import trainer as trainer_mod

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}", "--train.train_steps=10",
                                         "--train.max_nonfinite_steps=3", "--checkpoint.load=null"])
    t = trainer_mod.Trainer(cfg, progress=False)
    real = t.step_fn.forward_backward

    def poisoned(microbatches):
        loss = real(microbatches)
        for module in t.modules:  # a NaN gradient on every rank
            for p in module.parameters():
                if getattr(p, "main_grad", None) is not None:
                    p.main_grad.fill_(float("nan"))
        return loss

    t.step_fn.forward_backward = poisoned
    before = {k: v.clone() for k, v in t.modules[0].state_dict().items() if torch.is_tensor(v)}
    try:
        t.fit()
    except trainer_mod.NonFiniteError as exc:
        after = t.modules[0].state_dict()
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        return f"stopped: {exc} unchanged={unchanged} skipped={t.skipped_steps}"
    finally:
        t.batches.close()
        t.preemption.uninstall()
    return "did not stop"


def test_pipeline_training_logs_checkpoints_and_evaluates(dist_pool, tmp_path):
    run_dir = tmp_path / "run"
    results = dist_pool(2).run(_fit, str(run_dir), ["--parallel.pipeline_parallel=2", "--train.train_steps=6"])
    assert results[0] == results[1]
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "mr", "num_images"):
        assert f"eval/synthetic/{key}" in results[0]
    assert json.loads((run_dir / "results.json").read_text())["eval/synthetic/num_images"] == 32
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for key in ("loss", "logit_scale", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "model_tflops",
                "samples_seen", "tokens_seen", "epoch", "eta_s", "data_wait_frac", "mem/cpu_rss_gb",
                "time/step/max_ms", "time/data_wait/max_rank", "time/forward_backward/min_ms", "time/optimizer/max_ms"):
        assert all(key in r for r in records), key
    assert [r["samples_seen"] for r in records] == [16, 32, 48]  # micro_batch 8 × DP 1, 2 steps per record
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert {"train/lr", "train/grad_norm", "train/samples_per_s", "train/samples_seen", "time/step/max_ms",
            "mem/cpu_rss_gb"} <= set(events.Tags()["scalars"])


def test_resume_continues_from_latest_checkpoint(dist_pool, tmp_path):
    run_dir = tmp_path / "run"
    dist_pool(2).run(_fit, str(run_dir), ["--parallel.pipeline_parallel=2", "--train.train_steps=4",
                                          "--train.eval_at_end=false", "--checkpoint.async_save=true",
                                          "--checkpoint.save_interval=2"])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    dist_pool(2).run(_fit, str(run_dir), ["--parallel.pipeline_parallel=2", "--train.train_steps=6",
                                          "--train.eval_at_end=false"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]  # the second run started at step 4, not 0
    assert records[-1]["samples_seen"] == 6 * 8  # counted across the resume (checkpointed), not from the restart
    assert Path(run_dir / "checkpoints" / "iter_0000006").is_dir()


def test_nonfinite_gradients_skip_the_update_and_stop_the_run(dist_pool, tmp_path):
    (message,) = dist_pool(1).run(_nan_fit, str(tmp_path / "nan"))
    assert message.startswith("stopped: train.max_nonfinite_steps: 3 consecutive steps")
    assert "unchanged=True" in message and "skipped=3" in message


def _fit_preempted_at(run_dir: str, stop_after: int, overrides: list[str]) -> int:
    """Train, but ask for a preemption after `stop_after` steps (as SIGUSR1 would); return the last step."""
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}", "--train.eval_at_end=false"] + overrides)
    trainer = Trainer(cfg, progress=False)
    real = trainer.train_step

    def preempt_during():  # the signal arrives while step `stop_after` runs: it is the last one
        if trainer.step + 1 == stop_after:
            trainer.preemption.request("test")
        return real()

    trainer.train_step = preempt_during
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _final_params(run_dir: str, overrides: list[str]) -> dict:
    from m2megatron.models.state import full_state_dict
    from m2megatron.train.trainer import Trainer

    cfg = load_config(overrides=SMALL + [f"--train.run_dir={run_dir}", "--train.eval_at_end=false"] + overrides)
    trainer = Trainer(cfg, progress=False)  # resumes from the run's latest checkpoint
    try:
        return {k: v.clone() for m in trainer.modules for k, v in full_state_dict(m).items()}
    finally:
        trainer.close()


@pytest.mark.parametrize("world,layout", [
    (2, ["--parallel.pipeline_parallel=2"]),
    # Megatron mixed precision: bf16 weights, fp32 main grads, the distributed optimizer's fp32 main weights.
    (4, ["--parallel.pipeline_parallel=2", "--train.precision=bf16", "--parallel.distributed_optimizer=true"]),
], ids=["pp2-fp32", "dp2-pp2-bf16-distopt"])
def test_stop_and_resume_is_bit_identical_to_a_straight_run(dist_pool, tmp_path, world, layout):
    layout = layout + ["--train.train_steps=6", "--train.log_interval=1"]
    pool = dist_pool(world)
    pool.run(_fit, str(tmp_path / "straight"), layout + ["--train.eval_at_end=false"])
    assert pool.run(_fit_preempted_at, str(tmp_path / "resumed"), 3, layout) == [3] * world
    assert (tmp_path / "resumed" / "PREEMPTED").is_file()
    pool.run(_fit, str(tmp_path / "resumed"), layout + ["--train.eval_at_end=false"])

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    straight, resumed = losses("straight"), losses("resumed")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight  # exact: same data position, RNG, optimizer and LR schedule
    a = pool.run(_final_params, str(tmp_path / "straight"), layout)
    b = pool.run(_final_params, str(tmp_path / "resumed"), layout)
    for rank in range(world):
        assert a[rank].keys() == b[rank].keys()
        assert all(torch.equal(a[rank][k], b[rank][k]) for k in a[rank])


def test_interleaved_pipeline_trains_saves_and_evaluates_at_the_end(dist_pool, tmp_path):
    # PP2 × VP2: eval runs through the same schedule driver, padding to whole microbatch groups.
    layout = ["--parallel.pipeline_parallel=2", "--parallel.virtual_pipeline=2", "--model.num_layers=4",
              "--train.global_batch_size=16", "--train.train_steps=2", "--train.tensorboard=false"]
    results = dist_pool(2).run(_fit, str(tmp_path / "vp"), layout)
    assert results[0]["step"] == 2 and results[0]["eval/synthetic/num_images"] == 32
    assert results[0] == results[1]  # every rank gets the same metrics
    assert (tmp_path / "vp" / "checkpoints" / "latest").exists()


def test_evaluation_during_training_is_logged_with_the_training_stages(dist_pool, tmp_path):
    run_dir = tmp_path / "evals"
    dist_pool(2).run(_fit, str(run_dir), ["--parallel.pipeline_parallel=2", "--train.train_steps=4",
                                          "--eval.interval=2", "--train.eval_at_end=true"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/synthetic/i2t_r1" in r]
    assert [r["step"] for r in evals] == [2]  # the last step's evaluation is eval_at_end's results.json
    assert evals[0]["eval/synthetic/num_images"] == 32 and evals[0]["eval/synthetic/skipped"] == 0
    final = json.loads((run_dir / "results.json").read_text())
    assert final["step"] == 4 and "eval/synthetic/t2i_r1" in final

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/synthetic/i2t_r1")] == [2]
