"""One named webdataset source of a training mixture (`data.sources`, docs/DATA.md "Training on a BM-6B-like
mixture")."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

from m2megatron.config.base import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FIELD = re.compile(r"^(txt|json:[^\s]+)$")

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
        "!=": operator.ne}
_EXPR = re.compile(r"^\s*(json:\S+?|caption_chars|aspect_ratio)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
_NUMERIC = ("caption_chars", "aspect_ratio")


@dataclass(frozen=True)
class Predicate:
    subject: str
    op: str
    value: float | str
    text: str

    def holds(self, actual) -> bool:
        if isinstance(self.value, float):
            if isinstance(actual, bool) or not isinstance(actual, (int, float)):
                return False
        elif not isinstance(actual, str):
            actual = "" if actual is None else str(actual)
        return _OPS[self.op](actual, self.value)


def parse_filter(text: str, setting: str) -> Predicate:
    m = _EXPR.match(text) if isinstance(text, str) else None
    if not m:
        raise ConfigError(f"{setting}: {text!r} is not a filter (<json:key|caption_chars|aspect_ratio> <op> <value>, "
                          f"op one of {' '.join(_OPS)})")
    subject, op, raw = m.groups()
    raw = raw.strip("'\"") if raw[:1] in "'\"" and raw[-1:] == raw[:1] else raw
    try:
        value: float | str = float(raw)
    except ValueError:
        if subject in _NUMERIC:
            raise ConfigError(f"{setting}: {text!r}: {subject} compares with a number") from None
        if op not in ("==", "!="):
            raise ConfigError(f"{setting}: {text!r}: a string compares only with == or !=") from None
        value = raw
    return Predicate(subject, op, value, text)


@dataclass(kw_only=True)
class SourceConfig:
    name: str = ""
    """Name of the source, unique in the mixture (letters, digits, _ . -): logs and metrics name it
    (samples_seen/<name>), and a saved data position is matched to the source by it."""
    shards: list[str] = field(default_factory=list)
    """Its webdataset shards: paths, globs, {000..009} ranges or @list.txt files (the syntax of data.shards);
    at least one shard per DP rank."""
    weight: float = 1.0
    """Relative share of the mixture's samples (weights are normalized over the sources). A source that runs
    out of shards starts its next epoch while the others go on (it is upsampled)."""
    captions: dict[str, float] = field(default_factory=dict)
    """Caption fields and the probability of each: `txt` (the .txt member) or `json:<key>` (a string or list
    field of the .json member), e.g. {txt: 1.0} or {"json:caption": 0.5, "json:caption_zh": 0.5}. A record
    that lacks some fields draws among the ones it has (same relative probabilities). Empty: .txt, else json
    "caption" (as data.shards)."""
    language: str = ""
    """Language tag of the source's captions (e.g. en, zh) for the per-language counts; empty: und."""
    caption_languages: dict[str, str] = field(default_factory=dict)
    """Language tag per caption field where it differs from `language`, e.g. {"json:caption_zh": zh}."""
    open_shards: int | None = None
    """Shards each reading rank reads interleaved from this source (None: data.open_shards)."""
    max_failed_shard_fraction: float | None = None
    """Unreadable shards of this source a reading rank tolerates, as a fraction of its share (None:
    data.max_failed_shard_fraction)."""
    filters: list[str] = field(default_factory=list)
    """Sample filters of this source on top of data.filters, e.g. "json:similarity >= 0.25" (syntax: data.filters)."""

    def validate(self, where: str) -> None:
        """`where`: the setting's dotted name, e.g. data.sources[1]."""
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}.name: {self.name!r} is not a name (letters, digits, _ . -)")
        if not self.shards:
            raise ConfigError(f"{where}.shards: source {self.name!r} needs at least one shard path")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"{where}.weight: must be > 0, got {self.weight}")
        if not isinstance(self.captions, dict):
            raise ConfigError(f"{where}.captions: expected a mapping of field to probability, got {self.captions!r}")
        for key, p in self.captions.items():
            if not isinstance(key, str) or not _FIELD.match(key):
                raise ConfigError(f"{where}.captions: {key!r} is not a caption field (txt or json:<key>)")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p >= 0):
                raise ConfigError(f"{where}.captions.{key}: expected a probability >= 0, got {p!r}")
        if self.captions and sum(self.captions.values()) <= 0:
            raise ConfigError(f"{where}.captions: the probabilities add up to 0")
        if not isinstance(self.caption_languages, dict) or not set(self.caption_languages) <= set(self.captions):
            raise ConfigError(f"{where}.caption_languages: names fields that are not in {where}.captions")
        if self.open_shards is not None and self.open_shards < 1:
            raise ConfigError(f"{where}.open_shards: must be >= 1, got {self.open_shards}")
        for i, text in enumerate(self.filters):
            parse_filter(text, f"{where}.filters[{i}]")
        if self.max_failed_shard_fraction is not None and not 0.0 <= self.max_failed_shard_fraction <= 1.0:
            raise ConfigError(f"{where}.max_failed_shard_fraction: {self.max_failed_shard_fraction} is not in [0, 1]")


def validate_sources(sources: list[SourceConfig]) -> None:
    names = set()
    for i, src in enumerate(sources):
        src.validate(f"data.sources[{i}]")
        if src.name in names:
            raise ConfigError(f"data.sources[{i}].name: {src.name!r} names two sources")
        names.add(src.name)
