"""Counting and reporting skipped (bad) samples.

Readers and decoders never crash on a bad sample: they raise `BadSample(reason)` internally, and the
loader counts it here by reason and logs the first few of each reason with the sample's key. The
trainer logs `counter.counts()` (also `TrainLoader.skipped()`); the counts are part of the loader
state, so they survive a resume.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("m2megatron.data")

# The reasons a sample is skipped (the keys of the counts).
REASONS = {
    "empty_image": "zero-byte image file",
    "corrupt_image": "image bytes that no decoder recognizes",
    "truncated_image": "JPEG without its end-of-image marker, or a decode that ran out of data",
    "decode_error": "the decoder failed on an image whose header looked fine",
    "extreme_size": "image side, pixel count or aspect ratio outside the configured limits",
    "missing_image": "a record with a caption but no image member",
    "missing_caption": "a record with an image but no .txt/.json caption",
    "empty_caption": "a caption that is empty or only whitespace",
    "bad_utf8": "a caption file that is not valid UTF-8",
    "bad_json": "a .json member that is not a JSON object",
    "truncated_tar": "a tar shard that ends in the middle of a member (the rest of the shard is lost)",
    "unreadable_shard": "a shard that cannot be opened or is missing (all its records; logged by name)",
    # Filtered out by data.filters / data.sources[i].filters (m2megatron.data.filters).
    "filtered_metadata": "a json metadata filter is false (or its field is missing or not comparable)",
    "filtered_caption_length": "a caption_chars filter is false",
    "filtered_aspect_ratio": "an aspect_ratio filter (long / short side from the image header) is false",
    # Not bad data: what an epoch's order leaves out so that every data-parallel rank gets the same count
    # (counted once per epoch, by DP rank 0).
    "left_out_samples": "a sample left out of an epoch's order (the remainder of num_samples % dp_size)",
    "left_out_shards": "a shard left out of an epoch's order, all its records (the remainder of "
                       "len(shards) % dp_size)",
}


class BadSample(Exception):
    """A sample to skip; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Per-reason counts of skipped samples (thread-safe); logs the first `log_first` of each reason."""

    def __init__(self, log_first: int = 5):
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.log_first = log_first

    def add(self, reason: str, where: str, detail: str = "") -> None:
        with self._lock:
            n = self._counts.get(reason, 0) + 1
            self._counts[reason] = n
        if n <= self.log_first:
            more = " (further ones are only counted)" if n == self.log_first else ""
            log.warning("skipped sample %s: %s%s%s", where, REASONS.get(reason, reason),
                        f" ({detail})" if detail else "", more)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def load(self, counts: dict[str, int]) -> None:
        with self._lock:
            self._counts = {str(k): int(v) for k, v in counts.items()}
