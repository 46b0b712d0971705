"""Sample filters of webdataset sources (`data.filters`, `data.sources[i].filters`): `<subject> <op> <value>`.

Subjects: `json:<key>` (a field of the record's .json member: numbers compare as numbers, anything else
as strings), `caption_chars` (characters of the caption the sample uses, after stripping) and
`aspect_ratio` (long side / short side from the image header). Ops: >= > <= < == !=. A sample that fails
one is a counted skip: `filtered_metadata` (a missing or non-numeric field fails a numeric comparison),
`filtered_caption_length`, `filtered_aspect_ratio`. The paper's filters (M2-Encoder, BM-6B):
`["caption_chars >= 5", "aspect_ratio <= 3", "json:similarity >= 0.25"]`.
"""

from __future__ import annotations

from m2megatron.config.data_source import parse_filter
from m2megatron.data.skips import BadSample


class Filters:
    """The parsed filters of one source."""

    def __init__(self, texts: list[str], setting: str = "data.filters"):
        preds = [parse_filter(t, setting) for t in texts]
        self.json = [p for p in preds if p.subject.startswith("json:")]
        self.caption = [p for p in preds if p.subject == "caption_chars"]
        self.aspect = [p for p in preds if p.subject == "aspect_ratio"]

    def __bool__(self) -> bool:
        return bool(self.json or self.caption or self.aspect)

    def check_record(self, meta: dict | None, caption: str, where: str) -> None:
        """Raise BadSample when the json metadata or the caption fails a filter."""
        for p in self.json:
            if not p.holds(None if meta is None else meta.get(p.subject[len("json:"):])):
                raise BadSample("filtered_metadata", f"{where}: not {p.text}")
        n = len(caption.strip())
        for p in self.caption:
            if not p.holds(n):
                raise BadSample("filtered_caption_length", f"{where}: {n} characters, not {p.text}")

    def check_image(self, width: int, height: int) -> None:
        ratio = max(width, height) / max(1, min(width, height))
        for p in self.aspect:
            if not p.holds(ratio):
                raise BadSample("filtered_aspect_ratio", f"{width}x{height}, not {p.text}")
