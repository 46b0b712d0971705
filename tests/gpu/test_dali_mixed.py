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
from tests.gpu.figures import figure
from tests.gpu.ngc import require_dali

pytestmark = pytest.mark.gpu


def test_mixed_matches_cpu():
    require_dali()
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
    require_dali()
    write_synthetic_shards(tmp_path, num_samples=16, per_shard=8, seed=1, image_size=64)
    cfg = DataConfig(source="webdataset", shards=[str(tmp_path / "train-*.tar")], decoder="dali", augment=True)
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path / "tok")
    batch = next(build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=8))
    assert batch["images"].device.type == "cuda" and batch["images"].shape == (8, 3, 32, 32)
    assert torch.isfinite(batch["images"]).all()


def test_pipelined_mixed_loader_matches_pil_order_skips_and_resume(tmp_path):
    """The pipelined DALI path on the GPU (mixed, depth 2): the PIL loader's samples in the same order, the
    same skip counts (broken PNGs pass the probe and fail DALI's chunk), CUDA images, exact resume."""
    require_dali()
    from tests.data_samples import write_mixed_shards

    shards = write_mixed_shards(tmp_path / "mixed", num_shards=3, per_shard=14)
    tok = resolve_tokenizer(DataConfig(), max_length=16, cache_dir=tmp_path / "tok")

    def loader(decoder, workers):
        cfg = DataConfig(source="webdataset", shards=[shards], decoder=decoder, num_workers=workers, shuffle_block=4,
                         augment=True, decode_depth=2)
        return build_train_loader(cfg, tokenizer=tok, image_size=32, micro_batch_size=5, seed=7,
                                  device=torch.device("cuda", torch.cuda.current_device()))

    ref_loader, gpu_loader = loader("pil", 0), loader("dali", 2)
    ref = [next(ref_loader) for _ in range(12)]
    got = [next(gpu_loader) for _ in range(12)]
    assert gpu_loader.decoder.name == "dali" and gpu_loader.decoder.device.type == "cuda"
    assert ref_loader.pin_device is not None and ref[0]["images"].is_pinned()  # host batches ready for to_device
    for a, b in zip(got, ref):
        assert a["keys"] == b["keys"] and a["images"].is_cuda
        assert a["images"].dtype == b["images"].dtype == torch.uint8  # normalized later, on the device
        assert float((a["images"].cpu().float() - b["images"].float()).abs().mean()) < 0.01 * 127.5
    assert gpu_loader.skipped() == ref_loader.skipped() and gpu_loader.decoder.fallbacks >= 1
    state = gpu_loader.state_dict()
    resumed = loader("dali", 2)
    resumed.load_state_dict(state)
    assert next(resumed)["keys"] == next(gpu_loader)["keys"]
    for x in (ref_loader, gpu_loader, resumed):
        x.close()


def test_dali_mixed_loader_figure():
    """Prints the loader's DALI mixed throughput as a figure line (the GPU check's summary carries it)."""
    require_dali()
    import tempfile
    from pathlib import Path

    from tools.bench_loader import dali_mixed_line, load_tokenizer, make_shards

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), 512)
        line = dali_mixed_line(shards, load_tokenizer(None, Path(tmp)), batch=64, batches=6)
    print(figure(line))
    assert line.startswith("# DALI mixed loader") and "img/s" in line
