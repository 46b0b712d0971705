"""Entry points the trainer calls: the tokenizer for a DataConfig and the training loader of one DP rank."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from m2megatron.config.base import ConfigError
from m2megatron.config.data import DataConfig
from m2megatron.data.decode import build_chunk_decoder
from m2megatron.data.filters import Filters
from m2megatron.data.formats import ShardError, expand_shards, read_jsonl
from m2megatron.data.image import Augment, ImageLimits
from m2megatron.data.loader import TrainLoader
from m2megatron.data.mixture import build_mixture
from m2megatron.data.shard_open import ShardFailures
from m2megatron.data.sources import JsonlSource, SyntheticSource, WebdatasetSource
from m2megatron.data.sp_train import synthetic_tokenizer_path
from m2megatron.data.synthetic import SyntheticScenes
from m2megatron.data.tokenizer import Tokenizer

log = logging.getLogger("m2megatron.data")


KEPT_TOKENIZER = "tokenizer.model"
"""The copy of data.tokenizer a run directory keeps."""


def resolve_tokenizer(cfg: DataConfig, *, max_length: int, cache_dir: str | Path) -> Tokenizer:
    """cfg.tokenizer if set (a copy is kept as `cache_dir`/tokenizer.model, e.g. in the run directory, and used
    when the original has gone); for the synthetic source without one, a small model trained and cached in
    `cache_dir`. Set model.vocab_size = tokenizer.vocab_size afterwards."""
    if cfg.tokenizer:
        try:
            return Tokenizer(_kept_copy(Path(cfg.tokenizer), Path(cache_dir) / KEPT_TOKENIZER), max_length=max_length)
        except ValueError as exc:
            raise ConfigError(f"data.tokenizer: {exc}") from None
    if cfg.source != "synthetic":
        raise ConfigError(f"data.tokenizer: source={cfg.source} needs a SentencePiece model path "
                          "(the reference sp.model, or one from tools/train_tokenizer.py)")
    return Tokenizer(synthetic_tokenizer_path(cache_dir, cfg.synthetic_vocab_size), max_length=max_length)


def _kept_copy(original: Path, copy: Path) -> Path:
    """Keep `copy` equal to `original` (written atomically); the path to load: the original, or the copy when
    the original is gone."""
    if not original.is_file():
        if copy.is_file():
            log.warning("data.tokenizer: %s does not exist; using the run directory's copy %s", original, copy)
            return copy
        return original  # the Tokenizer names it
    data = original.read_bytes()
    if not copy.is_file() or copy.read_bytes() != data:
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    return original


def image_limits(cfg: DataConfig) -> ImageLimits:
    return ImageLimits(min_side=cfg.min_image_side, max_pixels=cfg.max_image_pixels, max_aspect=cfg.max_aspect_ratio)


def build_source(cfg: DataConfig, *, image_size: int, dp_rank: int, dp_size: int, seed: int):
    """The per-rank sample source of cfg.source (see m2megatron.data.sources)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    if cfg.source == "synthetic":
        scenes = SyntheticScenes(seed=seed, image_size=image_size, language=cfg.language, split="train")
        return SyntheticSource(scenes, cfg.synthetic_train_samples, seed, dp_rank, dp_size)
    if cfg.is_mixture():
        return build_mixture(cfg, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    if cfg.source == "webdataset":
        # No stat of every shard here: at 600k shards that is a metadata storm on every reading rank. A
        # shard that is missing or unreadable is a counted skip naming it when the loader opens it.
        shards = expand_shards(cfg.shards)
        failures = ShardFailures("default", len(shards), dp_size, cfg.max_failed_shard_fraction, "data.shards")
        return WebdatasetSource(shards, seed, dp_rank, dp_size, cfg.shuffle_block, filters=Filters(cfg.filters),
                                name="default", failures=failures)
    if cfg.source == "jsonl":
        try:
            items = read_jsonl(cfg.jsonl)
        except ShardError as exc:
            raise ConfigError(f"data.jsonl: {exc}") from None
        root = cfg.image_root or str(Path(cfg.jsonl).parent)
        return JsonlSource(items, root, seed, dp_rank, dp_size)
    raise ConfigError(f"data.source: unknown source {cfg.source!r}")


def build_train_loader(cfg: DataConfig, *, tokenizer: Tokenizer, image_size: int, micro_batch_size: int,
                       dp_rank: int = 0, dp_size: int = 1, seed: int = 0, gpu: bool | None = None,
                       device: torch.device | None = None, decoder=None, prefetch: int | None = None
                       ) -> TrainLoader:
    """The training loader of data-parallel rank `dp_rank` of `dp_size` (its order depends on `seed`).

    gpu=None decodes with DALI's mixed decoder (decoder auto/dali) when CUDA is available: images come
    back on the GPU. `device`: the runtime device; when it is a CUDA device and images are decoded on
    the host, batches are stacked in pinned memory for an asynchronous copy. `decoder` (a chunk decoder)
    and `prefetch` replace the ones cfg gives (StageBatches' split mode).
    """
    cfg.validate()
    source = build_source(cfg, image_size=image_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    limits = image_limits(cfg)
    if cfg.source == "synthetic":  # synthetic scenes are rendered at the right size: nothing to decode
        decoder = None
    elif decoder is None:
        decoder = build_chunk_decoder(cfg.decoder, image_size, limits, micro_batch_size, num_workers=cfg.num_workers,
                                      depth=cfg.decode_depth, gpu=gpu)
    augment = Augment(scale=(cfg.augment_min_scale, 1.0), flip=cfg.augment_flip) if cfg.augment else None
    on_host = decoder is None or decoder.device.type == "cpu"
    pin = torch.device(device) if device is not None and torch.device(device).type == "cuda" and on_host else None
    return TrainLoader(source, decoder, tokenizer, micro_batch_size, augment=augment, limits=limits,
                       prefetch=cfg.prefetch if prefetch is None else prefetch, pin_device=pin)
