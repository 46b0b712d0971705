"""Where training and eval data come from and how it is decoded and tokenized."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from m2megatron.config.base import ConfigError
from m2megatron.config.data_source import SourceConfig, parse_filter, validate_sources


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["synthetic", "webdataset", "jsonl"] = "synthetic"
    """Training data: the built-in synthetic bilingual scenes, webdataset tar shards, or a reference-format jsonl."""
    shards: list[str] = field(default_factory=list)
    """Webdataset shard paths, globs, {000..009} ranges or @list.txt files of paths, pipe:<command>s or fsspec
    URLs (source=webdataset; the one-source shorthand of data.sources); needs at least one shard per DP rank.
    Training checks no shard up front (the dry run checks the first few): a missing or unreadable one is a
    counted skip naming it when its reading rank opens it (see max_failed_shard_fraction)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of named webdataset sources (source=webdataset; instead of data.shards): each with
    its shards, weight, caption fields, language and open_shards (m2megatron/config/data_source.py,
    docs/DATA.md "Training on a BM-6B-like mixture"). data.shards is the one-source shorthand."""
    open_shards: int = 1
    """Shards of each source that every reading rank reads interleaved (a sample at a time, seeded), so that
    a microbatch mixes shards; each open shard holds one block of shuffle_block records in memory."""
    filters: list[str] = field(default_factory=list)
    """Sample filters of every webdataset source, each `<subject> <op> <value>`: subject json:<key> (a field of
    the .json member), caption_chars (the caption's length in characters) or aspect_ratio (long / short side
    from the image header); op >= > <= < == != (strings: == and != only). A sample that fails one is a
    counted skip (filtered_metadata, filtered_caption_length, filtered_aspect_ratio). The paper's:
    ["caption_chars >= 5", "aspect_ratio <= 3", "json:similarity >= 0.25"]."""
    max_failed_shard_fraction: float = 0.01
    """Shards that cannot be read (missing, unreadable, a failing pipe: command) are skipped, counted
    (unreadable_shard) and logged by name; a reading rank stops the job when more than this fraction of its
    share of a source's shards (the source's shards / DP size) failed. 0: any failure stops it."""
    resampled: bool = False
    """Draw each source's shards with replacement (no epochs, as OpenCLIP's --dataset-resampled) instead of
    reading every shard once per source epoch."""
    jsonl: str | None = None
    """Reference-format jsonl ({"image": path, "caption": [...]}) for source=jsonl."""
    image_root: str | None = None
    """Folder the jsonl image paths are relative to (None: the jsonl file's folder)."""
    tokenizer: str | None = None
    """SentencePiece model path. None is allowed only for the synthetic source: a small model is then
    trained on its captions and cached (in run_dir/tokenizer)."""
    synthetic_vocab_size: int = 256
    """Own pieces of the SentencePiece model trained for the synthetic source (20 special pieces come on top)."""
    decoder: Literal["auto", "dali", "pil"] = "auto"
    """Image decoder. auto: DALI's GPU decoder (mixed) on a GPU host when DALI is installed, else PIL (on a
    CPU host PIL is ~1.7x cheaper per core than DALI's CPU pipeline). dali: mixed on a GPU host, DALI's CPU
    pipeline elsewhere. pil: PIL. The choice is logged at INFO by each reading rank."""
    num_workers: int = 2
    """PIL: decode worker processes per reading rank (0 = decode in the loader's own thread, which tops
    out at one core). DALI: threads of its pipeline (at least 1)."""
    decode_depth: int = 2
    """Chunks in flight in the decoder: DALI's prefetch queue depth (at least 2, asynchronous and
    pipelined), or chunks per PIL worker process."""
    prefetch: int = 2
    """Batches prepared ahead by the loader's background thread; 0 = prepare each batch on demand."""
    tp_decode: Literal["broadcast", "split"] = "broadcast"
    """How the first pipeline stage's tensor-parallel ranks get their images (StageBatches). broadcast: the
    reading rank (tp 0) decodes the whole batch in its background loader and broadcasts the images over
    the TP group. split: each TP rank decodes 1/TP of the batch in the step's critical path and the
    slices are all-gathered. broadcast is faster here (measured in tools/bench_loader.py --tp-decode,
    docs/DATA.md). The synthetic source renders its images, so it always broadcasts."""
    shuffle_block: int = 256
    """Webdataset records are shuffled within consecutive blocks of this many records of a shard (1 = tar order)."""
    augment: bool = False
    """Training augmentation (random resized crop and horizontal flip) instead of the eval squash. Not
    applied to synthetic scenes: a flip would contradict their left/right captions."""
    augment_min_scale: float = 0.8
    """Smallest relative area of the random resized crop (the largest is 1)."""
    augment_flip: bool = True
    """Random horizontal flip as part of the augmentation."""
    min_image_side: int = 8
    """Images with a side shorter than this many pixels are skipped (extreme_size)."""
    max_image_pixels: int = 60_000_000
    """Images with more pixels than this are skipped (extreme_size)."""
    max_aspect_ratio: float = 20.0
    """Images whose long side exceeds this multiple of the short side are skipped (extreme_size)."""
    synthetic_train_samples: int = 8192
    """Size of the synthetic training set (samples per epoch, split evenly over DP ranks)."""
    synthetic_eval_samples: int = 256
    """Size of the held-out synthetic eval set (the eval split; distinct scenes, at most 384)."""
    language: Literal["en", "zh", "both"] = "both"
    """Caption language of synthetic data: English, Chinese, or a random mix (eval: both captions per image)."""

    def validate(self) -> None:
        if self.sources:
            if self.source != "webdataset":
                raise ConfigError(f"data.sources: a mixture of webdataset sources needs data.source=webdataset, "
                                  f"not {self.source}")
            if self.shards:
                raise ConfigError("data.shards: set data.shards (one source) or data.sources (a mixture), not both")
            validate_sources(self.sources)
        elif self.source == "webdataset" and not self.shards:
            raise ConfigError("data.shards: source=webdataset needs at least one shard path (or data.sources)")
        for i, text in enumerate(self.filters):
            parse_filter(text, f"data.filters[{i}]")
        if not 0.0 <= self.max_failed_shard_fraction <= 1.0:
            raise ConfigError(f"data.max_failed_shard_fraction: {self.max_failed_shard_fraction} is not in [0, 1]")
        if self.open_shards < 1:
            raise ConfigError(f"data.open_shards: must be >= 1, got {self.open_shards}")
        if self.source == "jsonl" and not self.jsonl:
            raise ConfigError("data.jsonl: source=jsonl needs the jsonl path")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        for name in ("decode_depth", "shuffle_block", "synthetic_vocab_size", "synthetic_train_samples",
                     "synthetic_eval_samples", "min_image_side"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1, got {getattr(self, name)}")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch: must be >= 0, got {self.prefetch}")
        if not 0.0 < self.augment_min_scale <= 1.0:
            raise ConfigError(f"data.augment_min_scale: {self.augment_min_scale} is not in (0, 1]")
        if self.max_aspect_ratio < 1.0:
            raise ConfigError(f"data.max_aspect_ratio: must be >= 1, got {self.max_aspect_ratio}")
        if self.synthetic_eval_samples > 384:
            raise ConfigError(f"data.synthetic_eval_samples: at most 384 distinct scenes exist, got "
                              f"{self.synthetic_eval_samples}")

    def webdataset_sources(self) -> list[SourceConfig]:
        """data.sources, or data.shards as one source named "default"."""
        return list(self.sources) or [SourceConfig(name="default", shards=list(self.shards))]

    def is_mixture(self) -> bool:
        """Read through the mixture reader (m2megatron.data.mixture) rather than the plain shard reader:
        several sources, interleaved open shards or resampling."""
        return self.source == "webdataset" and (bool(self.sources) or self.open_shards > 1 or self.resampled)

    def samples_seen_keys(self) -> list[str]:
        """The per-source and per-language sample counts a webdataset run logs (samples_seen/<key>): source
        names, then "lang/<tag>" for every language tag the sources name (und: untagged)."""
        if self.source != "webdataset":
            return []
        sources = self.webdataset_sources()
        tags = {t for s in sources for t in (s.language or "und", *s.caption_languages.values())}
        return [s.name for s in sources] + [f"lang/{t}" for t in sorted(tags)]
