"""The run monitor in a real trainer: a slow rank is named with its slowest phase, a corrupted batch is
flagged as a loss spike (and its update skipped) while the run goes on."""

from __future__ import annotations

import json
import time

import pytest

from m2megatron.config import load_config

pytestmark = [pytest.mark.distributed]

SMALL = ["--model.hidden_size=32", "--model.ffn_hidden_size=64", "--model.num_layers=2", "--model.num_vl_layers=1",
         "--model.image_size=16", "--model.patch_size=8", "--model.max_text_len=12", "--model.embed_dim=16",
         "--train.micro_batch_size=8", "--train.eval_at_end=false", "--checkpoint.load=null",
         "--checkpoint.save_interval=0"]


def _trainer(run_dir: str, overrides: list[str]):
    from m2megatron.train.trainer import Trainer

    return Trainer(load_config(overrides=SMALL + [f"--train.run_dir={run_dir}"] + overrides), progress=False)


def _fit_with_slow_rank(run_dir: str, slow_rank: int, delay_s: float) -> list[str]:
    """Train; `slow_rank` sleeps in its data path every step. Returns the straggler lines logged on rank 0."""
    import logging

    import torch.distributed as dist

    trainer = _trainer(run_dir, ["--train.train_steps=4", "--train.log_interval=1", "--logging.straggler_intervals=2"])
    real = trainer.batches.next_step

    def slow_next_step():
        time.sleep(delay_s)
        return real()

    if dist.get_rank() == slow_rank:
        trainer.batches.next_step = slow_next_step
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("m2megatron.train").addHandler(handler)
    try:
        trainer.fit()
    finally:
        logging.getLogger("m2megatron.train").removeHandler(handler)
        trainer.close()
    return [line for line in lines if line.startswith("straggler")]


def test_a_rank_slow_in_its_data_path_is_named_with_data_wait(dist_pool, tmp_path):
    lines = dist_pool(4).run(_fit_with_slow_rank, str(tmp_path / "run"), 2, 0.5)
    assert lines[1:] == [[], [], []]  # only the logging rank reports
    assert any(line.startswith("straggler: rank 2 on ") and "slowest phase data wait" in line
               for line in lines[0]), lines[0]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time/data_wait/max_rank"] == 2 for r in records)


def _fit_with_corrupted_batch(run_dir: str, corrupt_step: int) -> dict:
    """The model memorizes one repeated batch; at `corrupt_step` its captions come paired with the wrong images."""
    trainer = _trainer(run_dir, ["--train.train_steps=16", "--train.log_interval=4", "--logging.spike_min_steps=4",
                                 "--logging.skip_spikes=true"])
    fixed = trainer.batches.next_step()

    def repeated_or_corrupted():
        if trainer.step + 1 != corrupt_step:
            return fixed
        return [dict(mb, text_ids=mb["text_ids"].roll(1, 0), text_mask=mb["text_mask"].roll(1, 0)) for mb in fixed]

    trainer.batches.next_step = repeated_or_corrupted
    try:
        last = trainer.fit()
    finally:
        trainer.close()
    return {"last": last, "skipped": trainer.skipped_steps, "spikes": trainer.monitor.spikes}


def test_a_corrupted_batch_is_flagged_as_a_loss_spike_and_the_run_goes_on(dist_pool, tmp_path):
    (result,) = dist_pool(1).run(_fit_with_corrupted_batch, str(tmp_path / "run"), 14)
    assert result == {"last": 16, "skipped": 1, "spikes": 1}
    (spike,) = [json.loads(x) for x in (tmp_path / "run" / "spikes.jsonl").read_text().splitlines()]
    assert spike["step"] == 14 and "sigma above the running mean" in spike["reason"], spike
    assert "update skipped" in spike["reason"]
    assert len(spike["keys"]) == 8  # the reading rank's samples (synthetic keys; webdataset's name the shard)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["spikes"] == 1 and records[-1]["skipped_steps"] == 1


def _fit_level_2(run_dir: str) -> None:
    trainer = _trainer(run_dir, ["--train.train_steps=2", "--train.log_interval=2", "--logging.timers=2",
                                 "--parallel.pipeline_parallel=2", "--train.global_batch_size=16"])
    try:
        trainer.fit()
    finally:
        trainer.close()


def test_level_2_records_megatrons_compute_and_pipeline_timers(dist_pool, tmp_path):
    dist_pool(2).run(_fit_level_2, str(tmp_path / "run"))
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for phase in ("step", "data_wait", "forward_backward", "loss", "all_grads_sync", "optimizer", "forward_compute",
                  "backward_compute", "forward_recv", "backward_send"):
        assert record[f"time/{phase}/max_ms"] >= record[f"time/{phase}/min_ms"] > 0, phase
    assert record["time/loss/max_rank"] == 1  # the loss runs on the last stage only
    assert 0 < record["time/pipeline_wait_share"] < 1
