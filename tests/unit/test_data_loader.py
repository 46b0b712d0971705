"""Training loader: batch layout, determinism, distinct samples per DP rank, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.shard_writer import write_synthetic_shards

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """5 shards of 12 samples (32 px JPEGs)."""
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_samples=60, per_shard=12, seed=5, image_size=32)
    return str(out / "train-{000000..000004}.tar")


def _take(loader, n):
    batches = [next(loader) for _ in range(n)]
    return [k for b in batches for k in b["keys"]], batches


def _wds(shards, **kw):
    return DataConfig(source="webdataset", shards=[shards], decoder="pil", shuffle_block=5, **{"num_workers": 0, **kw})


def test_synthetic_batch_layout(tok):
    loader = build_train_loader(DataConfig(synthetic_train_samples=64), tokenizer=tok, image_size=32,
                                micro_batch_size=8, seed=3)
    b = next(loader)
    assert b["images"].shape == (8, 3, 32, 32) and b["images"].dtype == torch.uint8  # normalized on the device
    assert b["text_ids"].shape == b["text_mask"].shape == (8, 16) and b["text_ids"].dtype == torch.long
    assert (b["text_ids"][:, 0] == tok.cls_id).all() and len(b["keys"]) == len(b["captions"]) == 8
    ids, mask = tok.encode(b["captions"])
    assert torch.equal(ids, b["text_ids"]) and torch.equal(mask, b["text_mask"])
    loader.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_synthetic_resume_is_exact(tok, prefetch):
    cfg = DataConfig(synthetic_train_samples=40, prefetch=prefetch)
    kw = dict(tokenizer=tok, image_size=32, micro_batch_size=6, seed=11)
    straight, _ = _take(build_train_loader(cfg, **kw), 12)  # crosses epoch boundaries (40 samples/epoch)
    first = build_train_loader(cfg, **kw)
    head, _ = _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # a small JSON-able dict
    first.close()
    resumed = build_train_loader(cfg, **kw)
    resumed.load_state_dict(state)
    tail, batches = _take(resumed, 7)
    assert head + tail == straight
    assert resumed.batches == 12 and resumed.epoch >= 1
    again, _ = _take(build_train_loader(cfg, **{**kw, "seed": 12}), 12)
    assert again != straight  # the order depends on the seed


def test_synthetic_ranks_disjoint(tok):
    cfg = DataConfig(synthetic_train_samples=48)
    keys = [set(_take(build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=8, seed=1,
                                         dp_rank=r, dp_size=3), 2)[0]) for r in range(3)]
    assert all(len(k) == 16 for k in keys)
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_webdataset_epoch_covers_every_sample_once(tok, shards):
    loader = build_train_loader(_wds(shards), tokenizer=tok, image_size=32, micro_batch_size=6, seed=2)
    keys, _ = _take(loader, 10)  # one epoch = 60 samples
    assert len(set(keys)) == 60 and loader.skipped() == {}
    assert keys != sorted(keys)  # shard order and in-shard blocks are shuffled


def test_webdataset_resume_is_exact(tok, shards):
    cfg = _wds(shards, augment=True)
    kw = dict(tokenizer=tok, image_size=32, micro_batch_size=7, seed=4)
    straight_keys, straight = _take(build_train_loader(cfg, **kw), 13)  # > 1 epoch, mid-shard, mid-block
    for n in (4, 9):
        first = build_train_loader(cfg, **kw)
        head, _ = _take(first, n)
        state = first.state_dict()
        first.close()
        resumed = build_train_loader(cfg, **kw)
        resumed.load_state_dict(state)
        tail, batches = _take(resumed, 13 - n)
        assert head + tail == straight_keys
        for a, b in zip(batches, straight[n:]):  # same augmentation draws too
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["text_ids"], b["text_ids"])
        resumed.close()


def test_webdataset_ranks_read_distinct_shards(tok, shards):
    shard_sets = []
    for r in range(2):
        loader = build_train_loader(_wds(shards), tokenizer=tok, image_size=32, micro_batch_size=4, seed=9,
                                    dp_rank=r, dp_size=2)
        keys, _ = _take(loader, 6)  # 24 samples = the rank's 2 shards of this epoch
        shard_sets.append({k.split(":")[0] for k in keys})
        loader.close()
    assert len(shard_sets[0]) == len(shard_sets[1]) == 2 and not shard_sets[0] & shard_sets[1]


def test_loader_config_errors(tok, shards):
    with pytest.raises(ConfigError, match="data.shards"):
        build_train_loader(_wds(shards), tokenizer=tok, image_size=32, micro_batch_size=4, dp_rank=0, dp_size=6)
    with pytest.raises(ConfigError, match="matches no file"):
        build_train_loader(DataConfig(source="webdataset", shards=["/nonexistent/*.tar"]), tokenizer=tok,
                           image_size=32, micro_batch_size=4)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        resolve_tokenizer(DataConfig(source="webdataset", shards=["x"]), max_length=52, cache_dir=".")
    loader = build_train_loader(DataConfig(), tokenizer=tok, image_size=32, micro_batch_size=4, seed=1)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 2})
