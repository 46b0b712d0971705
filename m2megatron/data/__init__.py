"""Data: formats, DALI and PIL decoding, the GLM-compatible tokenizer, synthetic bilingual data, the loader.

The names the trainer and eval use are re-exported here (see docs/DATA.md; eval sets live in m2megatron.eval).
They are imported lazily:
the PIL decode worker processes import `m2megatron.data.decode_workers`, which needs only numpy and
PIL, and must not pay for torch, sentencepiece and the rest at start-up.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_source": "build", "build_train_loader": "build", "image_limits": "build", "resolve_tokenizer": "build",
    "ShardError": "formats",
    "TrainLoader": "loader",
    "StageBatches": "stage_batches",
    "synthetic_tokenizer_path": "sp_train", "train_sentencepiece": "sp_train",
    "NUM_SCENES": "synthetic", "SyntheticScenes": "synthetic",
    "Tokenizer": "tokenizer", "preprocess_eval_text": "tokenizer",
}
_RENAMED = {"SKIP_REASONS": ("skips", "REASONS")}

__all__ = sorted([*_EXPORTS, *_RENAMED])


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
