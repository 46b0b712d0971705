"""configs/bilingual_mixture.yaml: a bilingual three-source mixture that resolves, dry-runs and trains the tiny
model (DP 2) on shards the test writes; the log reports the mixture it read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from m2megatron.config import load_config
from m2megatron.data.shard_writer import write_bilingual_mixture
from tests.harness import run_module

pytestmark = [pytest.mark.distributed]
REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "bilingual_mixture.yaml"
SHORT = ["--train.train_steps=3", "--train.log_interval=1", "--train.micro_batch_size=8",
         "--model.hidden_size=32", "--model.ffn_hidden_size=64", "--model.num_layers=2", "--model.num_vl_layers=1",
         "--model.image_size=16", "--model.embed_dim=16", "--eval.batch_size=32", "--data.prefetch=1"]


def _train(root: str, run_dir: str, *more: str) -> dict:
    from m2megatron.train.run import train_and_evaluate

    os.chdir(root)  # the recipe's data paths are relative: data/bilingual/...
    try:
        return train_and_evaluate(load_config(RECIPE, SHORT + [f"--train.run_dir={run_dir}", *more])) or {}
    finally:
        os.chdir(REPO)


def test_the_bilingual_mixture_recipe_dry_runs_and_trains_on_two_ranks(dist_pool, tmp_path):
    write_bilingual_mixture(tmp_path / "data" / "bilingual", shards_per_source=4, per_shard=12, image_size=16)
    dry = run_module("m2megatron.train", "--dry-run", "--config", str(RECIPE), "--world-size", "2", "--all-ranks",
                     *SHORT, cwd=tmp_path, timeout=300)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "problems=0" in dry.stdout and "data source web_en_translated: 4 shards, weight share 0.250" in dry.stdout
    results = dist_pool(2).run(_train, str(tmp_path), str(tmp_path / "run"))
    assert "eval/eval/i2t_r1" in results[0]  # the held-out caption set
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    sources = {k: last[f"samples_seen/{k}"] for k in ("web_en", "web_zh", "web_en_translated")}
    assert sum(sources.values()) == 3 * 16  # 3 steps × 8 samples × 2 data-parallel readers
    assert last["samples_seen/lang/en"] == sources["web_en"]
    assert last["samples_seen/lang/zh"] == sources["web_zh"] + sources["web_en_translated"]
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    # resumed at DP 1 from the DP-2 checkpoint: the mixture's position is shared out, the counts carry over
    dist_pool(1).run(_train, str(tmp_path), str(tmp_path / "run"), "--train.train_steps=4", "--train.eval_at_end=false")
    resumed = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["step"] == 4
    assert sum(resumed[f"samples_seen/{k}"] for k in sources) == 3 * 16 + 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["sources"][2]["captions"] == {
        "json:caption_zh": 1.0}
