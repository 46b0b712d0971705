"""Evaluation: retrieval (SPEC.md §6.1 protocol) and zero-shot classification, at any TP/PP/DP layout.

    python -m m2megatron.eval.retrieval ...   /   python -m m2megatron.eval.zeroshot ...   (docs/EVAL.md)

In-process, every rank calls `evaluate_retrieval(model_chunks, groups, images, captions, tokenizer=...)`.
The names below load on first use, so `python -m m2megatron.eval.retrieval` does not import its own
module twice (runpy's "found in sys.modules" warning).
"""

import importlib

_EXPORTS = {
    "RETRIEVAL_KEYS": "m2megatron.eval.metrics", "CaptionIndex": "m2megatron.eval.metrics",
    "retrieval_metrics": "m2megatron.eval.metrics", "topk_accuracy": "m2megatron.eval.metrics",
    "evaluate_retrieval": "m2megatron.eval.retrieval", "retrieval_report": "m2megatron.eval.retrieval",
    "evaluate_zeroshot": "m2megatron.eval.zeroshot", "zeroshot_report": "m2megatron.eval.zeroshot",
    "evaluate_configured_sets": "m2megatron.eval.during_training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'm2megatron.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
