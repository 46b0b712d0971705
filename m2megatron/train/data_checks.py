"""Checks of a run's inputs before it queues (`--dry-run` and the submit helper): every webdataset source
expands to at least one readable shard (and to one per data-parallel rank), the tokenizer file exists and
loads, the jsonl and the eval sets exist. One line per problem, naming the setting.

No rank of the job runs these: they open a few shards per source and read a bounded number of img2dataset
`_stats.json` files, which is fine once on a login node and a metadata storm on 256 ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from m2megatron.config.base import ConfigError
from m2megatron.config.model import PRESETS
from m2megatron.config.run import RunConfig
from m2megatron.data.formats import expand_shards, iter_tar_records
from m2megatron.data.shard_open import ShardError
from m2megatron.data.shard_stats import read_source_stats
from m2megatron.data.skips import BadSample
from m2megatron.data.tokenizer import Tokenizer

log = logging.getLogger("m2megatron.train")
SHARDS_TRIED = 3
"""Shards of a source tried in order until one opens."""
STATS_READ = 200
"""_stats.json files read per source for its size (extrapolated to all its shards)."""


def data_problems(cfg: RunConfig, dp_size: int | None = None) -> list[str]:
    """One line per problem with cfg's data, tokenizer and eval sets (empty: all fine)."""
    data, out = cfg.data, []
    if data.source == "webdataset":
        for setting, name, shards in _sources(cfg, out):
            if dp_size and len(shards) < dp_size:
                out.append(f"{setting}: source {name!r} has {len(shards)} shard(s), fewer than the {dp_size} "
                           "data-parallel ranks")
            if (error := _first_readable(shards)) is not None:
                out.append(f"{setting}: no readable shard in the first {min(len(shards), SHARDS_TRIED)} of source "
                           f"{name!r}: {error}")
    if data.source == "jsonl" and data.jsonl and not Path(data.jsonl).is_file():
        out.append(f"data.jsonl: {data.jsonl} does not exist")
    if data.tokenizer:
        try:
            Tokenizer(data.tokenizer)
        except (OSError, ValueError, RuntimeError) as exc:
            out.append(f"data.tokenizer: {str(exc).splitlines()[0].removeprefix('tokenizer: ')}")
    elif data.source != "synthetic":
        out.append(f"data.tokenizer: source={data.source} needs a SentencePiece model path (the reference sp.model, "
                   "or one from tools/train_tokenizer.py)")
    try:
        from m2megatron.eval.during_training import configured_sets

        configured_sets(cfg)
    except ValueError as exc:
        out.append(str(exc).splitlines()[0])
    for i, pattern in enumerate(cfg.eval.retrieval_shards):  # configured_sets does not look at these
        try:
            expand_shards([pattern], f"eval.retrieval_shards[{i}]")
        except ConfigError as exc:
            out.append(str(exc))
    return out


def tokenizer_vocabulary(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """cfg with model.vocab_size following data.tokenizer when that loads (as the trainer does), and the
    disagreement as a problem line."""
    if not cfg.data.tokenizer or not Path(cfg.data.tokenizer).is_file():
        return cfg, []
    try:
        return vocabulary_follows_tokenizer(cfg, Tokenizer(cfg.data.tokenizer).vocab_size), []
    except ValueError as exc:
        return cfg, [str(exc).splitlines()[0]]


def data_summary(cfg: RunConfig, global_batch: int) -> list[str]:
    """One line per webdataset source: shards, weight share, and its size and epoch in steps when img2dataset
    _stats.json files are there."""
    if cfg.data.source != "webdataset":
        return []
    sources = cfg.data.webdataset_sources()
    total = sum(s.weight for s in sources)
    lines = []
    for _, name, shards in _sources(cfg, []):
        share = next(s.weight for s in sources if s.name == name) / total
        stats = read_source_stats(shards, limit=STATS_READ)
        line = f"data source {name}: {len(shards)} shards, weight share {share:.3f}"
        samples = stats.samples_per_epoch()
        if samples:
            samples = round(samples * len(shards) / stats.shards)
            steps = samples / max(share * global_batch, 1e-9)
            line += (f", {samples:,} samples per source epoch (_stats.json of {stats.with_stats} shards) = "
                     f"{steps:,.0f} steps at a global batch of {global_batch}")
        lines.append(line)
    return lines


def _sources(cfg: RunConfig, problems: list[str]):
    """(setting, name, expanded shards) of each webdataset source; expansion errors go to `problems`."""
    for i, src in enumerate(cfg.data.webdataset_sources()):
        setting = f"data.sources[{i}].shards" if cfg.data.sources else "data.shards"
        try:
            yield setting, src.name, expand_shards(src.shards, setting)
        except ConfigError as exc:
            problems.append(str(exc))


def _first_readable(shards: list[str]) -> str | None:
    """None when one of the first SHARDS_TRIED shards yields a record; else the last error."""
    error = "no shards"
    for shard in shards[:SHARDS_TRIED]:
        records = iter_tar_records(shard)
        try:
            first = next(records, None)
        except ShardError as exc:
            error = str(exc).splitlines()[0]
            continue
        finally:
            records.close()
        if first is None or isinstance(first, BadSample):
            error = f"{shard} holds no complete record"
            continue
        return None
    return error


def vocabulary_follows_tokenizer(cfg: RunConfig, pieces: int) -> RunConfig:
    """model.vocab_size := the tokenizer's pieces, for every source. A model.vocab_size set to another value
    than its preset's (e.g. to load a checkpoint's embedding) that disagrees with the tokenizer is a one-line
    error naming both."""
    if pieces == cfg.model.vocab_size:
        return cfg
    name = cfg.data.tokenizer or "the synthetic tokenizer"
    preset = PRESETS.get(cfg.model.preset)
    if preset is not None and cfg.model.vocab_size != preset.vocab_size:
        raise ValueError(f"data.tokenizer: {name} has {pieces} pieces, but model.vocab_size={cfg.model.vocab_size} "
                         f"(not the {cfg.model.preset} preset's {preset.vocab_size}) was set; leave model.vocab_size "
                         "at its preset to follow the tokenizer, or use a tokenizer of that size")
    if cfg.data.tokenizer:
        log.info("model.vocab_size: %d -> %d, the pieces of data.tokenizer %s", cfg.model.vocab_size, pieces, name)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=pieces))
