"""Which caption of a webdataset record a sample uses: caption fields with probabilities (`SourceConfig.captions`).

A field is `txt` (the .txt member) or `json:<key>` (a string or list field of the .json member). The field
is drawn with the given probabilities among the fields the record has (a record without `caption_zh` uses
its other fields); a list field gives one of its non-empty strings. Draws come from a per-record seeded
generator, so a resumed run picks the same captions.
"""

from __future__ import annotations

import numpy as np

from m2megatron.data.formats import TarRecord, caption_list, record_image, record_json, record_sample, utf8
from m2megatron.data.skips import BadSample


class CaptionFields:
    """Caption fields with probabilities, and a language tag per field (`language` unless overridden)."""

    def __init__(self, fields: dict[str, float], language: str = "", languages: dict[str, str] | None = None):
        self.fields = {k: float(p) for k, p in fields.items() if p > 0}
        self.language = language or "und"
        self.languages = {k: languages.get(k, self.language) for k in self.fields} if languages else {}

    @property
    def uses_json(self) -> bool:
        return any(k.startswith("json:") for k in self.fields)

    def pick(self, record: TarRecord, rng: np.random.Generator, meta: dict | None = None) -> tuple[bytes, str, str]:
        """(image bytes, caption, language) of a record, or BadSample; `meta`: its parsed .json member (needed
        when `uses_json`)."""
        if not self.fields:  # the default: .txt, else json "caption"
            image, captions = record_sample(record)
            pick = int(rng.integers(len(captions))) if len(captions) > 1 else 0
            return image, captions[pick], self.language
        image = record_image(record)
        if meta is None and self.uses_json:
            meta = record_json(record)
        present = {k: p for k, p in self.fields.items() if self._value(record, meta, k) is not None}
        if not present:
            raise BadSample("missing_caption", f"{record.key}: none of {', '.join(self.fields)}")
        names = list(present)
        weights = np.array([present[k] for k in names])
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))] if len(names) > 1 else names[0]
        value = self._value(record, meta, name)
        if name == "txt":
            captions = [value] if value.strip() else []
            if not captions:
                raise BadSample("empty_caption", record.key)
        else:
            captions = caption_list(value, f"{record.key} ({name})")
        pick = int(rng.integers(len(captions))) if len(captions) > 1 else 0
        return image, captions[pick], self.languages.get(name, self.language)

    @staticmethod
    def _value(record: TarRecord, meta: dict | None, name: str):
        if name == "txt":
            return utf8(record.members["txt"], record.key) if "txt" in record.members else None
        return None if meta is None else meta.get(name[len("json:"):])
