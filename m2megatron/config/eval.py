"""Standalone evaluation: retrieval and zero-shot classification."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 64
    """Images or texts per feature-extraction batch per data-parallel rank."""
    reference_text_preprocessing: bool = True
    """Lower-case captions and turn curly quotes into straight ones, as the reference eval does."""

    def validate(self) -> None:
        pass
