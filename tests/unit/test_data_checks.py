"""Checks before the queue (m2megatron.train.data_checks): one line per problem naming the setting; the
vocabulary follows the tokenizer; the run directory keeps a copy of the tokenizer."""

from __future__ import annotations

import dataclasses

import pytest

from m2megatron.config import load_config
from m2megatron.config.data_source import SourceConfig
from m2megatron.data.build import resolve_tokenizer
from m2megatron.data.shard_writer import write_img2dataset_shards, write_synthetic_shards
from m2megatron.data.sp_train import synthetic_tokenizer_path
from m2megatron.train.data_checks import data_problems, data_summary, vocabulary_follows_tokenizer

pytestmark = pytest.mark.unit


def test_every_failure_is_one_line_naming_its_setting(tmp_path):
    write_synthetic_shards(tmp_path / "ok", num_samples=4, per_shard=2, seed=1, image_size=16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tar").write_bytes(b"no tar here")
    sources = [SourceConfig(name="ok", shards=[str(tmp_path / "ok" / "*.tar")]),
               SourceConfig(name="gone", shards=[str(tmp_path / "gone-*.tar")]),
               SourceConfig(name="broken", shards=[str(tmp_path / "bad" / "x.tar"), "pipe:false"])]
    cfg = load_config(overrides={"data": {"source": "webdataset", "tokenizer": str(tmp_path / "sp.model")},
                                 "eval": {"retrieval_jsonl": [str(tmp_path / "coco.jsonl")],
                                          "retrieval_shards": [str(tmp_path / "held-*.tar")]}})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))
    found = data_problems(cfg, dp_size=2)
    assert found[0].startswith("data.sources[1].shards: ") and "matches no file" in found[0]
    assert found[1].startswith("data.sources[2].shards: no readable shard in the first 2 of source 'broken': ")
    assert found[2].startswith("data.tokenizer: ") and "sp.model" in found[2]
    assert found[3].startswith("eval.retrieval_jsonl: ")
    assert found[4].startswith("eval.retrieval_shards[0]: ") and "matches no file" in found[4] and len(found) == 5
    wide = data_problems(cfg, dp_size=4)
    assert wide[0].startswith("data.sources[0].shards: source 'ok' has 2 shard(s), fewer than the 4")


def test_the_summary_gives_each_sources_size_from_img2dataset_stats(tmp_path):
    write_img2dataset_shards(tmp_path / "en", num_shards=2, per_shard=6)
    cfg = load_config(overrides={"data": {"source": "webdataset", "shards": [str(tmp_path / "en" / "*")]}})
    assert data_summary(cfg, global_batch=3) == [
        "data source default: 2 shards, weight share 1.000, 12 samples per source epoch (_stats.json of 2 shards) "
        "= 4 steps at a global batch of 3"]


def test_the_vocabulary_follows_the_tokenizer_or_names_both(tmp_path, caplog):
    cfg = load_config(preset_name="m2-0.4b", overrides={"data": {"tokenizer": "/x/sp.model"}})
    assert vocabulary_follows_tokenizer(cfg, 50020).model.vocab_size == 50020  # a webdataset run's own tokenizer
    assert vocabulary_follows_tokenizer(cfg, 115244) is cfg
    pinned = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=64000))
    with pytest.raises(ValueError, match=r"^data.tokenizer: /x/sp.model has 50020 pieces, but model.vocab_size=64000"):
        vocabulary_follows_tokenizer(pinned, 50020)


def test_the_run_directory_keeps_a_copy_of_the_tokenizer(tmp_path):
    original = tmp_path / "elsewhere" / "sp.model"
    original.parent.mkdir()
    original.write_bytes(synthetic_tokenizer_path(tmp_path / "train").read_bytes())
    data = {"source": "webdataset", "shards": ["x.tar"], "tokenizer": str(original)}
    cfg = load_config(overrides={"data": data}).data
    run = tmp_path / "run"
    tok = resolve_tokenizer(cfg, max_length=16, cache_dir=run)
    assert (run / "tokenizer.model").read_bytes() == original.read_bytes()
    original.unlink()  # the original has gone: the run's copy is used
    assert resolve_tokenizer(cfg, max_length=16, cache_dir=run).vocab_size == tok.vocab_size


def test_submit_refuses_a_job_whose_data_is_missing_and_keeps_remote_shards_as_they_are(tmp_path):
    from m2megatron.cli import UserError
    from m2megatron.launch.submit import absolute_paths, submit

    sources = [SourceConfig(name="a", shards=["rel/x-{0..3}.tar", "@lists/a.txt"]),
               SourceConfig(name="b", shards=["pipe:aws s3 cp s3://b/{0..3}.tar -", "s3://b/y.tar"])]
    cfg = load_config(overrides={"data": {"source": "webdataset", "tokenizer": "sp.model"},
                                 "train": {"run_dir": str(tmp_path / "run")}})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))
    fixed = absolute_paths(cfg, tmp_path).data
    assert fixed.sources[0].shards == [str(tmp_path / "rel/x-{0..3}.tar"), "@" + str(tmp_path / "lists/a.txt")]
    assert fixed.sources[1].shards == sources[1].shards and fixed.tokenizer == str(tmp_path / "sp.model")
    with pytest.raises(UserError, match=r"^the data check refuses this job \(--no-data-check skips it\):\n  data"):
        submit(cfg, dry_run=True, data_check=True)
    assert not (tmp_path / "run").exists()  # refused before anything is written
