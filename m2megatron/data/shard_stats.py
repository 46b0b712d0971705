"""img2dataset's per-shard `_stats.json` files: a source's size and epoch length without reading its tars.

img2dataset writes `<shard>.tar`, `<shard>.parquet` (ignored here) and `<shard>_stats.json` = {"count",
"successes", "failed_to_download", "failed_to_resize", "duration", "status_dict"} beside each other; the tar
holds the `successes` samples. Read by the checks before the queue (`--dry-run`, submit), never by the
reading ranks at start-up (at 600k shards that is a metadata storm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from m2megatron.data.shard_open import is_remote


@dataclass(frozen=True)
class SourceStats:
    shards: int
    """Shards of the source."""
    with_stats: int
    """Shards with a readable _stats.json."""
    samples: int
    """Samples in those shards (the stats' successes)."""

    def samples_per_epoch(self) -> int | None:
        """The source's epoch length in samples, extrapolated from the shards with stats (None: none had)."""
        if not self.with_stats:
            return None
        return round(self.samples * self.shards / self.with_stats)


def stats_path(shard: str) -> str | None:
    """`x/00012.tar` → `x/00012_stats.json` (None for pipe: commands and names not ending in .tar)."""
    if shard.startswith("pipe:") or not shard.endswith(".tar"):
        return None
    return shard[: -len(".tar")] + "_stats.json"


def read_source_stats(shards: list[str], limit: int | None = None) -> SourceStats:
    """Sum the successes of the shards' _stats.json files (of the first `limit` shards when given)."""
    with_stats = samples = 0
    for shard in shards[:limit]:
        path = stats_path(shard)
        stats = _read_json(path) if path else None
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            with_stats += 1
            samples += stats["successes"]
    return SourceStats(len(shards) if limit is None else min(limit, len(shards)), with_stats, samples)


def _read_json(path: str):
    try:
        if is_remote(path):
            import fsspec  # noqa: PLC0415 - optional: only URLs need it

            with fsspec.open(path, "r") as f:
                return json.load(f)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, ImportError):
        return None
