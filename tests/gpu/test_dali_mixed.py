"""DALI's GPU (`mixed`, nvJPEG) decoding agrees with its CPU decoding, and the loader returns CUDA images."""

from __future__ import annotations

import pytest
import torch

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, resolve_tokenizer
from m2megatron.data.decode import DaliDecoder
from m2megatron.data.image import FULL_BOX, ImageLimits
from m2megatron.data.shard_writer import encode_jpeg, write_synthetic_shards
from m2megatron.data.synthetic import SyntheticScenes

pytestmark = pytest.mark.gpu


def test_mixed_matches_cpu():
    pytest.importorskip("nvidia.dali")
    scenes = SyntheticScenes(seed=3, image_size=128)
    jpegs = [encode_jpeg(scenes[i].image) for i in range(6)]
    boxes = [FULL_BOX, (0.1, 0.05, 0.9, 0.95)] * 3
    flips = [False, True] * 3
    gpu, _ = DaliDecoder(64, ImageLimits(), 8, gpu=True).decode(jpegs, boxes, flips)
    cpu, _ = DaliDecoder(64, ImageLimits(), 8, gpu=False).decode(jpegs, boxes, flips)
    assert gpu.is_cuda and gpu.shape == cpu.shape == (6, 3, 64, 64)
    diff = (gpu.cpu() - cpu).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.15, (float(diff.mean()), float(diff.max()))


def test_loader_on_gpu(tmp_path):
    pytest.importorskip("nvidia.dali")
    write_synthetic_shards(tmp_path, num_samples=16, per_shard=8, seed=1, image_size=64)
    cfg = DataConfig(source="webdataset", shards=[str(tmp_path / "train-*.tar")], decoder="dali", augment=True)
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path / "tok")
    batch = next(build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=8))
    assert batch["images"].device.type == "cuda" and batch["images"].shape == (8, 3, 32, 32)
    assert torch.isfinite(batch["images"]).all()
