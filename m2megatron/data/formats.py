"""Readers of the on-disk formats: webdataset tar shards, the reference jsonl, image folders.

webdataset (img2dataset's layout): consecutive tar members that share a key (the member path up to the
first dot of its file name) form one record, e.g. `00000042.jpg` + `00000042.txt` and/or
`00000042.json` (with a "caption" string or list). Records are numbered in tar order; reading can start
at any record number without reading the data of the ones before (the resumable position).
A shard that cannot be opened at all raises `ShardError` naming it; a shard cut short mid-member yields
a `truncated_tar` skip and ends.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from m2megatron.config.base import ConfigError
from m2megatron.data.shard_open import ShardError, is_remote, open_tar  # noqa: F401 - ShardError is importable from here
from m2megatron.data.skips import BadSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = {"." + e for e in IMAGE_EXTS}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a glob of shards keeps


@dataclass
class TarRecord:
    index: int  # record number inside the shard
    key: str
    members: dict[str, bytes]  # extension (lower case, e.g. "jpg", "txt") → bytes


def _split_name(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar_records(path: str, start: int = 0) -> Iterator[TarRecord | BadSample]:
    """Records of a tar shard (a path, pipe: command or URL: shard_open) from record number `start` on; a
    cut-short shard ends with BadSample; one that cannot be opened raises ShardError."""
    with open_tar(path) as tf:
        index, key, members = -1, None, {}
        try:
            for member in _members(tf):
                mkey, ext = _split_name(member.name)
                if mkey != key:
                    if key is not None and index >= start:
                        yield TarRecord(index, key, members)
                    index, key, members = index + 1, mkey, {}
                if index >= start:
                    members[ext] = tf.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError) as exc:
            yield BadSample("truncated_tar", f"{path} after record {index}: {exc}")
            return
        if key is not None and index >= start:
            yield TarRecord(index, key, members)


def _members(tf: tarfile.TarFile):
    while (member := tf.next()) is not None:
        base = member.name.rpartition("/")[2]
        if member.isfile() and not base.startswith((".", "__")):
            yield member


def record_sample(record: TarRecord) -> tuple[bytes, list[str]]:
    """(image bytes, captions) of a record, or BadSample."""
    image = record_image(record)
    if "txt" in record.members:
        captions = [utf8(record.members["txt"], record.key)]
    elif "json" in record.members:
        captions = caption_list(record_json(record).get("caption"), record.key)
    else:
        raise BadSample("missing_caption", record.key)
    return image, captions


def record_image(record: TarRecord) -> bytes:
    """The record's image bytes (jpg/jpeg/png/webp member), or BadSample("missing_image")."""
    image = next((record.members[e] for e in IMAGE_EXTS if e in record.members), None)
    if image is None:
        raise BadSample("missing_image", record.key)
    return image


def record_json(record: TarRecord) -> dict | None:
    """The record's .json member as a dict (None when it has none), or BadSample("bad_json")."""
    if "json" not in record.members:
        return None
    try:
        meta = json.loads(utf8(record.members["json"], record.key))
    except json.JSONDecodeError:
        raise BadSample("bad_json", record.key) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", record.key)
    return meta


def caption_list(value, where: str) -> list[str]:
    """A "caption" field (string or list of strings) → its non-empty captions, or BadSample."""
    if value is None:
        raise BadSample("missing_caption", where)
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if values is None or not all(isinstance(v, str) for v in values):
        raise BadSample("bad_json", f"{where}: caption is not a string or a list of strings")
    captions = [v for v in values if v.strip()]
    if not captions:
        raise BadSample("empty_caption", where)
    return captions


def utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("bad_utf8", where) from None


def expand_shards(patterns: list[str], setting: str = "data.shards") -> list[str]:
    """Expand `{000..009}` ranges, globs (which keep only .tar/.tar.gz/.tgz files) and `@list.txt` files (one
    shard path per line, relative paths from the list's folder); each pattern must match something
    (ConfigError otherwise). pipe: commands and URLs get their ranges expanded, never globbed.

    Ranges and list files touch no shard (nothing is stat-ed: at 600k shards that is a metadata storm);
    a glob lists its directories."""
    shards: list[str] = []
    for pattern in patterns:
        if pattern.startswith("@"):
            shards.extend(_read_shard_list(pattern[1:], setting))
            continue
        matched = []
        for p in _brace_expand(pattern):
            if glob.has_magic(p) and not is_remote(p):  # tars only: img2dataset puts .parquet and .json beside
                matched.extend(h for h in sorted(glob.glob(p)) if h.endswith(SHARD_SUFFIXES))
            else:
                matched.append(p)
        if not matched:
            raise ConfigError(f"{setting}: {pattern!r} matches no file")
        shards.extend(matched)
    return shards


def _read_shard_list(path: str, setting: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read the shard list {path}: {exc.strerror}") from None
    folder = Path(path).parent
    shards = [line.strip() if os.path.isabs(line.strip()) or is_remote(line.strip()) else str(folder / line.strip())
              for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not shards:
        raise ConfigError(f"{setting}: the shard list {path} names no shard")
    return shards


def _brace_expand(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [q for i in range(lo, hi + 1)
            for q in _brace_expand(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


@dataclass(frozen=True)
class JsonlItem:
    image: str  # path relative to the image root
    captions: list[str]


def read_jsonl(path: str | Path) -> list[JsonlItem]:
    """The reference jsonl format: one {"image": path, "caption": [..] or str} per line."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"jsonl file not found: {path}")
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                caps = rec["caption"]
                image = rec["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ShardError(f"{path}:{n}: expected a JSON object with 'image' and 'caption'") from None
            items.append(JsonlItem(str(image), [caps] if isinstance(caps, str) else list(caps)))
    return items


def read_file(path: str | Path) -> bytes:
    """Bytes of an image file, or BadSample('missing_image')."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise BadSample("missing_image", f"{path}: {exc.strerror}") from None


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classification folder `root/<class>/<image>`: (sorted class names, [(path, label)] sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ShardError(f"image folder {root} has no class subfolders")
    items = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            items.extend((os.path.join(dirpath, f), label) for f in sorted(files)
                         if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return classes, items
